"""Measures the training input pipeline's throughput (examples/s) on this host.

  python -m input_pipeline.throughput --data_dir=DIR --image_size=480 --batch_size=32 --steps=40 [--threads=1]

`--threads=N` runs tf.data on a private pool of N threads (`tf.data.Options().threading`), which measures the
rate N cores give; 0 uses TF's default pool (all cores). `--write_fake=N` first writes N COCO-sized records
(random 640×~480 JPEGs of smooth multi-scale noise, so the JPEG decode costs about what a photo's does) as
split `--split` of DIR, for measuring without the real data.
"""
import argparse
import io
import json
import os
import time
from typing import Dict, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # Before TensorFlow is imported.

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import ImageDraw  # pylint: disable=g-import-not-at-top,wrong-import-position

from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from input_pipeline import records  # pylint: disable=g-import-not-at-top,wrong-import-position

_SOT = 49406


def _photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """uint8 h×w×3: noise at several octaves (bilinear-upsampled) plus pixel noise, for photo-like JPEG sizes."""
  image = np.full((height, width, 3), 128.0)
  for cells, amplitude in ((4, 60.0), (16, 30.0), (64, 15.0), (256, 20.0)):
    grid = rng.normal(0, amplitude, size=(max(2, cells * height // width), cells, 3)).astype(np.float32)
    channels = [np.asarray(Image.fromarray(grid[..., c]).resize((width, height), Image.BILINEAR))
                for c in range(3)]
    image += np.stack(channels, -1)
  image += rng.normal(0, 10.0, size=image.shape)  # ~135 KB per 640×480 JPEG; COCO's average is ~160.
  return np.clip(image, 0, 255).astype(np.uint8)


def _fake_record(rng: np.random.Generator, ref_id: int):
  """One ref record in the `records` layout with a COCO-sized JPEG, a polygon mask and 1–3 sentences."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
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
    row[:words + 2] = [_SOT, *rng.integers(1, 49405, size=words), records.EOT_TOKEN]

  def ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))

  def blobs(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))

  feature = {
      "image/encoded": blobs([jpeg.getvalue()]), "image/height": ints([height]), "image/width": ints([width]),
      "mask/encoded": blobs([png.getvalue()]), "ref_id": ints([ref_id]), "ann_id": ints([ref_id]),
      "image_id": ints([ref_id]), "category_id": ints([1]),
      "bbox": tf.train.Feature(float_list=tf.train.FloatList(value=[cx - radius, cy - radius, 2 * radius,
                                                                    2 * radius])),
      "sentences/sent": blobs([b"a sentence"] * num_sentences),
      "sentences/sent_id": ints([ref_id * 10 + k for k in range(num_sentences)]),
      "sentences/tokens": ints(tokens.reshape(-1)),
  }
  record = tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
  return record, num_sentences


def write_fake(data_dir: str, split: str, num_records: int, seed: int = 0, shard_size: int = 64) -> None:
  """Writes `num_records` COCO-sized fake refs as `split` of `data_dir` (shards and summary.json)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  num_shards = max(1, -(-num_records // shard_size))
  os.makedirs(os.path.join(data_dir, split), exist_ok=True)
  sentences = 0
  for shard in range(num_shards):
    path = os.path.join(data_dir, split, records.shard_name(split, shard, num_shards))
    with tf.io.TFRecordWriter(path) as writer:
      for ref_id in range(shard * shard_size, min(num_records, (shard + 1) * shard_size)):
        record, count = _fake_record(rng, ref_id)
        writer.write(record)
        sentences += count
  summary = {"dataset": "fake", "split_by": "none", "context_length": records.STORED_CONTEXT_LENGTH,
             "splits": {split: {"refs": num_records, "sentences": sentences, "shards": num_shards}}}
  with open(os.path.join(data_dir, records.SUMMARY_FILE), "w") as f:
    json.dump(summary, f)


def measure(data_dir: str, split: str, *, image_size: int, context_length: int, batch_size: int, steps: int,
            warmup_steps: int, threads: int, shuffle_buffer: int, seed: int = 0) -> Dict[str, float]:
  """Training examples/s after `warmup_steps` batches (which fill the shuffle buffer and start the threads)."""
  iterator = pipeline.train_iterator(
      data_dir, split, image_size=image_size, context_length=context_length, batch_size=batch_size, seed=seed,
      shuffle_buffer=shuffle_buffer, threads=threads)
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
  return {"examples_per_s": examples / seconds, "cores": cores,
          "examples_per_s_per_core": examples / seconds / cores, "examples_per_cpu_s": examples / cpu_seconds,
          "seconds": seconds}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", required=True, help="converter output folder (holds summary.json)")
  parser.add_argument("--split", default="train")
  parser.add_argument("--image_size", type=int, default=480)
  parser.add_argument("--context_length", type=int, default=17)
  parser.add_argument("--batch_size", type=int, default=32, help="per-process batch")
  parser.add_argument("--steps", type=int, default=40, help="timed batches")
  parser.add_argument("--warmup_steps", type=int, default=5)
  parser.add_argument("--threads", type=int, default=0, help="tf.data private thread pool (0: TF default)")
  parser.add_argument("--shuffle_buffer", type=int, default=256)
  parser.add_argument("--write_fake", type=int, default=0,
                      help="first write this many COCO-sized fake records to --data_dir")
  args = parser.parse_args(argv)
  if args.write_fake:
    write_fake(args.data_dir, args.split, args.write_fake)
  result = measure(args.data_dir, args.split, image_size=args.image_size, context_length=args.context_length,
                   batch_size=args.batch_size, steps=args.steps, warmup_steps=args.warmup_steps,
                   threads=args.threads, shuffle_buffer=args.shuffle_buffer)
  print(f"{result['examples_per_s']:.1f} examples/s on {result['cores']} core(s) = "
        f"{result['examples_per_s_per_core']:.1f} per core ({args.steps} batches of {args.batch_size} at "
        f"{args.image_size}×{args.image_size}, after {args.warmup_steps} warm-up batches); "
        f"{result['examples_per_cpu_s']:.1f} examples per CPU-second of this process")
  return result


if __name__ == "__main__":
  main()
