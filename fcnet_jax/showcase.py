"""What a finished training run shows its user: held-out examples drawn, and the commands to use the model.

`python main.py --workdir=W` ends with `after_training(W)`, which runs
  `write_overlays(W, predictor)`   W/overlays.png: a grid of held-out (ref, sentence) pairs of the first evaluation
                                   split, one per image: image | ground truth | prediction in the original frame,
                                   the sentence and the pair's IoU written under each row; and W/examples/: the
                                   images (their original bytes), ground-truth masks and a manifest.jsonl of those
                                   pairs, which the demo offers as examples and `next_steps` points the predict
                                   command at;
  `next_steps(W)`                  (printed) the exact commands to predict on one of those images with its sentence,
                                   to score all of them, and to open the browser demo (`fcnet_jax.tools.demo`) on
                                   the model just trained.

The pairs come from the converted evaluation shards the run was scored on (`config.data.tfrecord_dir`, or the
synthetic shards in the workdir): the records hold the original image bytes and the ground-truth mask in the
image's stored frame. Reading them needs TensorFlow, imported here only inside `held_out_examples`; the rest of
this module, and everything the demo reads from W/examples/, imports without it.
"""

import dataclasses
import io
import json
import os
import shlex
import sys
from typing import Any, List, Optional, Sequence

import numpy as np
from PIL import Image

from fcnet_jax import data as data_lib
from fcnet_jax import fileio
from fcnet_jax import run_config

OVERLAYS_FILE = "overlays.png"
EXAMPLES_DIR = "examples"
MANIFEST_FILE = "manifest.jsonl"
CELL = 160  # Each panel of overlays.png fits in CELL×CELL pixels (aspect kept, centred).
CAPTION = 22  # Pixels of caption under each row.
HEADER = 22  # Pixels of column titles at the top.
GAP = 4  # Pixels between panels.
COLUMNS = ("image", "ground truth", "prediction")
GROUND_TRUTH_COLOR = (0, 220, 255)  # Cyan and magenta: not colours of the synthetic shapes.
PREDICTION_COLOR = (255, 0, 200)
BACKGROUND = (255, 255, 255)


@dataclasses.dataclass
class Example:
  """One held-out (ref, sentence) pair in the image's original (stored) frame."""

  image: np.ndarray  # uint8 H×W×3, decoded as evaluation decodes it (EXIF ignored, grey → RGB).
  mask: np.ndarray  # bool H×W, the referred object.
  sentence: str
  encoded: bytes  # the image file as stored in the record (the original JPEG, or a lossless PNG).
  split: str
  ref_id: int
  image_id: int


def eval_data_dir(config: Any, workdir: str) -> Optional[str]:
  """The converted shards the run was evaluated on, without generating anything; None when there are none."""
  candidates = [config.data.tfrecord_dir] if config.data.tfrecord_dir else []
  if config.data.get("synthetic"):
    candidates.append(os.path.join(workdir, data_lib.SYNTHETIC_SHARDS_DIR))
  for candidate in candidates:
    if (fileio.as_path(candidate) / "summary.json").exists():
      return candidate
  return None


def held_out_examples(
  workdir: str, count: int = 8, *, config: Any = None, split: Optional[str] = None
) -> List[Example]:
  """The first `count` refs (one per image, first sentence) of the first evaluation split, in shard order.

  Empty when the run's shards are not on this machine. Imports TensorFlow (the records are TFRecords).
  """
  from input_pipeline import import_tensorflow  # pylint: disable=g-import-not-at-top
  from input_pipeline import metadata  # pylint: disable=g-import-not-at-top
  from input_pipeline import records  # pylint: disable=g-import-not-at-top

  config = config or run_config.load(workdir)
  data_dir = eval_data_dir(config, workdir)
  if data_dir is None or count <= 0:
    return []
  split = split or config.data.eval_splits[0]
  info = metadata.dataset_info(data_dir)
  files = metadata.split_files(data_dir, split, metadata.split_info(info, data_dir, split))
  tf = import_tensorflow()
  examples, seen = [], set()
  for serialized in tf.data.TFRecordDataset(files):
    features = records.parse(serialized, info["context_length"])
    image_id = int(features["image_id"])
    if image_id in seen:
      continue
    seen.add(image_id)
    encoded = features["image/encoded"].numpy()
    examples.append(
      Example(
        image=np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB")),
        mask=np.asarray(Image.open(io.BytesIO(features["mask/encoded"].numpy()))) > 0,
        sentence=features["sentences/sent"].values[0].numpy().decode("utf-8"),
        encoded=encoded,
        split=split,
        ref_id=int(features["ref_id"]),
        image_id=image_id,
      )
    )
    if len(examples) == count:
      break
  return examples


def iou(prediction: np.ndarray, target: np.ndarray) -> float:
  """Intersection over union of two boolean masks, as evaluation scores a pair (`metrics.per_sample_iou`)."""
  from fcnet_jax import metrics  # pylint: disable=g-import-not-at-top

  intersection, union = np.logical_and(prediction, target).sum(), np.logical_or(prediction, target).sum()
  return float(metrics.per_sample_iou(np.asarray([intersection]), np.asarray([union]))[0])


# ----------------------------------------------------------------------------------------------------- drawing


def _fit(image: np.ndarray) -> Image.Image:
  """`image` scaled to fit CELL×CELL (aspect kept) and centred on a blank cell."""
  height, width = image.shape[:2]
  scale = CELL / max(height, width)
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  cell = Image.new("RGB", (CELL, CELL), BACKGROUND)
  cell.paste(Image.fromarray(image).resize(size, Image.BILINEAR), ((CELL - size[0]) // 2, (CELL - size[1]) // 2))
  return cell


def _label(text: str, width: int, height: int) -> np.ndarray:
  """A white strip with `text` written on it the way `visualize.overlay` writes sentences."""
  from fcnet_jax import visualize  # pylint: disable=g-import-not-at-top

  blank = np.full((height, width, 3), 255, np.uint8)
  return visualize.overlay(blank, np.zeros((1, height, width), bool), [text], [(255, 255, 255)])


def overlay_grid(examples: Sequence[Example], predictions: Sequence[np.ndarray]) -> np.ndarray:
  """uint8 image: column titles, then a row per example (image | ground truth | prediction, the masks tinted by
  `visualize.overlay`) with the sentence and the prediction's IoU under it. Every panel is the whole original
  frame fitted to CELL×CELL."""
  from fcnet_jax import visualize  # pylint: disable=g-import-not-at-top

  width = len(COLUMNS) * CELL + (len(COLUMNS) + 1) * GAP
  row_height = CELL + CAPTION
  grid = Image.new("RGB", (width, HEADER + len(examples) * row_height), BACKGROUND)
  for column, title in enumerate(COLUMNS):
    grid.paste(Image.fromarray(_label(title, CELL, HEADER)), (GAP + column * (CELL + GAP), 0))
  for row, (example, predicted) in enumerate(zip(examples, predictions)):
    panels = (
      example.image,
      visualize.overlay(example.image, [example.mask], colors=[GROUND_TRUTH_COLOR]),
      visualize.overlay(example.image, [predicted], colors=[PREDICTION_COLOR]),
    )
    top = HEADER + row * row_height
    for column, panel in enumerate(panels):
      grid.paste(_fit(np.asarray(panel)), (GAP + column * (CELL + GAP), top))
    caption = f'"{example.sentence}"   IoU {iou(predicted, example.mask):.2f}'
    grid.paste(Image.fromarray(_label(caption, width - 2 * GAP, CAPTION)), (GAP, top + CELL))
  return np.asarray(grid)


# ----------------------------------------------------------------------------------------------------- files


def save_examples(examples: Sequence[Example], directory: str) -> str:
  """Writes the examples' images (original bytes), ground-truth masks (PNG, 0/255) and manifest.jsonl (one
  {"image", "text", "mask", "split", "ref_id", "image_id"} per line, paths relative to the manifest); returns the
  manifest's path. The directory is replaced as a whole."""
  with fileio.atomic_output(directory, directory=True, replace=True) as tmp:
    lines = []
    for i, example in enumerate(examples):
      suffix = "jpg" if example.encoded[:3] == b"\xff\xd8\xff" else "png"
      image_name, mask_name = f"{i:02d}.{suffix}", f"{i:02d}_mask.png"
      fileio.atomic_write(tmp / image_name, example.encoded)
      buffer = io.BytesIO()
      Image.fromarray(example.mask.astype(np.uint8) * 255).save(buffer, "PNG")
      fileio.atomic_write(tmp / mask_name, buffer.getvalue())
      record = {"image": image_name, "text": example.sentence, "mask": mask_name, "split": example.split}
      lines.append(json.dumps({**record, "ref_id": example.ref_id, "image_id": example.image_id}))
    fileio.atomic_write(tmp / MANIFEST_FILE, "".join(line + "\n" for line in lines))
  return os.path.join(directory, MANIFEST_FILE)


def read_examples(workdir: str) -> List[dict]:
  """The manifest entries of `<workdir>/examples/` with absolute "image" and "mask" paths; [] when absent."""
  folder = os.path.join(workdir, EXAMPLES_DIR)  # Local or remote (gs://…): plain "/" joins.
  manifest = fileio.as_path(folder, MANIFEST_FILE)
  if not manifest.is_file():
    return []
  entries = []
  for line in filter(str.strip, manifest.read_text(encoding="utf-8").splitlines()):
    entry = json.loads(line)
    for key in ("image", "mask"):
      entry[key] = os.path.join(folder, entry[key])
    entries.append(entry)
  return entries


def write_overlays(workdir: str, predictor: Any, path: Optional[str] = None, count: int = 8) -> Optional[str]:
  """Predicts `count` held-out pairs with `predictor` (a `predict.Predictor`) and writes the grid (`overlay_grid`)
  to `path` (default `<workdir>/overlays.png`) and the pairs to `<workdir>/examples/` (`save_examples`).

  Returns the PNG's path, or None when the run's evaluation shards are not on this machine.
  """
  examples = held_out_examples(workdir, count, config=predictor.config)
  if not examples:
    return None
  predictions = [predictor(example.image, example.sentence)[0].mask for example in examples]
  path = path or os.path.join(workdir, OVERLAYS_FILE)
  buffer = io.BytesIO()
  Image.fromarray(overlay_grid(examples, predictions)).save(buffer, "PNG")
  fileio.atomic_write(path, buffer.getvalue())
  save_examples(examples, os.path.join(workdir, EXAMPLES_DIR))
  return path


def _source_image(workdir: str, entry: dict) -> str:
  """The synthetic dataset's own file of an example when the run generated it, else the copy in examples/."""
  from input_pipeline import synthetic  # pylint: disable=g-import-not-at-top  (no TensorFlow)

  original = os.path.join(workdir, data_lib.SYNTHETIC_RAW_DIR, "images", "train2014")
  original = os.path.join(original, synthetic.image_file_name(int(entry.get("image_id", -1))))
  return original if fileio.as_path(original).is_file() else entry["image"]


def next_steps(workdir: str, *, python: Optional[str] = None) -> str:
  """The exact commands to predict on a held-out image with its sentence and to open the demo on `workdir`.

  The image and sentence are the first of `<workdir>/examples/` (written by `write_overlays`); without them the
  command names placeholders. `python` defaults to this interpreter, so that the commands run as printed.
  """
  workdir = workdir if "://" in str(workdir) else os.path.abspath(workdir)
  python = shlex.quote(python or sys.executable)
  q = shlex.quote
  entries = read_examples(workdir)
  if entries:
    image, text = _source_image(workdir, entries[0]), entries[0]["text"]
    truth = f"  (ground truth: {entries[0]['mask']})"
  else:
    image, text, truth = "YOUR_IMAGE.jpg", "the object you want", ""
  lines = [
    "Use the model you just trained:",
    "  # segment an image: writes the mask (PNG, original size) and an overlay per sentence" + truth,
    f"  {python} -m fcnet_jax.tools.predict --checkpoint={q(workdir)} --image={q(image)} --text={q(text)} "
    f"--out={q(os.path.join(workdir, 'predictions'))}",
  ]
  if entries:
    manifest = os.path.join(workdir, EXAMPLES_DIR, MANIFEST_FILE)
    lines += [
      "  # every held-out example of overlays.png, scored against its ground truth (mIoU, oIoU, Prec@X)",
      f"  {python} -m fcnet_jax.tools.predict --checkpoint={q(workdir)} --manifest={q(manifest)} "
      f"--out={q(os.path.join(workdir, 'predictions_examples'))}",
    ]
  lines += [
    "  # the browser demo (then open http://127.0.0.1:7860)",
    f"  {python} -m fcnet_jax.tools.demo --checkpoint={q(workdir)}",
  ]
  overlays = os.path.join(workdir, OVERLAYS_FILE)
  if fileio.as_path(overlays).is_file():
    lines.append(f"  # held-out examples, image | ground truth | prediction: {overlays}")
  return "\n".join(lines)


def after_training(workdir: str, count: int = 8, predictor: Any = None) -> str:
  """What `main.py` runs after training (process 0 of a single-process run): `write_overlays` with `predictor`
  (default: the best checkpoint's, the latest's when no evaluation chose one), then the `next_steps` text, which it
  returns for printing."""
  if predictor is None:
    from fcnet_jax import checkpoints as checkpoints_lib  # pylint: disable=g-import-not-at-top
    from fcnet_jax import predict  # pylint: disable=g-import-not-at-top

    best = fileio.as_path(workdir, checkpoints_lib.BEST_DIR)
    step = "best" if best.is_dir() and any(path.name.isdigit() for path in best.iterdir()) else "latest"
    predictor = predict.Predictor.from_checkpoint(workdir, step)
  if write_overlays(workdir, predictor, count=count) is None:
    return next_steps(workdir) + "\n  (no overlays.png: the evaluation shards are not on this machine)"
  return next_steps(workdir)
