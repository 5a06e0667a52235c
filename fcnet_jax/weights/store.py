"""Converted CLIP checkpoints on disk: what `fcnet_jax.tools.convert_clip` writes and `config.init_from` reads.

A converted checkpoint is a directory:

    variables/     Orbax checkpoint of {"params": ..., "batch_stats": ...}: the image- and text-encoder subtrees,
                   positional embeddings as stored in CLIP (fitted to the model when loaded)
    report.txt     what was converted, and a preview of loading it into the config's model
    report.json    the same, as JSON
"""

import os
from typing import Any, Dict, Mapping

from etils import epath
import jax
import numpy as np

from fcnet_jax import fileio

CHECKPOINT_SUBDIR = "variables"


def _absolute(path: fileio.PathLike) -> epath.Path:
  """Orbax wants absolute paths; remote ones (gs://…) already are."""
  path = fileio.as_path(path)
  return path if "://" in str(path) else fileio.as_path(os.path.abspath(path))


def restore_converted(path: fileio.PathLike) -> Dict[str, Any]:
  """Reads a checkpoint written by `python -m fcnet_jax.tools.convert_clip` (config.init_from).

  Args:
    path: the --out directory (holding `variables/`, report.txt, report.json) or its `variables/` folder.

  Returns:
    {"params": {...}, "batch_stats": {...}} as NumPy arrays, positional embeddings as stored in CLIP; pass it
    to `load_pretrained(fresh_variables, ...)`.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = _absolute(path)
  checkpoint = path / CHECKPOINT_SUBDIR
  if not checkpoint.is_dir():
    checkpoint = path
  if not (checkpoint / "_CHECKPOINT_METADATA").exists() and not (checkpoint / "_METADATA").exists():
    raise FileNotFoundError(
      f"{path} is not a converted CLIP checkpoint (expected {CHECKPOINT_SUBDIR}/ with an "
      f"Orbax checkpoint, written by `python -m fcnet_jax.tools.convert_clip`)"
    )
  restored = jax.tree.map(np.asarray, dict(ocp.StandardCheckpointer().restore(checkpoint)))
  if "params" not in restored:
    raise ValueError(f"{checkpoint}: no 'params' in the checkpoint")
  restored.setdefault("batch_stats", {})
  return restored


def save_converted(
  out_dir: fileio.PathLike, pretrained: Mapping[str, Any], report_text: str, report_json: Mapping[str, Any]
) -> None:
  """Writes `pretrained` (Orbax, under out_dir/variables) plus out_dir/report.txt and out_dir/report.json.

  `out_dir` may exist but must hold no `variables/` yet; to publish a whole directory atomically, pass the
  temporary path of `fileio.atomic_output(out, directory=True)` (as `convert_clip` does).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  out_dir = _absolute(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out_dir / CHECKPOINT_SUBDIR, dict(pretrained))
  checkpointer.wait_until_finished()
  fileio.atomic_write(out_dir / "report.txt", report_text + "\n")
  fileio.write_json(out_dir / "report.json", report_json)
