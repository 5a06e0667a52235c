"""Trained FCNet models on disk: training workdirs and exported "pretrained FCNet" directories.

Two kinds of directory hold a trained model:

  a training workdir      config.json (`fcnet_jax.run_config`), checkpoints/<step>/ and best/<step>/ (full train
                          states: parameters, BatchNorm statistics, optimiser moments, dropout key)
  an exported model       what `python -m fcnet_jax.tools.export --format=orbax` writes and users share:
                            config.json    the resolved config and tokenizer settings (as in a workdir)
                            model.json     {"kind": "fcnet_jax-pretrained", "step", "dtype", "metrics", "source"}
                            variables/     Orbax checkpoint of {"params", "batch_stats"} only (no optimiser state),
                                           float32 or bfloat16 (`dtype`; restored as float32)
                            README.md      a model card: config, step, evaluation metrics, how to use it

`load` reads either into (config, model, InferenceState) for prediction, export, the demo and `--mode=eval`;
`read_variables` gives the NumPy variables of either for `config.init_from` (a full-model initialisation, e.g. to
fine-tune a RefCOCO model on RefCOCO+).
"""

import dataclasses
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fcnet_jax import checkpoints as checkpoints_lib
from fcnet_jax import fileio
from fcnet_jax import run_config
from fcnet_jax import sharding

KIND = "fcnet_jax-pretrained"
MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass
class Loaded:
  """A trained model ready for inference."""

  config: Any  # ml_collections.ConfigDict
  model: Any  # fcnet.FCNet
  state: Any  # evaluate.InferenceState, replicated over `mesh`
  step: int
  source: str  # the directory, and which checkpoint of it
  mesh: jax.sharding.Mesh


def _absolute(path: fileio.PathLike) -> fileio.epath.Path:
  path = fileio.as_path(path)
  return path if "://" in str(path) else fileio.as_path(os.path.abspath(path))


def is_exported(path: fileio.PathLike) -> bool:
  """Whether `path` is an exported model (has model.json of our kind)."""
  file = fileio.as_path(path) / MODEL_FILE
  return file.exists() and fileio.read_json(file).get("kind") == KIND


def is_workdir(path: fileio.PathLike) -> bool:
  path = fileio.as_path(path)
  return (path / checkpoints_lib.LATEST_DIR).is_dir() or (path / checkpoints_lib.BEST_DIR).is_dir()


def model_info(path: fileio.PathLike) -> Dict[str, Any]:
  """The model.json of an exported model."""
  return fileio.read_json(fileio.as_path(path) / MODEL_FILE)


def model_card(config: Any, info: Mapping[str, Any]) -> str:
  """The README.md of an exported model: what it is, how it was trained and scored, how to use it."""
  m, d = config.model, config.data
  lines = [
    "# FCNet (fcnet_jax) — pretrained referring-segmentation model",
    "",
    f"- Trained on: {d.dataset} ({d.split_by}), train split `{d.train_split}`"
    + (" (embedded synthetic data)" if d.get("synthetic") and not d.tfrecord_dir else ""),
    f"- Step: {info['step']}; exported from `{info['source']}`",
    f"- Image size {m.image_size}×{m.image_size} ({d.letterbox} letterbox), context length {m.context_length}, "
    f"compute dtype {m.dtype}; stored as {info['dtype']}",
    f"- Parameters: {info.get('parameters', 0):,}",
    "",
  ]
  metrics = info.get("metrics") or {}
  if metrics:
    lines += ["## Evaluation", "", "| split | mIoU | oIoU | Prec@0.5 | Prec@0.9 | pairs |", "|---|---|---|---|---|---|"]
    for split, s in metrics.items():
      lines.append(
        f"| {split} | {100 * s.get('mIoU', 0):.2f} | {100 * s.get('oIoU', 0):.2f} | "
        f"{100 * s.get('prec@0.5', 0):.2f} | {100 * s.get('prec@0.9', 0):.2f} | {int(s.get('count', 0))} |"
      )
    lines.append("")
  lines += [
    "## Use",
    "",
    "```python",
    "from fcnet_jax import predict",
    "predictor = predict.Predictor.from_checkpoint('THIS_DIRECTORY')",
    "result = predictor('image.jpg', ['the man on the left'])",
    "```",
    "",
    "or `python -m fcnet_jax.tools.predict --checkpoint=THIS_DIRECTORY --image=a.jpg --text='...' --out=DIR`; as",
    "`config.init_from` it initialises the whole model for fine-tuning. `config.json` holds the full configuration.",
    "",
  ]
  return "\n".join(lines)


def save(
  out: fileio.PathLike,
  config: Any,
  variables: Mapping[str, Any],
  *,
  step: int,
  source: str,
  metrics: Optional[Mapping[str, Mapping[str, float]]] = None,
  dtype: str = "float32",
  replace: bool = False,
) -> None:
  """Writes an exported model directory (atomically: it appears complete or not at all).

  Args:
    out: the directory to create.
    config: the run's resolved configuration.
    variables: {"params": ..., "batch_stats": ...}.
    step: the training step the variables are from.
    source: where they came from (recorded in model.json and the card).
    metrics: evaluation scores per split (eval_<split>.json of the run), for the card.
    dtype: "float32" or "bfloat16" (half the size; restored as float32).
    replace: replace an existing `out`.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
  arrays = {
    "params": jax.tree.map(lambda x: np.asarray(jnp.asarray(x, dtype)), flax.core.unfreeze(variables["params"])),
    "batch_stats": jax.tree.map(np.asarray, flax.core.unfreeze(variables.get("batch_stats", {}))),
  }
  info = {
    "kind": KIND,
    "step": int(step),
    "dtype": dtype,
    "source": source,
    "parameters": int(sum(x.size for x in jax.tree.leaves(arrays["params"]))),
    "metrics": {k: dict(v) for k, v in (metrics or {}).items()},
  }
  out = _absolute(out)
  with fileio.atomic_output(out, directory=True, replace=replace) as tmp:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / VARIABLES_DIR, arrays)
    checkpointer.wait_until_finished()
    checkpointer.close()
    run_config.save(config, tmp)
    fileio.write_json(tmp / MODEL_FILE, info)
    fileio.atomic_write(tmp / "README.md", model_card(config, info))


def _restore_exported(path: fileio.epath.Path, target: Any) -> Any:
  """The variables of an exported model in the shapes/shardings/dtypes of `target` ({"params", "batch_stats"})."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  checkpoints_lib.quiet_orbax_logging()
  abstract = jax.tree.map(checkpoints_lib.abstract_leaf, target)
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(
      _absolute(path) / VARIABLES_DIR, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args)
    )


def load(
  path: fileio.PathLike,
  checkpoint: checkpoints_lib.CheckpointSpec = "best",
  *,
  config: Any = None,
  mesh: Optional[jax.sharding.Mesh] = None,
  match: Tuple[str, ...] = run_config.MATCHING_FIELDS,
) -> Loaded:
  """A trained model from a training workdir or an exported model directory, ready for inference.

  Args:
    path: a training workdir (checkpoints/, best/, config.json) or an exported model directory.
    checkpoint: for a workdir: "best", "latest" or a step number; an exported model has one step (its own, or
      "best"/"latest" which mean it).
    config: a configuration to read the checkpoint with; by default the saved config.json. When both exist,
      the fields in `match` must agree (an error lists those that do not; by default the model and the
      letterbox).
    mesh: the devices to replicate the state over (default: all).

  Raises:
    FileNotFoundError: `path` is neither kind of directory, or has no saved config and none was given.
    ValueError: `config` does not match the saved one, or the step does not exist (the message lists the steps).
  """
  from fcnet_jax import evaluate  # pylint: disable=g-import-not-at-top
  from fcnet_jax.models import fcnet  # pylint: disable=g-import-not-at-top

  path = fileio.as_path(path)
  exported = is_exported(path)
  if config is None and not exported and not is_workdir(path):
    raise FileNotFoundError(
      f"{path} is neither a training workdir (checkpoints/ or best/) nor an exported model ({MODEL_FILE}, "
      f"{VARIABLES_DIR}/); pass the --workdir of a training run or the --out of fcnet_jax.tools.export"
    )
  config = run_config.resolve(path, config, fields=match)
  model = fcnet.build_model(config.model)
  mesh = mesh or sharding.create_mesh()
  if exported:
    info = model_info(path)
    spec = str(checkpoint).strip()
    if spec not in ("best", "latest", str(info["step"])):
      raise ValueError(f"{path} is an exported model of step {info['step']}; checkpoint={checkpoint!r} is not in it")
    target = evaluate.abstract_inference_state(model, mesh)
    restored = _restore_exported(path, {"params": target.params, "batch_stats": target.batch_stats})
    step = int(info["step"])
    state = evaluate.InferenceState(
      step=jax.device_put(np.int32(step), sharding.replicated_sharding(mesh)),
      params=restored["params"],
      batch_stats=restored["batch_stats"],
    )
    source = f"{path} (exported, step {step})"
  else:
    state = evaluate.restore_for_inference(model, mesh, str(path), checkpoint)
    step = int(state.step)
    source = f"{path} ({checkpoint} checkpoint, step {step})"
  return Loaded(config=config, model=model, state=state, step=step, source=source, mesh=mesh)


def read_variables(path: fileio.PathLike, checkpoint: checkpoints_lib.CheckpointSpec = "best") -> Tuple[Any, Any]:
  """(config, {"params", "batch_stats"} as NumPy float32) of a workdir or exported model, on the host."""
  loaded = load(path, checkpoint, mesh=sharding.create_mesh(jax.local_devices()[:1]))
  variables = {"params": loaded.state.params, "batch_stats": loaded.state.batch_stats}
  return loaded.config, jax.tree.map(np.asarray, variables)
