"""Measures the training input pipeline's throughput (examples/s) on this host.

  fcnet-throughput --data_dir=DIR --image_size=480 --batch_size=32 --steps=40 [--threads=1]

(or `python -m input_pipeline.throughput ...`). `--threads=N` runs tf.data on a private pool of N threads
(`tf.data.Options().threading`), which measures the rate N cores give; 0 uses TF's default pool (all cores).
`--write_fake=N` first writes N COCO-sized records (random 640×~480 JPEGs of smooth multi-scale noise, so the
JPEG decode costs about what a photo's does) as split `--split` of DIR, for measuring without the real data.
"""

import io
import os
import time
from typing import Dict, Sequence, Tuple

from absl import flags
import numpy as np
from PIL import Image
from PIL import ImageDraw

from fcnet_jax import cli
from fcnet_jax import fileio
from fcnet_jax.tokenizer import EOT_TOKEN
from fcnet_jax.tokenizer import SOT_TOKEN
from input_pipeline import import_tensorflow
from input_pipeline import pipeline
from input_pipeline import records


def _photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """uint8 h×w×3: noise at several octaves (bilinear-upsampled) plus pixel noise, for photo-like JPEG sizes."""
  image = np.full((height, width, 3), 128.0)
  for cells, amplitude in ((4, 60.0), (16, 30.0), (64, 15.0), (256, 20.0)):
    grid = rng.normal(0, amplitude, size=(max(2, cells * height // width), cells, 3)).astype(np.float32)
    channels = [np.asarray(Image.fromarray(grid[..., c]).resize((width, height), Image.BILINEAR)) for c in range(3)]
    image += np.stack(channels, -1)
  image += rng.normal(0, 10.0, size=image.shape)  # ~135 KB per 640×480 JPEG; COCO's average is ~160.
  return np.clip(image, 0, 255).astype(np.uint8)


def _fake_record(rng: np.random.Generator, ref_id: int) -> Tuple[bytes, int]:
  """One serialized ref record with a COCO-sized JPEG, a polygon mask and 1–3 sentences; and its sentence count."""
  long_side, short_side = 640, int(rng.integers(360, 481))
  height, width = (short_side, long_side) if rng.random() < 0.7 else (long_side, short_side)
  jpeg = io.BytesIO()
  Image.fromarray(_photo_like(rng, height, width)).save(jpeg, format="JPEG", quality=90)
  mask = Image.new("L", (width, height), 0)
  angles = np.sort(rng.uniform(0, 2 * np.pi, size=8))
  cx, cy, radius = width * rng.uniform(0.3, 0.7), height * rng.uniform(0.3, 0.7), rng.uniform(40, 160)
  ImageDraw.Draw(mask).polygon([(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles], fill=1)
  png = io.BytesIO()
  mask.save(png, format="PNG")
  num_sentences = int(rng.integers(1, 4))
  tokens = np.zeros((num_sentences, records.STORED_CONTEXT_LENGTH), np.int64)
  for row in tokens:
    words = int(rng.integers(2, 15))
    row[: words + 2] = [SOT_TOKEN, *rng.integers(1, 49405, size=words), EOT_TOKEN]
  record = records.make_example(
    image=jpeg.getvalue(),
    height=height,
    width=width,
    mask_png=png.getvalue(),
    ref_id=ref_id,
    ann_id=ref_id,
    image_id=ref_id,
    category_id=1,
    bbox=[cx - radius, cy - radius, 2 * radius, 2 * radius],
    sents=["a sentence"] * num_sentences,
    sent_ids=[ref_id * 10 + k for k in range(num_sentences)],
    tokens=tokens,
  )
  return record, num_sentences


def write_fake(data_dir: str, split: str, num_records: int, seed: int = 0, shard_size: int = 64) -> None:
  """Writes `num_records` COCO-sized fake refs as `split` of `data_dir` (shards and summary.json)."""
  tf = import_tensorflow()
  rng = np.random.default_rng(seed)
  num_shards = max(1, -(-num_records // shard_size))
  sentences = 0
  for shard in range(num_shards):
    path = os.path.join(data_dir, split, records.shard_name(split, shard, num_shards))
    with fileio.atomic_output(path) as tmp, tf.io.TFRecordWriter(str(tmp)) as writer:
      for ref_id in range(shard * shard_size, min(num_records, (shard + 1) * shard_size)):
        record, count = _fake_record(rng, ref_id)
        writer.write(record)
        sentences += count
  summary = {
    "dataset": "fake",
    "split_by": "none",
    "context_length": records.STORED_CONTEXT_LENGTH,
    "splits": {split: {"refs": num_records, "sentences": sentences, "shards": num_shards}},
  }
  fileio.write_json(os.path.join(data_dir, records.SUMMARY_FILE), summary)


def measure(
  data_dir: str,
  split: str,
  *,
  image_size: int,
  context_length: int,
  batch_size: int,
  steps: int,
  warmup_steps: int,
  threads: int,
  shuffle_buffer: int,
  seed: int = 0,
) -> Dict[str, float]:
  """Training examples/s after `warmup_steps` batches (which fill the shuffle buffer and start the threads)."""
  iterator = pipeline.train_iterator(
    data_dir,
    split,
    image_size=image_size,
    context_length=context_length,
    batch_size=batch_size,
    seed=seed,
    shuffle_buffer=shuffle_buffer,
    threads=threads,
  )
  for _ in range(warmup_steps):
    next(iterator)
  start, start_cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    batch = next(iterator)
  seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
  assert batch["image"].shape == (batch_size, image_size, image_size, 3)
  examples = steps * batch_size
  cores = threads or len(os.sched_getaffinity(0))
  # examples per CPU-second (all threads of this process) is what one core gives when the host is shared.
  return {
    "examples_per_s": examples / seconds,
    "cores": cores,
    "examples_per_s_per_core": examples / seconds / cores,
    "examples_per_cpu_s": examples / cpu_seconds,
    "seconds": seconds,
  }


def define_flags() -> None:
  """The command-line flags of `main` (defined by `run`, so that importing this module defines none)."""
  flags.DEFINE_string("data_dir", None, "Converter output folder (holds summary.json).")
  flags.DEFINE_string("split", "train", "The split to read (and to write with --write_fake).")
  flags.DEFINE_integer("image_size", 480, "S, the letterbox canvas side.")
  flags.DEFINE_integer("context_length", 17, "L, the token length.")
  flags.DEFINE_integer("batch_size", 32, "Per-process batch.")
  flags.DEFINE_integer("steps", 40, "Timed batches.")
  flags.DEFINE_integer("warmup_steps", 5, "Untimed batches first (they fill the shuffle buffer).")
  flags.DEFINE_integer("threads", 0, "tf.data private thread pool (0: TF's default, all cores).")
  flags.DEFINE_integer("shuffle_buffer", 256, "Records held by the shuffle.")
  flags.DEFINE_integer("write_fake", 0, "First write this many COCO-sized fake records to --data_dir.")
  flags.mark_flags_as_required(["data_dir"])


def main(argv: Sequence[str]) -> None:
  del argv  # Checked by cli.run.
  args = flags.FLAGS
  if args.write_fake:
    write_fake(args.data_dir, args.split, args.write_fake)
  result = measure(
    args.data_dir,
    args.split,
    image_size=args.image_size,
    context_length=args.context_length,
    batch_size=args.batch_size,
    steps=args.steps,
    warmup_steps=args.warmup_steps,
    threads=args.threads,
    shuffle_buffer=args.shuffle_buffer,
  )
  print(
    f"{result['examples_per_s']:.1f} examples/s on {result['cores']} core(s) = "
    f"{result['examples_per_s_per_core']:.1f} per core ({args.steps} batches of {args.batch_size} at "
    f"{args.image_size}×{args.image_size}, after {args.warmup_steps} warm-up batches); "
    f"{result['examples_per_cpu_s']:.1f} examples per CPU-second of this process"
  )


def run() -> None:
  """The `fcnet-throughput` entry point."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()
