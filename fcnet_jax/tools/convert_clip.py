"""Converts OpenAI CLIP RN50/RN101 weights into an Orbax checkpoint of FCNet's encoders (for config.init_from).

    python -m fcnet_jax.tools.convert_clip --src=RN101.pt --out=/data/clip_rn101 \
        [--config=configs/refcoco_r101.py] [--overwrite]

--src: OpenAI's RN50.pt / RN101.pt (TorchScript; reading it needs PyTorch), a torch.save'd state dict, or
open_clip's open_clip_model.safetensors from the Hugging Face repos timm/resnet50_clip.openai and
timm/resnet101_clip.openai (read with NumPy; no PyTorch needed), or a folder holding the latter.

--out receives `variables/` (Orbax: {"params": ..., "batch_stats": ...} holding only the image- and
text-encoder subtrees), report.txt and report.json (`fcnet_jax.weights.store`). The directory is written under
a temporary name and renamed into place (`fileio.atomic_output`), so an interrupted run leaves no half-written
checkpoint. An existing empty --out is replaced; a non-empty one only with --overwrite, and then only once the
new weights are converted. The positional embeddings are stored as CLIP has them and fitted to the model when
training loads the checkpoint, so one conversion serves every config with the same backbone (any image size,
any context length ≤ 77). --config only checks that the backbone fits and previews that load.
"""

from typing import Any, Sequence, Tuple

from absl import flags

from fcnet_jax import cli
from fcnet_jax import fileio
from fcnet_jax.weights import clip


def check_destination(out: fileio.PathLike, overwrite: bool) -> None:
  """Fails when `out` may not be replaced (a non-empty folder without `overwrite`, or a file)."""
  out = fileio.as_path(out)
  if not out.exists():
    return
  if not out.is_dir():
    raise FileExistsError(f"--out={out} exists and is not a directory")
  if any(out.iterdir()) and not overwrite:
    raise FileExistsError(f"--out={out} exists and is not empty; pass --overwrite to replace it")


def convert_checkpoint(
  src: str, out: str, config: Any, overwrite: bool = False
) -> Tuple[clip.ConversionReport, clip.LoadReport, str]:
  """Reads `src`, converts it for `config` and writes `out` atomically.

  Returns:
    (conversion report, preview of loading it into the config's model, the text also written to report.txt).
  """
  check_destination(out, overwrite)  # Fail before the slow part.
  state_dict, source_format = clip.read_state_dict(src)
  pretrained, conversion = clip.convert_openai_state_dict(state_dict, config, source=src, source_format=source_format)
  del state_dict
  _, preview = clip.load_pretrained(clip.abstract_variables(config), pretrained)
  model_config = config.model if hasattr(config, "model") else config
  text = (
    f"{conversion}\n\nLoading it into FCNet with image_size={model_config.image_size}, "
    f"context_length={model_config.context_length} (what training with config.init_from does):\n{preview}"
  )
  report_json = {"conversion": conversion.to_dict(), "load_preview": preview.to_dict()}
  check_destination(out, overwrite)  # Again: another process may have written it meanwhile.
  # The old --out stays until the new one is complete (`atomic_output(replace=True)`).
  with fileio.atomic_output(out, directory=True, replace=True) as tmp:
    clip.save_converted(tmp, pretrained, text, report_json)
  return conversion, preview, text


def main(argv: Sequence[str]) -> None:
  del argv  # cli.run rejects extra arguments.
  args = flags.FLAGS
  _, _, text = convert_checkpoint(args.src, args.out, args.config, overwrite=args.overwrite)
  print(text)
  print(f"\nWrote {fileio.as_path(args.out)} (set config.init_from to it).")


def define_flags() -> None:
  """The tool's flags; defined on demand so that tests and other tools can import this module."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from configs import default  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("src", None, "CLIP checkpoint: RN50.pt / RN101.pt, *.pth/*.bin or *.safetensors.")
  flags.DEFINE_string("out", None, "Output directory (config.init_from of the training config).")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
  config_flags.DEFINE_config_file(
    "config",
    default.__file__,
    "Training configuration (configs/*.py; default: configs/default.py); only its model section is used.",
  )
  flags.mark_flags_as_required(["src", "out"])


def run() -> None:
  """Console entry point (fcnet-convert-clip)."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()
