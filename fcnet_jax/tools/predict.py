"""Segments what sentences refer to in your images with a trained FCNet (console script `fcnet-predict`).

    python -m fcnet_jax.tools.predict --checkpoint=/tmp/fcnet_demo --image=a.jpg \
        --text="the man on the left" [--text=...] --out=DIR [--step=best] [--threshold=0.35]
    python -m fcnet_jax.tools.predict --checkpoint=DIR --manifest=pairs.jsonl --out=DIR

--checkpoint: a training workdir (--step: best, latest or a step number) or an exported model directory.
Per sentence, --out receives `<name>_mask.png` (the mask at the image's original size, upright frame: 255 =
object) and `<name>_overlay.png` (the image, the mask tinted, the sentence written on it), plus
`predictions.jsonl` (one record per sentence: files, mask area, truncation). With several --text, also
`<stem>_overlay.png` with every mask in its own colour.

--manifest: a JSONL file, one {"image": ..., "text": ... [, "mask": ...]} per line, paths relative to the
manifest's folder. It runs with a progress bar and ends with a summary (images/s). When lines carry "mask" (a PNG
of the ground truth, nonzero = object, in the upright frame of the image) it also prints and writes
(metrics.json) mIoU, oIoU and Prec@X of both protocols, computed by evaluation's own code
(`metrics.eval_step_outputs`, `metrics.EvalMetrics`) from the predictor's logits; predictions.jsonl then holds
each pair's IoU. docs/predict.md has the details.
"""

import collections
import functools
import io
import json
import os
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

from absl import flags
from absl import logging
import jax
import numpy as np
from PIL import Image

from fcnet_jax import cli
from fcnet_jax import fileio
from fcnet_jax import letterbox
from fcnet_jax import predict
from fcnet_jax import visualize

FLAGS = flags.FLAGS
PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"


def define_flags() -> None:
  """The tool's flags; defined on demand so that tests and other tools can import this module."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("checkpoint", None, "A training workdir or an exported model directory.")
  flags.DEFINE_string("step", "best", "Checkpoint of a workdir: best, latest or a step number.")
  flags.DEFINE_string("image", None, "An image file (JPEG, PNG, ...).")
  flags.DEFINE_multi_string("text", [], "A sentence about --image (repeat for several).")
  flags.DEFINE_string("manifest", None, 'JSONL: {"image": …, "text": … [, "mask": …]} per line.')
  flags.DEFINE_string("out", None, "Output directory (created).")
  flags.DEFINE_float("threshold", None, "Mask threshold on probabilities; default: the config's mask_threshold.")
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Only for workdirs written before config.json existed: the config they were trained with. With "
    "--latency_runs and no --checkpoint: the config of a randomly initialised model to time.",
  )
  flags.DEFINE_integer("latency_runs", 0, "> 0: time this many predictions (after warm-up) instead; no --out.")
  flags.DEFINE_integer("latency_size", 480, "--latency_runs: the side of the square test image.")


# ----------------------------------------------------------------------------------------------------- files


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "PNG")
  return buffer.getvalue()


def write_outputs(out: fileio.epath.Path, name: str, image: np.ndarray, prediction: predict.Prediction) -> Dict:
  """Writes `<name>_mask.png` and `<name>_overlay.png` (atomically); returns the prediction's record."""
  mask_file, overlay_file = f"{name}_mask.png", f"{name}_overlay.png"
  fileio.atomic_write(out / mask_file, _png(prediction.mask.astype(np.uint8) * 255))
  fileio.atomic_write(out / overlay_file, _png(visualize.overlay(image, prediction.mask, [prediction.sentence])))
  return {
    "text": prediction.sentence,
    "mask_png": mask_file,
    "overlay_png": overlay_file,
    "mask_fraction": float(prediction.mask.mean()),
    "truncated": prediction.truncated,
  }


def read_manifest(path: str) -> List[Dict[str, Any]]:
  """The manifest's entries, paths made absolute (relative to the manifest); errors name the line."""
  file = fileio.as_path(path)
  if not file.exists():
    raise FileNotFoundError(f"--manifest={path}: no such file")
  base = os.path.dirname(os.path.abspath(path)) if "://" not in str(path) else str(file.parent)
  entries = []
  for number, line in enumerate(file.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    where = f"--manifest={path} line {number}"
    try:
      entry = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not JSON ({e})") from e
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not isinstance(entry.get("text"), str):
      raise ValueError(f'{where}: expected {{"image": str, "text": str [, "mask": str]}}, got {line.strip()[:200]}')
    if "mask" in entry and not isinstance(entry["mask"], str):
      raise ValueError(f'{where}: "mask" must be the path of a PNG, got {entry["mask"]!r}')
    resolved = {"line": number, "text": entry["text"]}
    for key in ("image", "mask"):
      if key in entry:
        value = entry[key]
        resolved[key] = value if os.path.isabs(value) or "://" in value else os.path.join(base, value)
        if not fileio.as_path(resolved[key]).exists():
          raise FileNotFoundError(f"{where}: {key} file {resolved[key]} does not exist")
    entries.append(resolved)
  if not entries:
    raise ValueError(f"--manifest={path} has no entries")
  return entries


def read_mask(path: str, shape: Sequence[int]) -> np.ndarray:
  """A ground-truth PNG as uint8 0/1 (nonzero = object); it must have the image's (upright) size."""
  try:
    with Image.open(io.BytesIO(fileio.as_path(path).read_bytes())) as image:
      mask = np.asarray(image.convert("L") if image.mode not in ("L", "1", "I", "I;16") else image)
  except (Image.UnidentifiedImageError, OSError) as e:
    raise ValueError(f"ground-truth mask {path}: not an image PIL can read ({e})") from e
  if mask.shape != tuple(shape):
    raise ValueError(f"ground-truth mask {path} is {mask.shape[1]}×{mask.shape[0]}, its image {shape[1]}×{shape[0]}")
  return (mask != 0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------- scoring


@functools.partial(jax.jit, static_argnames=("threshold", "canvas", "image_size", "letterbox_mode"))
def _score_pair(logits, batch, *, threshold, canvas, image_size, letterbox_mode):
  from fcnet_jax import metrics  # pylint: disable=g-import-not-at-top  (clu: only when scoring)

  outputs = metrics.eval_step_outputs(logits, batch, threshold, canvas, image_size, letterbox_mode)
  return metrics.EvalMetrics.single_from_model_output(**outputs), outputs["iou"]


class Scorer:
  """Evaluation's metrics over (prediction, ground truth) pairs: `metrics.eval_step_outputs` on each pair."""

  def __init__(self, predictor: predict.Predictor, threshold: float):
    self.predictor, self.threshold, self.metrics = predictor, threshold, None

  def add(self, prediction: predict.Prediction, mask: np.ndarray) -> float:
    """Scores one pair (mask: uint8 H×W, the image's size); returns its IoU."""
    height, width = mask.shape
    size = self.predictor.image_size
    canvas = predict.canvas_bucket(height, width)
    resized_hw, offset = letterbox.integer_geometry(height, width, size)
    orig_mask = np.zeros((1, canvas, canvas), np.uint8)
    orig_mask[0, :height, :width] = mask
    batch = {
      "resized_hw": np.asarray([resized_hw], np.int32),
      "offset": np.asarray([offset], np.int32),
      "orig_hw": np.asarray([[height, width]], np.int32),
      "orig_mask": orig_mask,
    }
    update, iou = _score_pair(
      prediction.logits[None],
      batch,
      threshold=self.threshold,
      canvas=canvas,
      image_size=size,
      letterbox_mode=self.predictor.letterbox_mode,
    )
    self.metrics = update if self.metrics is None else self.metrics.merge(update)
    return float(iou[0])

  def compute(self) -> Optional[Dict[str, float]]:
    return None if self.metrics is None else self.metrics.compute()


# ----------------------------------------------------------------------------------------------------- runs


def _progress(items: Sequence[Any], total_sentences: int) -> Iterable[Any]:
  try:
    import tqdm  # pylint: disable=g-import-not-at-top

    return tqdm.tqdm(items, unit="image", desc=f"{len(items)} images, {total_sentences} sentences")
  except ImportError:

    def logged():
      for i, item in enumerate(items):
        if i % max(1, len(items) // 20) == 0:
          logging.info("image %d / %d", i + 1, len(items))
        yield item

    return logged()


def predict_image(
  predictor: predict.Predictor, image_path: str, texts: Sequence[str], out: fileio.epath.Path, image=None
) -> List[Dict[str, Any]]:
  """--image mode: the masks and overlays of every --text (`image`: the loaded pixels, if already read)."""
  image = predict.load_image(image_path) if image is None else image
  predictions = predictor(image, list(texts))
  stem = os.path.splitext(os.path.basename(image_path))[0]
  records = []
  for k, prediction in enumerate(predictions):
    record = write_outputs(out, f"{stem}_{k}", image, prediction)
    records.append({"image": image_path, **record})
    print(f"{out / record['mask_png']}  ({100 * record['mask_fraction']:.1f}% of the image)  {prediction.sentence!r}")
  if len(predictions) > 1:
    combined = visualize.overlay(image, [p.mask for p in predictions], [p.sentence for p in predictions])
    fileio.atomic_write(out / f"{stem}_overlay.png", _png(combined))
  return records


def predict_manifest(
  predictor: predict.Predictor, path: str, out: fileio.epath.Path, entries: Optional[List[Dict[str, Any]]] = None
) -> Dict[str, Any]:
  """--manifest mode: every entry, grouped by image (each image is read and encoded once); `entries`: the
  manifest's `read_manifest`, if already read."""
  entries = read_manifest(path) if entries is None else entries
  groups: Dict[str, List[Dict[str, Any]]] = collections.OrderedDict()
  for entry in entries:
    groups.setdefault(entry["image"], []).append(entry)
  scorer = Scorer(predictor, predictor.threshold)
  records: List[Dict[str, Any]] = [{} for _ in entries]
  index = {id(entry): i for i, entry in enumerate(entries)}
  start = time.perf_counter()
  for image_path, group in _progress(list(groups.items()), len(entries)):
    image = predict.load_image(image_path)
    predictions = predictor(image, [entry["text"] for entry in group])
    stem = os.path.splitext(os.path.basename(image_path))[0]
    for entry, prediction in zip(group, predictions):
      i = index[id(entry)]
      records[i] = {
        "line": entry["line"],
        "image": image_path,
        **write_outputs(out, f"{i:05d}_{stem}", image, prediction),
      }
      if "mask" in entry:
        records[i]["iou"] = scorer.add(prediction, read_mask(entry["mask"], image.shape[:2]))
  elapsed = time.perf_counter() - start
  summary = {
    "images": len(groups),
    "sentences": len(entries),
    "seconds": elapsed,
    "images_per_second": len(groups) / elapsed,
    "sentences_per_second": len(entries) / elapsed,
    "metrics": scorer.compute(),
  }
  print(
    f"{len(groups)} images, {len(entries)} sentences in {elapsed:.1f} s: {summary['images_per_second']:.2f} images/s, "
    f"{summary['sentences_per_second']:.2f} sentences/s (first calls include compilation)"
  )
  if summary["metrics"] is not None:
    from fcnet_jax import evaluate  # pylint: disable=g-import-not-at-top

    print(evaluate.format_table({"manifest": summary["metrics"]}))
    fileio.write_json(out / METRICS_FILE, {"step": predictor.step, "source": predictor.source, **summary})
  return {"records": records, **summary}


# ----------------------------------------------------------------------------------------------------- latency


def random_predictor(config: Any, seed: int = 0) -> predict.Predictor:
  """A predictor of `config`'s model with random parameters (for timing: no checkpoint, no compiled init).

  Kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 0.02²), scales 1, biases 0, BatchNorm statistics (0, 1).
  """
  from fcnet_jax import evaluate  # pylint: disable=g-import-not-at-top
  from fcnet_jax import pretrained  # pylint: disable=g-import-not-at-top
  from fcnet_jax import sharding  # pylint: disable=g-import-not-at-top
  from fcnet_jax.models import fcnet  # pylint: disable=g-import-not-at-top

  model = fcnet.build_model(config.model)
  mesh = sharding.create_mesh(jax.local_devices()[:1])
  abstract = evaluate.abstract_inference_state(model, mesh)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "var" in name or "scale" in name:
      return np.ones(leaf.shape, leaf.dtype)
    if "bias" in name or "mean" in name:
      return np.zeros(leaf.shape, leaf.dtype)
    std = 0.02 if "embedding" in name or leaf.ndim < 2 else 1.0 / np.sqrt(max(1, int(np.prod(leaf.shape[:-1]))))
    return (rng.standard_normal(leaf.shape) * std).astype(leaf.dtype)

  state = evaluate.InferenceState(
    step=np.int32(0),
    params=jax.tree_util.tree_map_with_path(fill, abstract.params),
    batch_stats=jax.tree_util.tree_map_with_path(fill, abstract.batch_stats),
  )
  loaded = pretrained.Loaded(config, model, sharding.replicate(state, mesh), 0, "random initialisation", mesh)
  return predict.Predictor(loaded)


def measure_latency(predictor: predict.Predictor, size: int, runs: int, warmup: int = 2) -> Dict[str, float]:
  """Seconds per `predictor(image, one sentence)` on a size×size image: median and spread of `runs` calls, and the
  median CPU seconds of this process per call (all threads; on a shared machine less noisy than the wall clock)."""
  image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
  for _ in range(warmup):
    predictor(image, "the man on the left")
  times, cpu = [], []
  for _ in range(runs):
    start, start_cpu = time.perf_counter(), time.process_time()
    predictor(image, "the man on the left")
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return {
    "median_s": float(np.median(times)),
    "min_s": float(np.min(times)),
    "max_s": float(np.max(times)),
    "median_cpu_s": float(np.median(cpu)),
  }


def main(argv: Sequence[str]) -> None:
  del argv  # cli.run rejects extra arguments.
  if FLAGS.latency_runs > 0:
    if FLAGS.checkpoint is None and FLAGS.config is None:
      raise ValueError("--latency_runs needs --checkpoint or --config")
    if FLAGS.checkpoint is None:
      predictor = random_predictor(FLAGS.config)
    else:
      predictor = predict.Predictor.from_checkpoint(FLAGS.checkpoint, FLAGS.step, config=FLAGS.config)
    m = predictor.model
    result = measure_latency(predictor, FLAGS.latency_size, FLAGS.latency_runs)
    print(
      f"{predictor.source}: {m.backbone} {m.image_size}×{m.image_size} {m.dtype}, {jax.devices()[0].device_kind}: "
      f"{FLAGS.latency_size}×{FLAGS.latency_size} image, 1 sentence: median {1000 * result['median_s']:.1f} ms "
      f"(min {1000 * result['min_s']:.1f}, max {1000 * result['max_s']:.1f}) over {FLAGS.latency_runs} runs; "
      f"median CPU time {1000 * result['median_cpu_s']:.1f} ms per call"
    )
    return
  if FLAGS.checkpoint is None or FLAGS.out is None:
    raise ValueError("--checkpoint and --out are required")
  if (FLAGS.image is None) == (FLAGS.manifest is None):
    raise ValueError("pass exactly one of --image (with --text) or --manifest")
  if FLAGS.manifest is not None and FLAGS.text:
    raise ValueError("--text goes with --image; a --manifest carries its own sentences")
  if FLAGS.image is not None and not FLAGS.text:
    raise ValueError("--image needs at least one --text")
  # The inputs are checked before the model is loaded, so that a wrong path fails at once.
  image = predict.load_image(FLAGS.image) if FLAGS.image is not None else None
  entries = read_manifest(FLAGS.manifest) if FLAGS.manifest is not None else None
  predictor = predict.Predictor.from_checkpoint(
    FLAGS.checkpoint, FLAGS.step, config=FLAGS.config, threshold=FLAGS.threshold
  )
  logging.info("Predicting with %s (threshold %.3f).", predictor.source, predictor.threshold)
  out = fileio.as_path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  if FLAGS.image is not None:
    records = predict_image(predictor, FLAGS.image, FLAGS.text, out, image)
  else:
    records = predict_manifest(predictor, FLAGS.manifest, out, entries)["records"]
  fileio.atomic_write(out / PREDICTIONS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def run() -> None:
  """Console entry point (fcnet-predict)."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()
