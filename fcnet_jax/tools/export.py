"""Export a trained FCNet: `python -m fcnet_jax.tools.export --checkpoint=DIR --format=FORMAT --out=DIR`.

    --format=orbax       the shareable pretrained model: parameters + BatchNorm statistics (--dtype=bfloat16 halves
                         it), config.json, a model card with the run's evaluation metrics
    --format=stablehlo   jax.export, runs with jax alone
    --format=savedmodel  TensorFlow SavedModel (jax2tf): TF Serving, TFLite converters
    --format=onnx        ONNX (jax2onnx): onnxruntime

--checkpoint is a training workdir (its --step: best, latest or a number) or an orbax export. The exported
function takes the letterboxed image and token ids and returns logits (docs/export.md; `fcnet_jax.export`).
"""

import json
import time
from typing import Sequence

from absl import flags
from absl import logging

from fcnet_jax import cli
from fcnet_jax import export


def main(argv: Sequence[str]) -> None:
  del argv  # cli.run rejects extra arguments.
  args = flags.FLAGS
  if args.batch != "symbolic" and not args.batch.isdigit():
    raise ValueError(f"--batch={args.batch!r}: expected 'symbolic' or a positive batch size")
  batch = None if args.batch == "symbolic" else int(args.batch)
  if batch is not None and (batch < 1 or args.format == "orbax"):
    raise ValueError(f"--batch={args.batch}: a fixed batch must be ≥ 1 and is not for --format=orbax")
  start = time.perf_counter()
  out = export.export(
    args.checkpoint, args.format, args.out, step=args.step, dtype=args.dtype, batch=batch, replace=args.overwrite
  )
  size = export.directory_size(out)
  logging.info("Exported %s as %s in %.1f s", args.checkpoint, args.format, time.perf_counter() - start)
  print(f"Wrote {out} ({args.format}, {size / 2**20:.1f} MiB)")
  if args.measure:
    print(json.dumps({"format": args.format, **export.measure(out, args.measure)}))


def define_flags() -> None:
  """The tool's flags; defined on demand so that tests and other tools can import this module."""
  flags.DEFINE_string("checkpoint", None, "A training workdir (with config.json) or an orbax export.")
  flags.DEFINE_string("step", "best", "Which checkpoint of a workdir: best, latest or a step number.")
  flags.DEFINE_enum("format", None, list(export.FORMATS), "The export format.")
  flags.DEFINE_string("out", None, "The directory to create.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Storage dtype of --format=orbax.")
  flags.DEFINE_string("batch", "symbolic", "'symbolic' (any batch size) or a fixed batch size.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
  flags.DEFINE_integer(
    "measure",
    0,
    "N > 0: then load the export in its runtime and print size, load time and median batch-1 latency "
    "over N calls (JSON).",
  )
  flags.mark_flags_as_required(["checkpoint", "format", "out"])


def run() -> None:
  """The `fcnet-export` command."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()
