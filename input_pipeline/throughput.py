"""Measures the training input pipeline's throughput (examples/s) on this host.

  fcnet-throughput --data_dir=DIR --image_size=480 --batch_size=32 --steps=40 [--threads=1]

(or `python -m input_pipeline.throughput ...`). `--threads=N` runs tf.data on a private pool of N threads
(`tf.data.Options().threading`), which measures the rate N cores give; 0 uses TF's default pool (all cores).
`--compare=N` measures today's host path and the device-letterbox path (`host_decode`, the resize left to the
accelerator) alternately N times each in this one process, and prints both, their ratios per repeat and what the
device letterbox costs on JAX's default device; `--device_letterbox` measures the fast path alone.
`--write_fake=N` first writes N COCO-sized records (random 640×~480 JPEGs of smooth multi-scale noise, so the
JPEG decode costs about what a photo's does) as split `--split` of DIR, for measuring without the real data.
"""

import gc
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
  num_sentences = int(rng.integers(1, 4))
  tokens = np.zeros((num_sentences, records.STORED_CONTEXT_LENGTH), np.int64)
  for row in tokens:
    words = int(rng.integers(2, 15))
    row[: words + 2] = [SOT_TOKEN, *rng.integers(1, 49405, size=words), EOT_TOKEN]
  record = records.make_example(
    image=jpeg.getvalue(),
    height=height,
    width=width,
    mask=np.asarray(mask),
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
    "format_version": records.FORMAT_VERSION,
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
  device_letterbox: bool = False,
  canvas: int = 640,
) -> Dict[str, float]:
  """Training examples/s after `warmup_steps` batches (which fill the shuffle buffer and start the threads).

  `device_letterbox` measures the host half of the fast path (`host_decode`: batches on a K×K canvas, the
  resize left to the accelerator); otherwise the host path, which letterboxes here.
  """
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow; see device_cost_only)

  cores = threads or len(os.sched_getaffinity(0))
  iterator = pipeline.train_iterator(
    data_dir,
    split,
    image_size=image_size,
    context_length=context_length,
    batch_size=batch_size,
    seed=seed,
    shuffle_buffer=shuffle_buffer,
    threads=threads,
    device_letterbox=device_letterbox,
    canvas=canvas,
    decode_threads=cores,
  )
  for _ in range(warmup_steps):
    next(iterator)
  start, start_cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    batch = next(iterator)
  seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
  key, shape = ("image_raw", (batch_size, canvas * canvas * 3)) if device_letterbox else ("image", None)
  assert batch[key].shape == (shape or (batch_size, image_size, image_size, 3))
  del iterator  # Stops its threads before the next measurement.
  gc.collect()
  examples = steps * batch_size
  # examples per CPU-second (all threads of this process) is what one core gives when the host is shared.
  return {
    "examples_per_s": examples / seconds,
    "cores": cores,
    "examples_per_s_per_core": examples / seconds / cores,
    "examples_per_cpu_s": examples / cpu_seconds,
    "seconds": seconds,
  }


def compare(repeats: int, **kwargs) -> Dict[str, Sequence[float]]:
  """The host path ("old") and the device-letterbox path ("new") measured alternately in this process.

  Each repeat measures old, then new, each on a fresh pipeline, so that load from elsewhere on a shared machine
  hits both alike; the ratios of each repeat show the noise.
  """
  results = {"old": [], "new": []}
  for _ in range(repeats):
    for name in ("old", "new"):
      results[name].append(measure(device_letterbox=name == "new", **kwargs))
  return results


def device_letterbox_seconds(batch_size: int, image_size: int, canvas: int, repeats: int = 5) -> float:
  """Median seconds of `fcnet_jax.data.letterbox_on_device` (jitted) on one batch, on JAX's default device.

  What the device-letterbox path adds to a train step: 480×640 images (COCO's shape) with a mask crop each.
  """
  import jax  # pylint: disable=g-import-not-at-top  (only this measurement needs JAX)

  from fcnet_jax import data  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  height, width = min(480, canvas), min(640, canvas)  # COCO's landscape shape, if it fits the canvas.
  scale = min(image_size / height, image_size / width)
  resized = [max(1, round(height * scale)), max(1, round(width * scale))]
  batch = {
    "image_raw": rng.integers(0, 256, (batch_size, canvas * canvas * 3), dtype=np.uint8),
    "mask_raw": rng.integers(0, 2, (batch_size, canvas * canvas), dtype=np.uint8),
    "mask_box": np.tile(np.array([[0, 0, height // 2, width // 2]], np.int32), (batch_size, 1)),
    "orig_hw": np.tile(np.array([[height, width]], np.int32), (batch_size, 1)),
    "resized_hw": np.tile(np.array([resized], np.int32), (batch_size, 1)),
    "offset": np.tile(
      np.array([[(image_size - resized[0]) // 2, (image_size - resized[1]) // 2]], np.int32), (batch_size, 1)
    ),
  }
  batch = jax.device_put(batch)
  step = jax.jit(lambda b: data.letterbox_on_device(b, image_size))
  jax.block_until_ready(step(batch))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(batch))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def define_flags() -> None:
  """The command-line flags of `main` (defined by `run`, so that importing this module defines none)."""
  flags.DEFINE_string("data_dir", None, "Converter output folder (holds summary.json).")
  flags.DEFINE_string("split", "train", "The split to read (and to write with --write_fake).")
  flags.DEFINE_integer("image_size", 480, "S, the letterbox canvas side.")
  flags.DEFINE_integer("context_length", 17, "L, the token length.")
  flags.DEFINE_integer("batch_size", 32, "Per-process batch.")
  flags.DEFINE_integer("steps", 40, "Timed batches.")
  flags.DEFINE_integer("warmup_steps", 5, "Untimed batches first (they fill the shuffle buffer).")
  flags.DEFINE_integer("threads", 0, "tf.data private thread pool and decode threads (0: all cores).")
  flags.DEFINE_integer("shuffle_buffer", 256, "Records held by the shuffle.")
  flags.DEFINE_integer("write_fake", 0, "First write this many COCO-sized fake records to --data_dir.")
  flags.DEFINE_bool("device_letterbox", False, "Measure the fast path (letterbox left to the device).")
  flags.DEFINE_integer("canvas", 640, "K, the decoded-image canvas of the device-letterbox path.")
  flags.DEFINE_integer(
    "compare",
    0,
    "Measure the host path and the device-letterbox path alternately this many times each, in this "
    "process, and print both and their ratio (plus what the device letterbox costs on JAX's default device).",
  )
  flags.DEFINE_bool(
    "device_cost_only",
    False,
    "Only time fcnet_jax.data.letterbox_on_device on JAX's default device (no TensorFlow needed, e.g. on a GPU "
    "machine without it); --data_dir is then ignored.",
  )


def _line(name: str, result: Dict[str, float], args) -> str:
  return (
    f"{name}{result['examples_per_s']:.1f} examples/s on {result['cores']} core(s) = "
    f"{result['examples_per_s_per_core']:.1f} per core ({args.steps} batches of {args.batch_size} at "
    f"{args.image_size}×{args.image_size}, after {args.warmup_steps} warm-up batches); "
    f"{result['examples_per_cpu_s']:.1f} examples per CPU-second of this process"
  )


def main(argv: Sequence[str]) -> None:
  del argv  # Checked by cli.run.
  args = flags.FLAGS
  if args.device_cost_only:
    seconds = device_letterbox_seconds(args.batch_size, args.image_size, args.canvas)
    print(f"device letterbox on JAX's default device: {seconds * 1e3:.2f} ms per batch of {args.batch_size}")
    return
  if not args.data_dir:
    raise ValueError("--data_dir is required (the converter's output folder, or where --write_fake writes)")
  if args.write_fake:
    write_fake(args.data_dir, args.split, args.write_fake)
  kwargs = dict(
    image_size=args.image_size,
    context_length=args.context_length,
    batch_size=args.batch_size,
    steps=args.steps,
    warmup_steps=args.warmup_steps,
    threads=args.threads,
    shuffle_buffer=args.shuffle_buffer,
    canvas=args.canvas,
  )
  if not args.compare:
    result = measure(args.data_dir, args.split, device_letterbox=args.device_letterbox, **kwargs)
    print(_line("new: " if args.device_letterbox else "", result, args))
    return
  results = compare(args.compare, data_dir=args.data_dir, split=args.split, **kwargs)
  for repeat, (old, new) in enumerate(zip(results["old"], results["new"])):
    print(_line(f"repeat {repeat} old (host letterbox): ", old, args))
    print(_line(f"repeat {repeat} new (device letterbox): ", new, args))
  for key, label in (("examples_per_s", "examples/s"), ("examples_per_cpu_s", "examples per CPU-second")):
    ratios = [n[key] / o[key] for o, n in zip(results["old"], results["new"])]
    old_median = np.median([o[key] for o in results["old"]])
    new_median = np.median([n[key] for n in results["new"]])
    print(
      f"{label}: old {old_median:.1f} -> new {new_median:.1f} (medians); new/old per repeat "
      f"{', '.join(f'{r:.2f}' for r in ratios)} (median {np.median(ratios):.2f})"
    )
  seconds = device_letterbox_seconds(args.batch_size, args.image_size, args.canvas)
  print(f"device letterbox on JAX's default device: {seconds * 1e3:.2f} ms per batch of {args.batch_size}")


def run() -> None:
  """The `fcnet-throughput` entry point."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()
