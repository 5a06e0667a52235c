"""Reading the raw refer inputs: refs pickles, instances.json, COCO images and annotation masks.

What a user has on disk (docs/data.md, "Raw inputs"): `<refer_root>/<dataset>/refs(<split_by>).p` and
`<refer_root>/<dataset>/instances.json` as the refer downloads unpack, and the COCO train2014 JPEGs. This module
turns them into `RefItem`s, the picklable description of one ref that a shard writer (`input_pipeline.shards`)
needs, and holds the image and mask decoding the converter checks every record with.

SECURITY: the refs files are Python pickles, and loading a pickle can execute arbitrary code. Only load refer
files you trust (e.g. downloaded yourself from the refer authors).
"""

import contextlib
import dataclasses
import io
import os
import pickle
import re
import sys
import tempfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from pycocotools import _mask
from pycocotools import mask as mask_utils

from fcnet_jax import fileio
from input_pipeline import import_tensorflow

# The splits each (dataset, split_by) combination of the refer downloads can have (docs/data.md).
SPLITS: Dict[Tuple[str, str], Tuple[str, ...]] = {
  ("refcoco", "unc"): ("train", "val", "testA", "testB"),
  ("refcoco", "google"): ("train", "val", "test"),
  ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
  ("refcocog", "umd"): ("train", "val", "test"),
  ("refcocog", "google"): ("train", "val"),
}


class BadImageError(ValueError):
  """An image file is missing, corrupt, undecodable or not the size instances.json gives."""


@dataclasses.dataclass(frozen=True)
class RefItem:
  """Everything a shard writer needs to write one ref's record (picklable, no file handles)."""

  ref_id: int
  ann_id: int
  image_id: int
  category_id: int
  sent_ids: Tuple[int, ...]
  sents: Tuple[str, ...]
  bbox: Tuple[float, float, float, float]
  segmentation: object
  height: int
  width: int
  image_path: str


def known_splits(dataset: str, split_by: str) -> Tuple[str, ...]:
  """The splits of a (dataset, split_by) combination; a clear error for an unknown one."""
  if (dataset, split_by) not in SPLITS:
    combos = ", ".join(f"{d}/{s}" for d, s in SPLITS)
    raise ValueError(f"unknown --dataset={dataset!r} / --split_by={split_by!r} combination; known: {combos}")
  return SPLITS[(dataset, split_by)]


def _decode_py2_strings(value):
  """Python 2 byte strings (`str`, read back as `bytes`) as text: UTF-8, else latin-1 (recursively, keys too).

  Python 2 `unicode` objects come back as `str` already and are left exactly as they are.
  """
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      return value.decode("latin-1")
  if isinstance(value, (list, tuple)):
    return type(value)(_decode_py2_strings(v) for v in value)
  if isinstance(value, dict):
    return {_decode_py2_strings(k): _decode_py2_strings(v) for k, v in value.items()}
  return value


def load_refs(path: str) -> List[dict]:
  """Loads a refer `refs(<split_by>).p` pickle. It executes code if crafted: load only files you trust."""
  with io.BytesIO(fileio.as_path(path).read_bytes()) as f:  # Local or remote (gs://…).
    try:
      refs = pickle.load(f)
    except UnicodeDecodeError:
      # Written by Python 2 with non-ASCII byte strings: read those as bytes, then decode them (UTF-8 first).
      f.seek(0)
      refs = _decode_py2_strings(pickle.load(f, encoding="bytes"))
  if not isinstance(refs, list):
    raise ValueError(f"{path}: expected a list of ref dicts, got {type(refs).__name__}")
  required = ("ref_id", "ann_id", "image_id", "category_id", "split", "sentences")
  for i, ref in enumerate(refs):
    missing = [k for k in required if not isinstance(ref, dict) or k not in ref]
    if missing:
      raise ValueError(f"{path}: ref #{i} lacks {missing}")
  return refs


def load_instances(path: str) -> Tuple[Dict[int, dict], Dict[int, dict]]:
  """(annotations by id, images by id) of a COCO-format instances.json."""
  instances = fileio.read_json(path)
  missing = [key for key in ("annotations", "images") if key not in instances]
  if missing:
    raise ValueError(f"{path} has no {missing} list(s): not a COCO instances file")
  return ({ann["id"]: ann for ann in instances["annotations"]}, {image["id"]: image for image in instances["images"]})


def resolve_image_dir(coco_images: str, sample_file_name: Optional[str]) -> str:
  """The folder holding the JPEGs: `coco_images` itself or its `train2014/` subfolder."""
  if not fileio.as_path(coco_images).is_dir():
    raise FileNotFoundError(f"--coco_images={coco_images} is not a directory")
  candidates = [os.path.join(coco_images, "train2014"), coco_images]
  if sample_file_name is not None:
    for folder in candidates:
      if fileio.as_path(folder, sample_file_name).is_file():
        return folder
  return candidates[0] if fileio.as_path(candidates[0]).is_dir() else coco_images


def ref_items(
  refs: Sequence[dict], anns: Dict[int, dict], images: Dict[int, dict], image_dir: str, where: str
) -> List[RefItem]:
  """The `RefItem`s of `refs`, checked against instances.json; errors name `where` (the refs file) and the ref."""
  items = []
  for ref in refs:
    ann = anns.get(ref["ann_id"])
    if ann is None:
      raise ValueError(
        f"{where}: ref_id={ref['ref_id']} refers to ann_id={ref['ann_id']}, which is not in instances.json"
      )
    if ann["image_id"] != ref["image_id"]:
      raise ValueError(
        f"{where}: ref_id={ref['ref_id']} has image_id={ref['image_id']} but its annotation "
        f"{ann['id']} belongs to image_id={ann['image_id']}"
      )
    image = images.get(ref["image_id"])
    if image is None:
      raise ValueError(f"{where}: image_id={ref['image_id']} of ref_id={ref['ref_id']} is not in instances.json")
    if not ref["sentences"]:
      raise ValueError(f"{where}: ref_id={ref['ref_id']} has no sentences")
    if any(not isinstance(s, dict) or "sent" not in s or "sent_id" not in s for s in ref["sentences"]):
      raise ValueError(f"{where}: a sentence of ref_id={ref['ref_id']} lacks 'sent' or 'sent_id'")
    items.append(
      RefItem(
        ref_id=int(ref["ref_id"]),
        ann_id=int(ref["ann_id"]),
        image_id=int(ref["image_id"]),
        category_id=int(ref["category_id"]),
        sent_ids=tuple(int(s["sent_id"]) for s in ref["sentences"]),
        sents=tuple(str(s["sent"]) for s in ref["sentences"]),
        bbox=tuple(float(v) for v in ann["bbox"]),
        segmentation=ann["segmentation"],
        height=int(image["height"]),
        width=int(image["width"]),
        image_path=os.path.join(image_dir, image["file_name"]),
      )
    )
  return items


def decode_annotation_mask(segmentation, height: int, width: int, where: str = "annotation") -> np.ndarray:
  """H×W uint8 0/1 mask of a COCO segmentation, decoded as COCO's `annToRLE` + `decode` do.

  Polygon lists (several polygons are merged), RLE with uncompressed list counts (iscrowd) and RLE with
  compressed string counts are supported. A list is always read as polygons, also when its first polygon has only
  4 coordinates (pycocotools' `frPyObjects` would take such a list for bounding boxes and fail).
  """
  if isinstance(segmentation, list):
    if not segmentation:
      raise ValueError(f"{where}: empty segmentation")
  elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
    if [int(s) for s in segmentation["size"]] != [height, width]:
      raise ValueError(f"{where}: RLE size {segmentation['size']} differs from the image's [{height}, {width}]")
  else:
    raise ValueError(f"{where}: unsupported segmentation of type {type(segmentation).__name__}")
  try:
    if isinstance(segmentation, list):
      # pycocotools' polygon rasteriser, called directly (frPyObjects dispatches on the first polygon's length).
      rle = mask_utils.merge(_mask.frPoly([[float(v) for v in p] for p in segmentation], height, width))
    elif isinstance(segmentation["counts"], list):
      rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
      rle = segmentation
    return mask_utils.decode(rle)
  except Exception as e:  # pylint: disable=broad-except  (pycocotools raises TypeError, ValueError, …)
    raise ValueError(f"{where}: cannot decode its segmentation ({type(e).__name__}: {e})") from e


def _one_line(message: str) -> str:
  """A library's error message on one line, without TF's "{{function_node …}}" prefix and "[Op:…]" suffix."""
  return " ".join(re.sub(r"\{\{.*?\}\}|\[Op:\w+\]", "", message).split())


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[List[str]]:
  """Captures what native code writes to file descriptor 2 in the block (the list gets the text at the end).

  libjpeg inside TensorFlow prints its own messages there ("Improper call to JPEG library in state 201") when
  a JPEG is corrupt; the converter reports them in its one error line instead.
  """
  sys.stderr.flush()
  captured: List[str] = []
  with tempfile.TemporaryFile() as capture:
    saved = os.dup(2)
    os.dup2(capture.fileno(), 2)
    try:
      yield captured
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      captured.append(capture.read().decode("utf-8", errors="replace"))


def load_image(path: str, height: int, width: int) -> Tuple[bytes, bool]:
  """The bytes to store for an image, and whether they were re-encoded; BadImageError when unusable.

  The check is the pipeline's own decode, tf.io.decode_image(channels=3, expand_animations=False), in the stored
  pixel frame (EXIF ignored). Files TF rejects but PIL reads completely are re-encoded as lossless RGB PNG.
  """
  tf = import_tensorflow()
  try:
    data = fileio.as_path(path).read_bytes()
  except FileNotFoundError:
    raise BadImageError(f"image file {path} is missing") from None
  except OSError as e:
    raise BadImageError(f"image file {path} cannot be read: {e}") from None
  reencoded = False
  try:
    with _native_stderr_captured() as native_messages:
      shape = tuple(tf.io.decode_image(data, channels=3, expand_animations=False).shape)
    if native_messages[0]:  # Warnings about an image TF could decode: shown as they would have been.
      sys.stderr.write(native_messages[0])
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as tf_error:
    try:
      with Image.open(io.BytesIO(data)) as image:
        image.load()  # Raises on truncated data (PIL does not pad truncated files by default).
        rgb = image.convert("RGB")
    except Exception as pil_error:  # pylint: disable=broad-except
      libjpeg = "; ".join(dict.fromkeys(_one_line(m) for m in native_messages[0].splitlines() if m.strip()))
      tf_message = _one_line(tf_error.message) or type(tf_error).__name__
      raise BadImageError(
        f"image file {path} is corrupt or truncated (TensorFlow: {tf_message}"
        f"{f' [{libjpeg}]' if libjpeg else ''}; PIL: {_one_line(str(pil_error))})"
      ) from None
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    data, shape, reencoded = buffer.getvalue(), (rgb.height, rgb.width, 3), True
  if shape != (height, width, 3):
    raise BadImageError(
      f"image file {path} decodes to {shape[0]}×{shape[1]}×{shape[2]} (stored pixel frame, "
      f"EXIF ignored) but instances.json says height×width = {height}×{width}"
    )
  return data, reencoded
