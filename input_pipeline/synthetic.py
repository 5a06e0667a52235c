"""A small synthetic dataset in the raw RefCOCO (refer) format, for tests and smoke runs.

`generate` writes what the refer downloads and COCO unpack to (docs/data.md, "Raw inputs"):

  <out>/images/train2014/COCO_train2014_<image_id:012d>.jpg
  <out>/<dataset>/refs(<split_by>).p    pickle (protocol 2), a list of ref dicts exactly like the real ones
  <out>/<dataset>/instances.json        COCO format: images, annotations, categories

so `fcnet-convert --refer_root=<out> --coco_images=<out>/images ...` converts it like the real data, for every
(dataset, split_by) of `input_pipeline.refer.SPLITS` (with the splits that combination has). Each image holds
3–5 flat shapes (circle, square, triangle, diamond, cross) in a few colours and two sizes on a textured
background. Every shape that some phrase singles out becomes a ref with 1–3 sentences, each naming
exactly that shape by colour / shape / size words (the majority) or, as a simple minority, by the image half it
lies in ("left", "right", "top", "bottom"). Images deliberately repeat colours and shapes, so a model that ignores
the sentence cannot score well.

Annotations are exact: every mask is first rasterised from the stored polygons by pycocotools (the converter's
own decoder), the shape is painted on exactly those pixels, and RLE annotations are encoded from that mask, so
the pixels an annotation decodes to are the object its sentences name. Shapes never overlap (no occlusion).
Variety the converter must handle: several polygons per object (the cross), RLE with compressed string counts
and with uncompressed list counts (iscrowd=1), grayscale JPEGs (their sentences use no colour words), and image
sides of 48–160 pixels with aspect ratios up to ~1.6 (shapes stay ≥ ~9 pixels wide after a 64×64 letterbox).

Deterministic given the seed: every image draws from its own `np.random.default_rng((seed, index))`.
"""

import io
import json
import math
import os
import pickle
from typing import Dict, List, Optional, Sequence, Tuple

from absl import flags
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from fcnet_jax import cli
from fcnet_jax import fileio
from input_pipeline import refer

# Saturated shape colours; the backgrounds are unsaturated, so colour words stay unambiguous.
COLOURS: Dict[str, Tuple[int, int, int]] = {
  "red": (220, 40, 40),
  "green": (40, 170, 60),
  "blue": (40, 80, 220),
  "yellow": (235, 210, 40),
  "purple": (150, 60, 190),
  "orange": (245, 135, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")  # category_id = index + 1.
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
# Extent (bounding-box side) as a fraction of the image's longer side: small and large never overlap, so a
# reader can tell the size class from the mask's bounding box (threshold ~0.235).
SIZE_EXTENTS = {"small": (0.16, 0.19), "large": (0.28, 0.32)}
POSITION_WORDS = ("left", "right", "top", "bottom")
NOUNS = ("one", "shape", "object", "thing")  # Stand-ins for the shape word when the shape is not named.
# A shape's centre must be this fraction of the image side away from the midline to count as in a half.
POSITION_MARGIN = 0.08
# Attribute subsets a description may use; position phrases add a half to any of them (or to none).
_ATTRIBUTE_SUBSETS = (
  ("shape",),
  ("colour",),
  ("size",),
  ("colour", "shape"),
  ("size", "shape"),
  ("size", "colour"),
  ("size", "colour", "shape"),
)
_POSITION_BASES = ((), ("shape",), ("colour",), ("size",), ("colour", "shape"), ("size", "shape"))


def image_file_name(image_id: int) -> str:
  return f"COCO_train2014_{image_id:012d}.jpg"


def _shape_polygons(shape: str, cx: float, cy: float, extent: float) -> Tuple[List[List[float]], float]:
  """COCO polygons (flat x, y lists, 2-decimal floats) of a shape and its circumradius (pixels)."""
  half = extent / 2
  if shape == "circle":
    angles = np.linspace(0, 2 * np.pi, 28, endpoint=False)
    points = [np.stack([cx + half * np.cos(angles), cy + half * np.sin(angles)], -1)]
    radius = half
  elif shape == "square":
    points = [
      np.array([[cx - half, cy - half], [cx + half, cy - half], [cx + half, cy + half], [cx - half, cy + half]])
    ]
    radius = half * math.sqrt(2)
  elif shape == "triangle":  # Equilateral, base = extent, centred on its circumcentre.
    height = extent * math.sqrt(3) / 2
    points = [np.array([[cx - half, cy + height / 3], [cx + half, cy + height / 3], [cx, cy - 2 * height / 3]])]
    radius = extent / math.sqrt(3)
  elif shape == "diamond":
    points = [np.array([[cx, cy - half], [cx + half, cy], [cx, cy + half], [cx - half, cy]])]
    radius = half
  elif shape == "cross":  # Two overlapping bars: a multi-polygon segmentation, as COCO has for split objects.
    arm = extent / 6
    points = [
      np.array([[cx - half, cy - arm], [cx + half, cy - arm], [cx + half, cy + arm], [cx - half, cy + arm]]),
      np.array([[cx - arm, cy - half], [cx + arm, cy - half], [cx + arm, cy + half], [cx - arm, cy + half]]),
    ]
    radius = math.hypot(half, arm)
  else:
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
  return [[round(float(v), 2) for v in p.reshape(-1)] for p in points], radius


def _uncompressed_rle(mask: np.ndarray) -> Dict[str, object]:
  """COCO's iscrowd RLE with list counts: column-major runs, starting with a run of zeros."""
  flat = mask.reshape(-1, order="F")
  boundaries = np.flatnonzero(np.diff(flat)) + 1
  runs = np.diff(np.concatenate([[0], boundaries, [flat.size]])).tolist()
  if flat[0]:
    runs = [0] + runs
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def _background(rng: np.random.Generator, height: int, width: int, grayscale: bool) -> np.ndarray:
  """H×W×3 float texture: low-frequency blotches, faint stripes and pixel noise, all unsaturated."""
  if grayscale:  # Dark, so every shape colour keeps luminance contrast once converted to gray.
    base = np.full(3, rng.uniform(20, 40))
    amplitude = 6.0
  else:
    base = rng.uniform(105, 155) + rng.uniform(-12, 12, size=3)
    amplitude = 18.0
  cells = rng.normal(0, amplitude, size=(rng.integers(3, 7), rng.integers(3, 7))).astype(np.float32)
  blotches = np.asarray(Image.fromarray(cells).resize((width, height), Image.BILINEAR))
  yy, xx = np.mgrid[0:height, 0:width]
  angle, period = rng.uniform(0, np.pi), rng.uniform(6, 14)
  stripes = 0.4 * amplitude * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
  noise = rng.normal(0, amplitude / 3, size=(height, width, 3))
  return base + (blotches + stripes)[..., None] + noise


def _place_objects(rng: np.random.Generator, height: int, width: int) -> List[Dict[str, object]]:
  """3–5 non-overlapping shapes (bounding circles ≥ 2 px apart) with repeated colours and shapes."""
  longer = max(height, width)
  colours = rng.choice(list(COLOURS), size=rng.integers(2, 4), replace=False)
  shapes = rng.choice(SHAPES, size=rng.integers(2, 4), replace=False)
  objects = []
  for _ in range(int(rng.integers(3, 6))):
    for _ in range(4):  # Mostly redraw exact twins, which only a position phrase could tell apart.
      size, shape, colour = str(rng.choice(list(SIZE_EXTENTS))), str(rng.choice(shapes)), str(rng.choice(colours))
      if all((o["size"], o["shape"], o["colour"]) != (size, shape, colour) for o in objects):
        break
    extent = longer * rng.uniform(*SIZE_EXTENTS[size])
    for _ in range(100):
      cx = rng.uniform(extent / 2 + 1, width - extent / 2 - 1)
      cy = rng.uniform(extent / 2 + 1, height - extent / 2 - 1)
      polygons, radius = _shape_polygons(shape, cx, cy, extent)
      if all(math.hypot(cx - o["cx"], cy - o["cy"]) >= radius + o["radius"] + 2 for o in objects):
        objects.append(
          {"shape": shape, "colour": colour, "size": size, "cx": cx, "cy": cy, "radius": radius, "polygons": polygons}
        )
        break
  return objects


def _half(obj: Dict[str, object], direction: str, height: int, width: int) -> Optional[bool]:
  """True / False when the shape's centre is clearly in / out of the half; None when too close to call."""
  if direction in ("left", "right"):
    offset = (obj["cx"] - width / 2) / width
  else:
    offset = (obj["cy"] - height / 2) / height
  if abs(offset) < POSITION_MARGIN:
    return None
  return (offset < 0) == (direction in ("left", "top"))


def _descriptions(
  objects: Sequence[Dict[str, object]], target: int, grayscale: bool, height: int, width: int
) -> Tuple[List[Tuple[str, ...]], List[Tuple[Tuple[str, ...], str]]]:
  """The attribute subsets and (subset, half) pairs that single out `objects[target]`."""
  allowed = lambda subset: not (grayscale and "colour" in subset)
  me = objects[target]

  def matching(subset):
    return [o for o in objects if all(o[k] == me[k] for k in subset)]

  attributes = [s for s in _ATTRIBUTE_SUBSETS if allowed(s) and len(matching(s)) == 1]
  positions = []
  for subset in filter(allowed, _POSITION_BASES):
    others = [o for o in matching(subset) if o is not me]
    if not others:
      continue  # The attributes alone suffice; a position phrase would not be needed.
    for direction in POSITION_WORDS:
      # Unambiguous even under a small error in reading the position: the others are clearly out of the half.
      if _half(me, direction, height, width) and all(_half(o, direction, height, width) is False for o in others):
        positions.append((subset, direction))
  return attributes, positions


def _phrase(
  rng: np.random.Generator, obj: Dict[str, object], subset: Sequence[str], direction: Optional[str] = None
) -> str:
  """A lower-case referring phrase naming `obj` by the attributes in `subset` (and a half)."""
  words = []
  if "size" in subset:
    words.append(str(rng.choice(SIZE_WORDS[obj["size"]])))
  if "colour" in subset:
    words.append(obj["colour"])
  words.append(obj["shape"] if "shape" in subset else str(rng.choice(NOUNS)))
  description = " ".join(words)
  if direction is None:
    templates = ("{d}", "the {d}")
  elif direction in ("left", "right"):  # Not "{p} {d}": "right triangle" names another thing.
    templates = ("{d} on the {p}", "the {d} on the {p}")
  else:
    templates = ("{d} at the {p}", "the {d} at the {p}", "{p} {d}", "the {p} {d}")
  return str(rng.choice(templates)).format(d=description, p=direction)


def _sentences(rng: np.random.Generator, obj: Dict[str, object], attributes, positions) -> List[str]:
  """1–3 distinct sentences; position phrases only when no attribute works, or as an occasional extra."""
  count = int(rng.integers(1, 4))
  use_position = bool(positions) and (not attributes or rng.random() < 0.1)
  sentences: List[str] = []
  for _ in range(20):
    if len(sentences) == count - use_position or not attributes:
      break
    phrase = _phrase(rng, obj, attributes[rng.integers(len(attributes))])
    if phrase not in sentences:
      sentences.append(phrase)
  for _ in range(20 if use_position else 0):
    subset, direction = positions[rng.integers(len(positions))]
    phrase = _phrase(rng, obj, subset, direction)
    if phrase not in sentences:
      sentences.append(phrase)
      if len(sentences) == count or attributes:
        break
  return sentences


def _raw(rng: np.random.Generator, sent: str) -> str:
  """A refer-style raw sentence: the annotator's capitalisation and punctuation around `sent`."""
  raw = sent[0].upper() + sent[1:] if rng.random() < 0.5 else sent
  return raw + "." if rng.random() < 0.3 else raw


def _generate_image(seed: int, index: int, image_id: int) -> Dict[str, object]:
  """One image: pixels, objects with their exact masks, and the per-object sentences."""
  rng = np.random.default_rng((seed, index))
  grayscale = index % 10 == 3  # Deterministic, so every split of ≥ 4 images has one.
  for _ in range(100):
    longer = int(rng.integers(72, 161))
    shorter = max(48, int(round(longer * rng.uniform(0.62, 1.0))))
    height, width = (longer, shorter) if rng.random() < 0.5 else (shorter, longer)
    objects = _place_objects(rng, height, width)
    if len(objects) >= 3:
      break
  else:
    raise RuntimeError(f"could not place 3 shapes in image {index} (seed {seed})")

  pixels = _background(rng, height, width, grayscale)
  covered = np.zeros((height, width), bool)
  for obj in objects:
    rle = mask_utils.merge(mask_utils.frPyObjects(obj["polygons"], height, width))
    obj["mask"] = mask_utils.decode(rle)
    if not obj["mask"].any() or (covered & (obj["mask"] > 0)).any():
      raise AssertionError(f"shape masks must be non-empty and disjoint (image {index}, seed {seed})")
    covered |= obj["mask"] > 0
    colour = np.array(COLOURS[obj["colour"]], np.float64)
    noisy = colour + rng.normal(0, 5, size=(height, width, 3))
    pixels = np.where(obj["mask"][..., None] > 0, noisy, pixels)
  image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
  if grayscale:
    image = image.convert("L")

  for i, obj in enumerate(objects):
    attributes, positions = _descriptions(objects, i, grayscale, height, width)
    obj["sentences"] = _sentences(rng, obj, attributes, positions) if attributes or positions else []
    obj["raw"] = [_raw(rng, s) for s in obj["sentences"]]
  return {
    "image_id": image_id,
    "height": height,
    "width": width,
    "image": image,
    "objects": objects,
    "grayscale": grayscale,
  }


def _segmentation(obj: Dict[str, object], kind: str) -> Dict[str, object]:
  """The annotation's segmentation fields for `kind` in ("polygon", "rle_string", "rle_list")."""
  if kind == "polygon":
    return {"segmentation": obj["polygons"], "iscrowd": 0}
  if kind == "rle_string":
    rle = mask_utils.encode(np.asfortranarray(obj["mask"]))
    return {
      "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
      "iscrowd": 1,
    }
  return {"segmentation": _uncompressed_rle(obj["mask"]), "iscrowd": 1}


def generate(
  out_dir: str,
  *,
  seed: int = 0,
  num_train_images: int = 100,
  num_eval_images: int = 28,
  dataset: str = "refcoco",
  split_by: str = "unc",
  splits: Optional[Sequence[str]] = None,
) -> Dict[str, object]:
  """Writes a synthetic refer-format dataset under `out_dir` (see the module docstring for the layout).

  Args:
    out_dir: output root; `images/train2014/` and `<dataset>/` are created inside it.
    seed: everything written is a deterministic function of the seed and the arguments.
    num_train_images: images of the first split (~3.5 refs each).
    num_eval_images: images of every other split.
    dataset, split_by: name the refs file `<dataset>/refs(<split_by>).p` (config.data.dataset / split_by).
    splits: split names in order, the first being the training split; default: the splits of (dataset,
      split_by) in `input_pipeline.refer.SPLITS` (an unknown combination is then an error).

  Returns:
    A summary: paths, and per split the number of images, refs and sentences, plus counts of grayscale images,
    position sentences, multi-polygon and RLE (string / list counts) annotations.
  """
  if splits is None:
    splits = refer.known_splits(dataset, split_by)
  image_dir = os.path.join(out_dir, "images", "train2014")
  refer_dir = os.path.join(out_dir, dataset)
  fileio.as_path(image_dir).mkdir(parents=True, exist_ok=True)
  fileio.as_path(refer_dir).mkdir(parents=True, exist_ok=True)

  counts = {s: {"images": 0, "refs": 0, "sentences": 0} for s in splits}
  stats = {
    "grayscale_images": 0,
    "position_sentences": 0,
    "multi_polygon_annotations": 0,
    "rle_string_annotations": 0,
    "rle_list_annotations": 0,
  }
  images, annotations, refs = [], [], []
  next_ann_id, next_sent_id = 500000, 0
  split_of_image = [splits[0]] * num_train_images + [s for s in splits[1:] for _ in range(num_eval_images)]
  for index, split in enumerate(split_of_image):
    image_id = 9 + 7 * index  # COCO-like sparse ids.
    item = _generate_image(seed, index, image_id)
    encoded = io.BytesIO()  # PIL writes local files only; out_dir may be remote (gs://…).
    item["image"].save(encoded, "JPEG", quality=90)
    fileio.atomic_write(os.path.join(image_dir, image_file_name(image_id)), encoded.getvalue())
    images.append(
      {"id": image_id, "file_name": image_file_name(image_id), "height": item["height"], "width": item["width"]}
    )
    counts[split]["images"] += 1
    stats["grayscale_images"] += item["grayscale"]
    for obj in item["objects"]:
      ann_id, next_ann_id = next_ann_id, next_ann_id + 1
      # Every 7th annotation is RLE with string counts, the one 2 later RLE with list counts.
      kind = {3: "rle_string", 5: "rle_list"}.get(ann_id % 7, "polygon")
      stats["multi_polygon_annotations"] += kind == "polygon" and len(obj["polygons"]) > 1
      if kind != "polygon":
        stats[f"{kind}_annotations"] += 1
      rle = mask_utils.encode(np.asfortranarray(obj["mask"]))
      annotations.append(
        {
          "id": ann_id,
          "image_id": image_id,
          "category_id": SHAPES.index(obj["shape"]) + 1,
          "bbox": [float(v) for v in mask_utils.toBbox(rle)],
          "area": float(mask_utils.area(rle)),
          **_segmentation(obj, kind),
        }
      )
      if not obj["sentences"]:
        continue  # No phrase singles this shape out: annotated, but not referred to.
      sentences = []
      for sent, raw in zip(obj["sentences"], obj["raw"]):
        sentences.append({"sent_id": next_sent_id, "raw": raw, "sent": sent, "tokens": sent.split()})
        next_sent_id += 1
        stats["position_sentences"] += any(w in POSITION_WORDS for w in sent.split())
      refs.append(
        {
          "ref_id": len(refs),
          "ann_id": ann_id,
          "image_id": image_id,
          "category_id": SHAPES.index(obj["shape"]) + 1,
          "split": split,
          "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
          "sent_ids": [s["sent_id"] for s in sentences],
          "sentences": sentences,
        }
      )
      counts[split]["refs"] += 1
      counts[split]["sentences"] += len(sentences)

  instances = {
    "images": images,
    "annotations": annotations,
    "categories": [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)],
  }
  refs_path = os.path.join(refer_dir, f"refs({split_by}).p")
  instances_path = os.path.join(refer_dir, "instances.json")
  fileio.atomic_write(refs_path, pickle.dumps(refs, protocol=2))
  fileio.atomic_write(instances_path, json.dumps(instances))
  return {
    "refs_file": refs_path,
    "instances_file": instances_path,
    "image_dir": image_dir,
    "seed": seed,
    "splits": counts,
    **stats,
  }


def define_flags() -> None:
  """The command-line flags of `main` (defined by `run`, so that importing this module defines none)."""
  flags.DEFINE_string("out", None, "Output root (images/train2014/ and <dataset>/ inside).")
  flags.DEFINE_integer("seed", 0, "Everything written is a deterministic function of the seed and the sizes.")
  flags.DEFINE_integer("num_train_images", 100, "Images of the training split (~3.5 refs each).")
  flags.DEFINE_integer("num_eval_images", 28, "Images of each evaluation split.")
  flags.DEFINE_string("dataset", "refcoco", "Folder name: refcoco, refcoco+ or refcocog.")
  flags.DEFINE_string("split_by", "unc", "Refs file suffix: unc, google or umd.")
  flags.mark_flags_as_required(["out"])


def main(argv: Sequence[str]) -> None:
  del argv  # Checked by cli.run.
  args = flags.FLAGS
  summary = generate(
    args.out,
    seed=args.seed,
    num_train_images=args.num_train_images,
    num_eval_images=args.num_eval_images,
    dataset=args.dataset,
    split_by=args.split_by,
  )
  print(json.dumps(summary, indent=2))


def run() -> None:
  """Command-line entry point (python -m input_pipeline.synthetic --out=DIR)."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()
