"""Converts raw RefCOCO / RefCOCO+ / RefCOCOg (refer) annotations and COCO images into TFRecord shards.

  python -m input_pipeline.convert --refer_root=DIR --coco_images=DIR --dataset=refcoco --split_by=unc \\
      --out=DIR [--splits=train,val] [--num_workers=N] [--skip_bad_images] [--shard_size=256]

Inputs (protocol.md "Raw inputs a user has on disk"): `--refer_root` holds one folder per dataset as the refer
downloads unpack (`refcoco/refs(unc).p`, `refcoco/instances.json`, `refcocog/refs(umd).p`, ...); `--coco_images`
is the folder of COCO train2014 JPEGs or its parent (with a `train2014/` subfolder).

SECURITY: the refs files are Python pickles, and loading a pickle can execute arbitrary code. Only convert refer
files you trust (e.g. downloaded yourself from the refer authors).

Output: one `tf.train.Example` per ref, in the layout and with the features of `input_pipeline.records`, plus
`image/reencoded` (int64, 1 when the image could not be stored as its original bytes, see below; readers that
parse with `records.feature_spec()` ignore it). `<out>/summary.json` records dataset, split_by, context_length
(77) and per split the refs, sentences and shards (and refs skipped / re-encoded); the counts are checked
against the records read back from disk before it is written, and an existing summary is merged, so splits may be
converted by separate runs.

Why plain TFRecord shards and not a TFDS builder: the shards are read per host with plain tf.data file sharding,
there is no TFDS registry / download / version machinery to configure for data that users must fetch by hand,
and the converter can resume shard by shard.

What a record holds and why:
  * the image as its original file bytes: decoding happens in the stored pixel frame (EXIF orientation is
    ignored by tf.io.decode_image, and COCO's masks are drawn in that frame). Grayscale and CMYK JPEGs decode
    to 3-channel RGB in tf.io.decode_image(channels=3) (TF converts Adobe CMYK like PIL does), so they are kept
    as they are. A file TF cannot decode but PIL can (e.g. a TIFF named .jpg) is re-encoded losslessly as an RGB
    PNG (`image/reencoded` = 1). The decoded size must equal instances.json's height×width, else the image is bad.
  * the referred annotation's mask as a single-channel 0/1 PNG, decoded as COCO's API does (`annToRLE`): polygon
    lists through `frPyObjects` + `merge`, RLE with uncompressed list counts through `frPyObjects`, RLE with
    compressed string counts directly.
  * every sentence (`sent`, the normalized text) with its id and its 77 CLIP token ids (fcnet_jax.tokenizer).
A missing, truncated or undecodable image is an error naming the file; with --skip_bad_images its refs are
skipped and counted instead.

Resumability: refs of a split are sorted by (image_id, ref_id) and cut into contiguous shards of `shard_size`,
a deterministic function of the refs file and `shard_size`. Each shard is written to `<shard>.tmp` and renamed
when complete, so a rerun skips every shard whose final file exists (after reading it back) and rewrites the
rest. Shards are spread over `num_workers` processes, spawned (not forked: TensorFlow's thread pools do not
survive a fork), so a script that calls `convert(..., num_workers > 1)` must do so under
`if __name__ == "__main__":`.
"""
import argparse
import concurrent.futures
import dataclasses
import io
import json
import logging
import math
import multiprocessing
import os
import pickle
import re
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import tqdm

from input_pipeline import records

# The splits each (dataset, split_by) combination of the refer downloads can have (protocol.md).
SPLITS: Dict[Tuple[str, str], Tuple[str, ...]] = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco", "google"): ("train", "val", "test"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}
DEFAULT_SHARD_SIZE = 256  # ~40 MB of COCO images per shard; RefCOCO train -> 166 shards.
REENCODED_FEATURE = "image/reencoded"


class BadImageError(ValueError):
  """An image file is missing, corrupt, undecodable or not the size instances.json gives."""


@dataclasses.dataclass(frozen=True)
class RefItem:
  """Everything the worker needs to write one ref's record (picklable, no file handles)."""
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


@dataclasses.dataclass(frozen=True)
class ShardTask:
  """One shard to write: its final path and its refs in order."""
  path: str
  items: Tuple[RefItem, ...]
  skip_bad_images: bool


@dataclasses.dataclass(frozen=True)
class ShardResult:
  """What a shard holds, as read back from disk after writing (or instead of rewriting it)."""
  path: str
  written: bool                  # False: the shard existed and was only read back.
  ref_ids: Tuple[int, ...]       # Read back from the file, in order.
  sentences: int                 # Read back from the file.
  reencoded: int                 # Records whose image was re-encoded (read back).
  skipped: Tuple[Tuple[int, str], ...]  # (ref_id, reason) of refs skipped in this run.


def _import_tf():
  """TensorFlow for file I/O and image checks only: quiet, and never holding a GPU."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF was already initialised by the caller; its device choice stands.
    pass
  return tf


def known_splits(dataset: str, split_by: str) -> Tuple[str, ...]:
  """The splits of a (dataset, split_by) combination; a clear error for an unknown one."""
  if (dataset, split_by) not in SPLITS:
    combos = ", ".join(f"{d}/{s}" for d, s in SPLITS)
    raise ValueError(f"unknown --dataset={dataset!r} / --split_by={split_by!r} combination; known: {combos}")
  return SPLITS[(dataset, split_by)]


def _repair_latin1(value):
  """Undoes the latin-1 decoding of Python 2 byte strings that hold UTF-8 text (recursively).

  A string that is not valid UTF-8 once encoded as latin-1 was not UTF-8 bytes and stays as it is.
  """
  if isinstance(value, str):
    try:
      return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
      return value
  if isinstance(value, list):
    return [_repair_latin1(v) for v in value]
  if isinstance(value, dict):
    return {_repair_latin1(k): _repair_latin1(v) for k, v in value.items()}
  return value


def load_refs(path: str) -> List[dict]:
  """Loads a refer `refs(<split_by>).p` pickle. It executes code if crafted: load only files you trust."""
  with open(path, "rb") as f:
    try:
      refs = pickle.load(f)
    except UnicodeDecodeError:
      # Written by Python 2 with non-ASCII byte strings: read them as latin-1, then recover their UTF-8.
      f.seek(0)
      refs = _repair_latin1(pickle.load(f, encoding="latin-1"))
  if not isinstance(refs, list):
    raise ValueError(f"{path}: expected a list of ref dicts, got {type(refs).__name__}")
  required = ("ref_id", "ann_id", "image_id", "category_id", "split", "sentences")
  for i, ref in enumerate(refs):
    missing = [k for k in required if not isinstance(ref, dict) or k not in ref]
    if missing:
      raise ValueError(f"{path}: ref #{i} lacks {missing}")
  return refs


def resolve_image_dir(coco_images: str, sample_file_name: Optional[str]) -> str:
  """The folder holding the JPEGs: `coco_images` itself or its `train2014/` subfolder."""
  if not os.path.isdir(coco_images):
    raise FileNotFoundError(f"--coco_images={coco_images} is not a directory")
  candidates = [os.path.join(coco_images, "train2014"), coco_images]
  if sample_file_name is not None:
    for folder in candidates:
      if os.path.isfile(os.path.join(folder, sample_file_name)):
        return folder
  return candidates[0] if os.path.isdir(candidates[0]) else coco_images


def decode_annotation_mask(segmentation, height: int, width: int, where: str = "annotation") -> np.ndarray:
  """H×W uint8 0/1 mask of a COCO segmentation, decoded as COCO's `annToRLE` + `decode` do.

  Polygon lists (several polygons are merged), RLE with uncompressed list counts (iscrowd) and RLE with
  compressed string counts are supported.
  """
  if isinstance(segmentation, list):
    if not segmentation:
      raise ValueError(f"{where}: empty segmentation")
    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
  elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
    if [int(s) for s in segmentation["size"]] != [height, width]:
      raise ValueError(f"{where}: RLE size {segmentation['size']} differs from the image's [{height}, {width}]")
    if isinstance(segmentation["counts"], list):
      rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
      rle = segmentation
  else:
    raise ValueError(f"{where}: unsupported segmentation of type {type(segmentation).__name__}")
  return mask_utils.decode(rle)


def encode_mask_png(mask: np.ndarray) -> bytes:
  """Single-channel PNG of an H×W 0/1 mask (values stay 0/1)."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(mask, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def load_image(path: str, height: int, width: int, tf) -> Tuple[bytes, bool]:
  """The bytes to store for an image, and whether they were re-encoded; BadImageError when unusable.

  The check is the pipeline's own decode, tf.io.decode_image(channels=3, expand_animations=False), in the stored
  pixel frame (EXIF ignored). Files TF rejects but PIL reads completely are re-encoded as lossless RGB PNG.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise BadImageError(f"image file {path} is missing") from None
  except OSError as e:
    raise BadImageError(f"image file {path} cannot be read: {e}") from None
  reencoded = False
  try:
    shape = tuple(tf.io.decode_image(data, channels=3, expand_animations=False).shape)
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as tf_error:
    try:
      with Image.open(io.BytesIO(data)) as image:
        image.load()  # Raises on truncated data (PIL does not pad truncated files by default).
        rgb = image.convert("RGB")
    except Exception as pil_error:  # pylint: disable=broad-except
      # TF prefixes its messages with "{{function_node ...}}" and ends them with "[Op:DecodeImage]".
      tf_message = re.sub(r"\{\{.*?\}\}|\[Op:\w+\]", "", tf_error.message).strip() or type(tf_error).__name__
      raise BadImageError(f"image file {path} is corrupt or truncated (TensorFlow: {tf_message}; "
                          f"PIL: {pil_error})") from None
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    data, shape, reencoded = buffer.getvalue(), (rgb.height, rgb.width, 3), True
  if shape != (height, width, 3):
    raise BadImageError(f"image file {path} decodes to {shape[0]}×{shape[1]}×{shape[2]} (stored pixel frame, "
                        f"EXIF ignored) but instances.json says height×width = {height}×{width}")
  return data, reencoded


def make_example(item: RefItem, image_bytes: bytes, reencoded: bool, mask_png: bytes, tokens: np.ndarray, tf):
  """The `tf.train.Example` of one ref (records.py layout); tokens: N×77 int."""
  feature = tf.train.Feature
  ints = lambda values: feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
  raw = lambda values: feature(bytes_list=tf.train.BytesList(value=list(values)))
  return tf.train.Example(features=tf.train.Features(feature={
      "image/encoded": raw([image_bytes]),
      "image/height": ints([item.height]),
      "image/width": ints([item.width]),
      REENCODED_FEATURE: ints([reencoded]),
      "mask/encoded": raw([mask_png]),
      "ref_id": ints([item.ref_id]),
      "ann_id": ints([item.ann_id]),
      "image_id": ints([item.image_id]),
      "category_id": ints([item.category_id]),
      "bbox": feature(float_list=tf.train.FloatList(value=[float(v) for v in item.bbox])),
      "sentences/sent": raw([s.encode("utf-8") for s in item.sents]),
      "sentences/sent_id": ints(item.sent_ids),
      "sentences/tokens": ints(np.asarray(tokens).reshape(-1)),
  }))


def read_back(path: str, tf) -> Tuple[Tuple[int, ...], int, int]:
  """(ref_ids in order, total sentences, re-encoded records) of a shard, read from disk."""
  spec = {"ref_id": tf.io.FixedLenFeature([], tf.int64),
          "sentences/sent_id": tf.io.VarLenFeature(tf.int64),
          REENCODED_FEATURE: tf.io.FixedLenFeature([], tf.int64, default_value=0)}

  def parse(serialized):
    example = tf.io.parse_single_example(serialized, spec)
    return example["ref_id"], tf.size(example["sentences/sent_id"].values), example[REENCODED_FEATURE]

  ref_ids, sentences, reencoded = [], 0, 0
  try:
    for ids, counts, flags in tf.data.TFRecordDataset(path).map(parse).batch(1024).as_numpy_iterator():
      ref_ids.extend(int(i) for i in ids)
      sentences += int(counts.sum())
      reencoded += int(flags.sum())
  except tf.errors.OpError as e:
    raise RuntimeError(f"shard {path} cannot be read back ({type(e).__name__}: {e.message}); "
                       "delete it and rerun the converter") from None
  return tuple(ref_ids), sentences, reencoded


def convert_shard(task: ShardTask) -> ShardResult:
  """Writes one shard atomically (or only reads it back if it exists) and returns what is in it."""
  tf = _import_tf()
  if os.path.exists(task.path):
    return ShardResult(task.path, False, *read_back(task.path, tf), skipped=())
  from fcnet_jax import tokenizer  # pylint: disable=g-import-not-at-top  (lazy: only workers need it)
  sentences = [s for item in task.items for s in item.sents]
  tokens = np.asarray(tokenizer.tokenize(sentences, records.STORED_CONTEXT_LENGTH))
  if tokens.shape != (len(sentences), records.STORED_CONTEXT_LENGTH):
    raise ValueError(f"fcnet_jax.tokenizer.tokenize returned shape {tokens.shape}, expected "
                     f"({len(sentences)}, {records.STORED_CONTEXT_LENGTH})")
  tmp = task.path + ".tmp"
  skipped = []
  cached_path, cached_image = None, None  # Refs of one image are adjacent (sorted by image_id).
  row = 0
  try:
    with tf.io.TFRecordWriter(tmp) as writer:
      for item in task.items:
        item_tokens, row = tokens[row:row + len(item.sents)], row + len(item.sents)
        if item.image_path != cached_path:
          cached_path = item.image_path
          try:
            cached_image = load_image(item.image_path, item.height, item.width, tf)
          except BadImageError as e:
            if not task.skip_bad_images:
              raise BadImageError(f"{e} (image_id={item.image_id}, ref_id={item.ref_id}); pass "
                                  "--skip_bad_images to skip its refs") from None
            cached_image = e
        if isinstance(cached_image, BadImageError):
          skipped.append((item.ref_id, str(cached_image)))
          continue
        mask = decode_annotation_mask(item.segmentation, item.height, item.width,
                                      where=f"annotation {item.ann_id} (ref_id={item.ref_id})")
        example = make_example(item, *cached_image, encode_mask_png(mask), item_tokens, tf)
        # Deterministic: map order would otherwise differ between processes, and reruns should be byte-equal.
        writer.write(example.SerializeToString(deterministic=True))
    os.replace(tmp, task.path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return ShardResult(task.path, True, *read_back(task.path, tf), skipped=tuple(skipped))


def _init_worker() -> None:
  tf = _import_tf()
  # One thread per process: the parallelism comes from the processes.
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)


def plan_shards(items: Sequence[RefItem], shard_size: int) -> List[Tuple[RefItem, ...]]:
  """Contiguous shards of refs sorted by (image_id, ref_id): the same refs and shard_size give the same shards."""
  if shard_size < 1:
    raise ValueError(f"--shard_size must be >= 1, got {shard_size}")
  ordered = sorted(items, key=lambda item: (item.image_id, item.ref_id))
  num_shards = max(1, math.ceil(len(ordered) / shard_size))
  return [tuple(ordered[i * shard_size:(i + 1) * shard_size]) for i in range(num_shards)]


def _ref_items(refs: Sequence[dict], anns: Dict[int, dict], images: Dict[int, dict], image_dir: str,
               where: str) -> List[RefItem]:
  items = []
  for ref in refs:
    ann = anns.get(ref["ann_id"])
    if ann is None:
      raise ValueError(f"{where}: ref_id={ref['ref_id']} refers to ann_id={ref['ann_id']}, which is not in "
                       "instances.json")
    if ann["image_id"] != ref["image_id"]:
      raise ValueError(f"{where}: ref_id={ref['ref_id']} has image_id={ref['image_id']} but its annotation "
                       f"{ann['id']} belongs to image_id={ann['image_id']}")
    image = images.get(ref["image_id"])
    if image is None:
      raise ValueError(f"{where}: image_id={ref['image_id']} of ref_id={ref['ref_id']} is not in instances.json")
    if not ref["sentences"]:
      raise ValueError(f"{where}: ref_id={ref['ref_id']} has no sentences")
    if any(not isinstance(s, dict) or "sent" not in s or "sent_id" not in s for s in ref["sentences"]):
      raise ValueError(f"{where}: a sentence of ref_id={ref['ref_id']} lacks 'sent' or 'sent_id'")
    items.append(RefItem(
        ref_id=int(ref["ref_id"]), ann_id=int(ref["ann_id"]), image_id=int(ref["image_id"]),
        category_id=int(ref["category_id"]),
        sent_ids=tuple(int(s["sent_id"]) for s in ref["sentences"]),
        sents=tuple(str(s["sent"]) for s in ref["sentences"]),
        bbox=tuple(float(v) for v in ann["bbox"]), segmentation=ann["segmentation"],
        height=int(image["height"]), width=int(image["width"]),
        image_path=os.path.join(image_dir, image["file_name"])))
  return items


def _prepare_split_dir(split_dir: str, shard_names: Sequence[str], shard_size: int) -> None:
  """Creates the split folder, drops leftover .tmp files, and refuses shards of another layout."""
  os.makedirs(split_dir, exist_ok=True)
  stray = []
  for name in sorted(os.listdir(split_dir)):
    if name.endswith(".tmp"):
      os.remove(os.path.join(split_dir, name))  # An interrupted run's partial shard.
    elif name.endswith(".tfrecord") and name not in shard_names:
      stray.append(name)
  if stray:
    raise ValueError(f"{split_dir} holds shards that are not in this conversion's layout ({len(shard_names)} "
                     f"shards of --shard_size={shard_size}): {stray[:3]}{' ...' if len(stray) > 3 else ''}; "
                     "delete them or rerun with the --shard_size that wrote them")


def _check_split(tasks: Sequence[ShardTask], results: Dict[str, ShardResult],
                 skip_bad_images: bool) -> Dict[str, int]:
  """Checks the records read back against the refs of every shard; returns the split's summary entry."""
  total_refs = total_sentences = reencoded = 0
  skipped: Dict[int, str] = {}
  for task in tasks:
    result = results[task.path]
    expected = {item.ref_id: item for item in task.items}
    found = result.ref_ids
    if len(set(found)) != len(found) or not set(found) <= set(expected):
      raise RuntimeError(f"shard {task.path} holds refs that do not belong to it (or duplicates); delete it "
                         "and rerun")
    missing = sorted(set(expected) - set(found))
    reasons = dict(result.skipped)
    if not result.written and missing:
      if not skip_bad_images:
        raise RuntimeError(f"shard {task.path} lacks {len(missing)} refs (e.g. ref_id={missing[0]}): it was "
                           "written with --skip_bad_images; delete it, or pass --skip_bad_images again")
      reasons = {ref_id: "skipped by an earlier run" for ref_id in missing}
    if sorted(reasons) != missing:
      raise RuntimeError(f"shard {task.path}: the refs read back differ from those written")
    skipped.update(reasons)
    expected_sentences = sum(len(expected[ref_id].sents) for ref_id in found)
    if result.sentences != expected_sentences:
      raise RuntimeError(f"shard {task.path}: {result.sentences} sentences read back, {expected_sentences} "
                         "expected")
    total_refs += len(found)
    total_sentences += result.sentences
    reencoded += result.reencoded
  return {"refs": total_refs, "sentences": total_sentences, "shards": len(tasks),
          "skipped_refs": len(skipped), "reencoded_refs": reencoded}


def _write_json_atomic(path: str, value: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _existing_summary(path: str, header: Dict[str, object]) -> dict:
  if not os.path.exists(path):
    return {**header, "splits": {}}
  with open(path) as f:
    summary = json.load(f)
  for key, value in header.items():
    if summary.get(key) != value:
      raise ValueError(f"{path} has {key}={summary.get(key)!r}, but this conversion writes {key}={value!r}; "
                       "use another --out")
  return summary


def _run(tasks: Sequence[ShardTask], num_workers: int, desc: str) -> Iterable[ShardResult]:
  """Converts shards in `num_workers` spawned processes (here when <= 1), with a progress bar over refs.

  A process pool from concurrent.futures, because a worker that dies (killed for memory, say) then raises
  BrokenProcessPool instead of leaving the conversion waiting forever as multiprocessing.Pool would.
  """
  with tqdm.tqdm(total=sum(len(t.items) for t in tasks), desc=desc, unit="ref", file=sys.stderr) as bar:
    if num_workers <= 1:
      for task in tasks:
        yield convert_shard(task)
        bar.update(len(task.items))
      return
    # Spawned, not forked: TensorFlow's thread pools do not survive a fork.
    with concurrent.futures.ProcessPoolExecutor(min(num_workers, len(tasks)), initializer=_init_worker,
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
      futures = {pool.submit(convert_shard, task): task for task in tasks}
      try:
        for future in concurrent.futures.as_completed(futures):
          yield future.result()
          bar.update(len(futures[future].items))
      except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # Finish the running shards, drop the queued ones.
        raise


def convert(refer_root: str, coco_images: str, dataset: str, split_by: str, out_dir: str, *,
            splits: Optional[Sequence[str]] = None, num_workers: Optional[int] = None,
            skip_bad_images: bool = False, shard_size: int = DEFAULT_SHARD_SIZE) -> Dict[str, object]:
  """Converts the refs of `splits` to TFRecord shards under `out_dir` and writes/merges `summary.json`.

  Args:
    refer_root: folder with `<dataset>/refs(<split_by>).p` and `<dataset>/instances.json`.
      The refs file is a pickle: it can execute code when loaded, so only use files you trust.
    coco_images: the COCO train2014 JPEG folder, or its parent.
    dataset: refcoco | refcoco+ | refcocog.
    split_by: unc | google | umd (see `SPLITS` for the valid combinations and their splits).
    out_dir: output root (records.py layout).
    splits: the splits to convert; default: every split of the combination present in the refs file.
    num_workers: processes writing shards (default: CPU count); <= 1 converts in this process.
    skip_bad_images: skip (and count) the refs of missing / corrupt / wrongly sized images instead of failing.
    shard_size: refs per shard; a rerun must use the same value to resume.

  Returns:
    The summary written to `<out_dir>/summary.json`: dataset, split_by, context_length and, per split, refs,
    sentences, shards, skipped_refs and reencoded_refs.
  """
  split_names = known_splits(dataset, split_by)
  refer_dir = os.path.join(refer_root, dataset)
  refs_path = os.path.join(refer_dir, f"refs({split_by}).p")
  instances_path = os.path.join(refer_dir, "instances.json")
  for path in (refs_path, instances_path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found (--refer_root={refer_root}, --dataset={dataset}, "
                              f"--split_by={split_by})")
  if splits is not None:
    unknown = [s for s in splits if s not in split_names]
    if unknown:
      raise ValueError(f"unknown split(s) {unknown} for {dataset}/{split_by}; known: {list(split_names)}")
  header = {"dataset": dataset, "split_by": split_by, "context_length": records.STORED_CONTEXT_LENGTH}
  summary_path = os.path.join(out_dir, records.SUMMARY_FILE)
  summary = _existing_summary(summary_path, header)  # Fail before any work if --out holds another dataset.

  refs = load_refs(refs_path)
  present = {ref["split"] for ref in refs}
  if splits is None:
    splits = [s for s in split_names if s in present]
  if present - set(split_names):
    logging.warning("%s has refs of split(s) %s, which %s/%s does not define; they are not converted", refs_path,
                    sorted(present - set(split_names)), dataset, split_by)
  empty = [s for s in splits if s not in present]
  if empty:
    raise ValueError(f"{refs_path} has no refs of split(s) {empty}; it has {sorted(present)}")
  with open(instances_path) as f:
    instances = json.load(f)
  anns = {ann["id"]: ann for ann in instances["annotations"]}
  images = {image["id"]: image for image in instances["images"]}
  first = next((r for r in refs if r["split"] in splits), None)
  sample = images.get(first["image_id"], {}).get("file_name") if first else None
  image_dir = resolve_image_dir(coco_images, sample)
  if num_workers is None:
    num_workers = os.cpu_count() or 1

  work = []
  for split in splits:
    items = _ref_items([r for r in refs if r["split"] == split], anns, images, image_dir, refs_path)
    shards = plan_shards(items, shard_size)
    split_dir = os.path.join(out_dir, split)
    names = [records.shard_name(split, i, len(shards)) for i in range(len(shards))]
    _prepare_split_dir(split_dir, names, shard_size)
    work.append((split, [ShardTask(os.path.join(split_dir, name), shard, skip_bad_images)
                         for name, shard in zip(names, shards)]))

  results = {}
  all_tasks = [task for _, tasks in work for task in tasks]
  for result in _run(all_tasks, num_workers, f"{dataset}({split_by}) {','.join(splits)}"):
    results[result.path] = result
    for ref_id, reason in result.skipped:
      logging.warning("skipped ref_id=%d: %s", ref_id, reason)
  for split, tasks in work:
    written = sum(results[task.path].written for task in tasks)
    logging.info("%s: wrote %d shards, kept %d finished ones", split, written, len(tasks) - written)
    summary["splits"][split] = _check_split(tasks, results, skip_bad_images)
  _write_json_atomic(summary_path, summary)
  return summary


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
  parser = argparse.ArgumentParser(
      prog="python -m input_pipeline.convert",
      description="Convert refer-format RefCOCO/RefCOCO+/RefCOCOg annotations and COCO train2014 images into "
                  "TFRecord shards (input_pipeline/records.py layout) and summary.json. SECURITY: refs(...).p "
                  "files are pickles, which can execute arbitrary code when loaded: only convert files you trust.",
      epilog="Plain TFRecord shards rather than a TFDS builder: readable per host with plain tf.data file "
             "sharding, no TFDS registry/download machinery, and the conversion resumes shard by shard.")
  parser.add_argument("--refer_root", required=True, help="folder with <dataset>/refs(<split_by>).p and "
                      "<dataset>/instances.json")
  parser.add_argument("--coco_images", required=True, help="COCO train2014 JPEG folder, or its parent")
  parser.add_argument("--dataset", required=True, help="refcoco | refcoco+ | refcocog")
  parser.add_argument("--split_by", required=True, help="unc | google | umd")
  parser.add_argument("--out", required=True, help="output folder (shards per split and summary.json)")
  parser.add_argument("--splits", default=None, help="comma-separated splits (default: all in the refs file)")
  parser.add_argument("--num_workers", type=int, default=None, help="processes (default: CPU count)")
  parser.add_argument("--skip_bad_images", action="store_true",
                      help="skip and count refs whose image is missing, corrupt or wrongly sized")
  parser.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE, help="refs per shard")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  splits = [s for s in args.splits.split(",") if s] if args.splits else None
  summary = convert(args.refer_root, args.coco_images, args.dataset, args.split_by, args.out, splits=splits,
                    num_workers=args.num_workers, skip_bad_images=args.skip_bad_images,
                    shard_size=args.shard_size)
  json.dump(summary, sys.stdout, indent=2, sort_keys=True)
  print()
  return summary


if __name__ == "__main__":
  main()
