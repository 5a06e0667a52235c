"""Converts OpenAI CLIP RN50/RN101 weights into an Orbax checkpoint of FCNet's encoders (for config.init_from).

    python -m fcnet_jax.tools.convert_clip --src=RN101.pt --out=/data/clip_rn101 \
        [--config=configs/refcoco_r101.py] [--overwrite]

--src: OpenAI's RN50.pt / RN101.pt (TorchScript; reading it needs PyTorch), a torch.save'd state dict, or
open_clip's open_clip_model.safetensors from the Hugging Face repos timm/resnet50_clip.openai and
timm/resnet101_clip.openai (read with NumPy; no PyTorch needed).

--out receives `variables/` (Orbax: {"params": ..., "batch_stats": ...} holding only the image- and
text-encoder subtrees), report.txt and report.json. The directory is written under a temporary name and
renamed into place, so an interrupted run leaves no half-written checkpoint; an existing non-empty --out is
refused unless --overwrite. The positional embeddings are stored as CLIP has them and fitted to the model
when training loads the checkpoint (`load_pretrained(fresh, restore_converted(config.init_from))`), so one
conversion serves every config with the same backbone (any image size, any context length ≤ 77). --config
only checks that the backbone fits and previews that load.
"""
import os
import shutil
import uuid
from typing import Any, Tuple

from absl import app
from absl import flags

from fcnet_jax.weights import clip


def _check_destination(out_dir: str, overwrite: bool):
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f"--out={out_dir} exists and is not a directory")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"--out={out_dir} exists and is not empty; pass --overwrite to replace it")


def _move_into_place(tmp_dir: str, out_dir: str, overwrite: bool):
  """Renames tmp_dir to out_dir; an existing out_dir is moved aside first and deleted only afterwards."""
  _check_destination(out_dir, overwrite)  # Again: another process may have written it meanwhile.
  old = None
  if os.path.isdir(out_dir):
    old = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out_dir, old)
  try:
    os.rename(tmp_dir, out_dir)
  except OSError:
    if old is not None:
      os.rename(old, out_dir)
    raise
  if old is not None:
    shutil.rmtree(old)


def convert_checkpoint(src: str, out_dir: str, config: Any,
                       overwrite: bool = False) -> Tuple[clip.ConversionReport, clip.LoadReport, str]:
  """Reads `src`, converts it for `config` and writes out_dir atomically. Returns (conversion, load preview,
  the report text also written to out_dir/report.txt)."""
  out_dir = os.path.abspath(out_dir)
  _check_destination(out_dir, overwrite)  # Fail before the slow part.
  state_dict, source_format = clip.read_state_dict(src)
  pretrained, conversion = clip.convert_openai_state_dict(state_dict, config, source=src,
                                                          source_format=source_format)
  del state_dict
  _, preview = clip.load_pretrained(clip.abstract_variables(config), pretrained)
  model_config = config.model if hasattr(config, "model") else config
  text = (f"{conversion}\n\nLoading it into FCNet with image_size={model_config.image_size}, "
          f"context_length={model_config.context_length} (what training with config.init_from does):\n{preview}")
  report_json = {"conversion": conversion.to_dict(), "load_preview": preview.to_dict()}
  tmp_dir = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    clip.save_converted(tmp_dir, pretrained, text, report_json)
    _move_into_place(tmp_dir, out_dir, overwrite)
  finally:
    if os.path.exists(tmp_dir):
      shutil.rmtree(tmp_dir)
  return conversion, preview, text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  _, _, text = convert_checkpoint(args.src, args.out, args.config, overwrite=args.overwrite)
  print(text)
  print(f"\nWrote {os.path.abspath(args.out)} (set config.init_from to it).")


if __name__ == "__main__":
  # Flags are defined here, not at import, so that tests and other tools can import this module.
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("src", None, "CLIP checkpoint: RN50.pt / RN101.pt, *.pth/*.bin or *.safetensors.")
  flags.DEFINE_string("out", None, "Output directory (config.init_from of the training config).")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
  config_flags.DEFINE_config_file("config", "configs/default.py", "Training configuration (configs/*.py); only "
                                  "its model section is used.")
  flags.mark_flags_as_required(["src", "out"])
  app.run(main)
