"""Converts Swin weights + a CLIP text tower into one Orbax checkpoint of FCNet's Swin-backbone encoders.

    python -m fcnet_jax.tools.convert_swin --src=swin_base_patch4_window12_384_22k.pth --clip=RN101.pt \
        --out=/data/swinb_clip [--config=configs/refcoco_swinb.py] [--overwrite]

--src: Microsoft's release (`swin_base_patch4_window12_384_22k.pth`, what LAVT loads; needs PyTorch to read) or
timm's `swin_base_patch4_window12_384.ms_in22k` model.safetensors (read with NumPy). --clip: any OpenAI / open_clip
CLIP file `convert_clip` reads (RN101.pt, ViT-B-16.pt, open_clip_model.safetensors); only its text tower is used,
and its `text_projection` width must equal config.model.embed_dim.

--out receives the same layout as `convert_clip` writes (`fcnet_jax.weights.store`: `variables/`, report.txt,
report.json), atomically; set config.init_from to it. Relative-position tables stay at the release's window and are
resized bicubically to config.model.swin_window when training loads them; --config checks that the backbone fits and
previews that load (what is loaded, resized and left new).
"""

from typing import Any, Sequence, Tuple

from absl import flags

from fcnet_jax import cli
from fcnet_jax import fileio
from fcnet_jax.tools import convert_clip
from fcnet_jax.weights import formats
from fcnet_jax.weights import loading
from fcnet_jax.weights import reports
from fcnet_jax.weights import store
from fcnet_jax.weights import swin


def convert_checkpoint(
  src: str, clip_src: str, out: str, config: Any, overwrite: bool = False
) -> Tuple[reports.ConversionReport, reports.ConversionReport, reports.LoadReport, str]:
  """Reads `src` (Swin) and `clip_src` (CLIP), converts them for `config` and writes `out` atomically.

  Returns:
    (Swin conversion report, text conversion report, preview of loading into the config's model, report.txt text).
  """
  convert_clip.check_destination(out, overwrite)  # Fail before the slow part.
  swin_sd, swin_format = swin.read_swin_state_dict(src)
  clip_sd, clip_format = formats.read_state_dict(clip_src)
  pretrained, image_report, text_report = swin.convert_swin_state_dicts(
    swin_sd, clip_sd, config, sources=(src, clip_src), source_formats=(swin_format, clip_format)
  )
  del swin_sd, clip_sd
  _, preview = loading.load_pretrained(loading.abstract_variables(config), pretrained)
  model_config = config.model if hasattr(config, "model") else config
  text = (
    f"{image_report}\n\n{text_report}\n\nLoading it into FCNet with image_size={model_config.image_size}, "
    f"swin_window={model_config.swin_window}, context_length={model_config.context_length} (what training with "
    f"config.init_from does):\n{preview}"
  )
  report_json = {
    "conversion": image_report.to_dict(),
    "text_conversion": text_report.to_dict(),
    "load_preview": preview.to_dict(),
  }
  convert_clip.check_destination(out, overwrite)
  with fileio.atomic_output(out, directory=True, replace=True) as tmp:
    store.save_converted(tmp, pretrained, text, report_json)
  return image_report, text_report, preview, text


def main(argv: Sequence[str]) -> None:
  del argv  # cli.run rejects extra arguments.
  args = flags.FLAGS
  *_, text = convert_checkpoint(args.src, args.clip, args.out, args.config, overwrite=args.overwrite)
  print(text)
  print(f"\nWrote {fileio.as_path(args.out)} (set config.init_from to it).")


def define_flags() -> None:
  """The tool's flags; defined on demand so that tests and other tools can import this module."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from configs import refcoco_swinb  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("src", None, "Swin checkpoint: Microsoft's *.pth or timm's model.safetensors.")
  flags.DEFINE_string("clip", None, "CLIP checkpoint for the text tower: RN101.pt, *.pth/*.bin or *.safetensors.")
  flags.DEFINE_string("out", None, "Output directory (config.init_from of the training config).")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
  config_flags.DEFINE_config_file(
    "config",
    refcoco_swinb.__file__,
    "Training configuration (default: configs/refcoco_swinb.py); only its model section is used.",
  )
  flags.mark_flags_as_required(["src", "clip", "out"])


def run() -> None:
  """Console entry point (fcnet-convert-swin)."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()
