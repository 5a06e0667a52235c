"""The tf.data input pipeline: converted RefCOCO-family shards → NumPy batches (TensorFlow stops here).

Reads the TFRecord shards of `input_pipeline.records` and yields per-process batches ready to be placed on a
device mesh. Preprocessing follows the CRIS protocol that FCNet uses (protocol.md, "Preprocessing"):

* Letterbox to S×S: scale = min(S/h, S/w) (aspect kept), resized size (nh, nw) = (round(h·scale),
  round(w·scale)) rounded half to even (`tf.round`; at least 1 pixel), bilinear resize WITHOUT antialias,
  centred at (top, left) = ((S-nh)//2, (S-nw)//2), padded with the uint8 CLIP mean colour (123, 117, 104).
  Images ship as uint8 and are normalized on the device: the fast path of protocol.md ("Measured on this kind
  of machine"), about twice the host throughput of normalizing in float32 here.
* The mask goes through the same map: bilinear resize of the 0/1 mask, then a pixel is foreground when the
  interpolate is ≥ 0.5, padding 0. Thresholding the bilinear interpolate (rather than nearest neighbour) puts
  the mask edge where the image edge is, so the inverse letterbox on the device recovers the original mask
  to IoU ≥ 0.99 (tests/test_pipeline.py); only masks thinner than ~30 resized pixels lose more, because the
  threshold moves the edge by up to half a resized pixel.
* Tokens: the stored 77 CLIP ids are cut to L with [EOS] forced last (`records.truncate_tokens`, in TF here).

Batch (B = per-process batch, S = image_size, L = context_length, K = canvas):
  image       uint8   B×S×S×3   letterboxed RGB, padding = CLIP mean colour
  mask        uint8   B×S×S     0/1, letterboxed like the image, padding 0
  tokens      int32   B×L       [SOS] … [EOS] 0…
  orig_hw     int32   B×2       (h, w) of the original image
  resized_hw  int32   B×2       (nh, nw): the size the image was resized to (use nh/h, not `scale`, to invert)
  offset      int32   B×2       (top, left) of the resized image on the canvas
  scale       float32 B         min(S/h, S/w)
  ref_id      int64   B
  sent_id     int64   B
  valid       bool    B         False marks the padding examples of evaluation (training: all True)
  orig_mask   uint8   B×K×K     evaluation only: the original-size mask at the top-left of a K×K zero canvas

Training visits the refs of this process's part of the split in a per-epoch shuffled order, one random
sentence per visit; the stream is a pure function of (seed, process_index, process_count) and `start_step`
resumes it exactly. Evaluation yields every (ref, sentence) pair exactly once across processes, padded with
`valid=False` copies of a real example so that every process yields the same number of batches.
"""
import hashlib
import json
import math
import os
import struct
from typing import Any, Dict, Iterator, List, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # Before TensorFlow is imported.

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

from input_pipeline import records  # pylint: disable=g-import-not-at-top,wrong-import-position


def _hide_gpus_from_tf() -> None:
  """TF must not grab accelerator memory that JAX needs; tf.data only runs on the host CPU."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF's devices were initialized elsewhere already; nothing left to do here.
    pass


_hide_gpus_from_tf()

# The CLIP mean colour (0.48145466, 0.4578275, 0.40821073) × 255, rounded: the letterbox padding.
MEAN_RGB_UINT8 = (123, 117, 104)
_AUTOTUNE = tf.data.AUTOTUNE
_MAX_INTERLEAVE_FILES = 16  # Files read at once by one training process.

Batch = Dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------------------------
# Metadata.


def dataset_info(data_dir: str) -> Dict[str, Any]:
  """Reads `<data_dir>/summary.json` written by the converter.

  Returns:
    The summary: {"dataset", "split_by", "context_length", "splits": {split: {"refs", "sentences",
    "shards"}}}.
  """
  path = os.path.join(data_dir, records.SUMMARY_FILE)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f"{path} not found: --data_dir must be the output folder of `python -m input_pipeline.convert`.")
  with tf.io.gfile.GFile(path, "r") as f:
    try:
      info = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from e
  for key in ("context_length", "splits"):
    if key not in info:
      raise ValueError(f"{path} has no field {key!r}.")
  return info


def _split_info(info: Dict[str, Any], data_dir: str, split: str) -> Dict[str, Any]:
  splits = info["splits"]
  if split not in splits:
    raise ValueError(f"split {split!r} is not in {data_dir}/{records.SUMMARY_FILE}; it has {sorted(splits)}.")
  for key in ("refs", "sentences"):
    if key not in splits[split]:
      raise ValueError(f"{data_dir}/{records.SUMMARY_FILE}: splits[{split!r}] has no field {key!r}.")
  return splits[split]


def _split_files(data_dir: str, split: str, split_info: Dict[str, Any]) -> List[str]:
  """The shard files of a split in their fixed (sorted) order."""
  pattern = os.path.join(data_dir, split, f"{split}-*-of-*.tfrecord")
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise FileNotFoundError(f"no shards match {pattern}.")
  expected = split_info.get("shards")
  if expected is not None and expected != len(files):
    raise ValueError(f"{data_dir}/{records.SUMMARY_FILE} says split {split!r} has {expected} shards, but "
                     f"{len(files)} match {pattern}.")
  return files


def _count_records(path: str) -> int:
  """Counts the records of a TFRecord file from its length headers, without reading the payloads.

  TFRecord framing: uint64 length, uint32 CRC of the length, `length` bytes, uint32 CRC of the data.
  """
  size = tf.io.gfile.stat(path).length
  count, position = 0, 0
  with tf.io.gfile.GFile(path, "rb") as f:
    while position < size:
      f.seek(position)
      header = f.read(8)
      if len(header) < 8:
        break
      position += 8 + 4 + struct.unpack("<Q", header)[0] + 4
      count += 1
  if position != size:
    raise ValueError(f"{path} is truncated or not a TFRecord file.")
  return count


def _mix_seed(*values: Any) -> int:
  """A stable non-negative int63 hash of `values` (Python's `hash` is salted per process)."""
  digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") & (2**63 - 1)


def _check_process(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count; got process_index={process_index}, "
                     f"process_count={process_count}.")


def _check_sizes(image_size: int, context_length: int, batch_size: int, stored_length: int) -> None:
  if image_size < 1:
    raise ValueError(f"image_size must be positive; got {image_size}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  if not 2 <= context_length <= stored_length:
    raise ValueError(f"context_length must be in [2, {stored_length}] (the stored token length of "
                     f"summary.json); got {context_length}.")


# --------------------------------------------------------------------------------------------------------------
# Per-example transforms (graph code). The tf.data functions in this module have no Python control flow on
# tensors, so they skip AutoGraph (`do_not_convert`), which would only slow their tracing.


def _parse(serialized: tf.Tensor, stored_length: int) -> Dict[str, tf.Tensor]:
  """Parses one record; `sentences/tokens` comes back as N×T int64."""
  features = tf.io.parse_single_example(serialized, records.feature_spec())
  sent_id = features["sentences/sent_id"].values
  tokens = features["sentences/tokens"].values
  num_sentences = tf.size(sent_id)
  ok = tf.debugging.Assert(
      tf.logical_and(num_sentences > 0, tf.size(tokens) == num_sentences * stored_length),
      ["record of ref_id", features["ref_id"], "needs >= 1 sentence and sentences/tokens of size "
       f"N*{stored_length} (summary.json context_length); N, size =", num_sentences, tf.size(tokens)])
  with tf.control_dependencies([ok]):
    features["sentences/tokens"] = tf.reshape(tokens, [num_sentences, stored_length])
  features["sentences/sent_id"] = sent_id
  return features


def truncate_tokens(tokens: tf.Tensor, context_length: int) -> tf.Tensor:
  """`records.truncate_tokens` in TF: cuts T ids to L; a sentence that does not fit ends with [EOS].

  Args:
    tokens: int T, [SOS] … [EOS] zero-padded.
    context_length: L ≤ T.

  Returns:
    int32 L.
  """
  stored_length = tokens.shape[-1]
  cut = tokens[:context_length]
  if stored_length is not None and context_length >= stored_length:
    return tf.cast(cut, tf.int32)
  overflow = tokens[context_length] != 0
  last = tf.where(overflow, tf.constant(records.EOT_TOKEN, tokens.dtype), cut[context_length - 1])
  return tf.cast(tf.concat([cut[:context_length - 1], last[None]], axis=0), tf.int32)


def _fill(colour: tf.Tensor, rows: tf.Tensor, cols: tf.Tensor) -> tf.Tensor:
  return tf.broadcast_to(colour, tf.stack([rows, cols, 3]))


def letterbox(image: tf.Tensor, mask: tf.Tensor, image_size: int) -> Dict[str, tf.Tensor]:
  """Letterboxes an image and its mask onto an S×S canvas (protocol.md, CRIS preprocessing).

  Args:
    image: uint8 h×w×3.
    mask: uint8 h×w, 0/1.
    image_size: S.

  Returns:
    image uint8 S×S×3 (padding = `MEAN_RGB_UINT8`), mask uint8 S×S (padding 0), resized_hw int32 [2],
    offset int32 [2] (top, left), scale float32 [].
  """
  size = image_size
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  # float64 so that (nh, nw) equal a NumPy float64 computation of the same formula bit for bit.
  height_f, width_f = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  scale = tf.minimum(size / height_f, size / width_f)
  resized_h = tf.maximum(tf.cast(tf.round(height_f * scale), tf.int32), 1)
  resized_w = tf.maximum(tf.cast(tf.round(width_f * scale), tf.int32), 1)
  top, left = (size - resized_h) // 2, (size - resized_w) // 2
  bottom, right = size - resized_h - top, size - resized_w - left

  resized = tf.image.resize(image, tf.stack([resized_h, resized_w]), method="bilinear", antialias=False)
  # Bilinear weights are convex, so the rounded values stay in [0, 255] and a plain cast is exact.
  resized = tf.cast(tf.round(resized), tf.uint8)
  # Concatenating constant blocks costs about what zero padding does (measured); padding each channel with
  # its own constant costs ~4× more.
  colour = tf.constant(MEAN_RGB_UINT8, tf.uint8)
  middle = tf.concat([_fill(colour, resized_h, left), resized, _fill(colour, resized_h, right)], axis=1)
  canvas = tf.concat([_fill(colour, top, size), middle, _fill(colour, bottom, size)], axis=0)
  canvas = tf.ensure_shape(canvas, [size, size, 3])

  mask_resized = tf.image.resize(tf.cast(mask[..., None], tf.float32), tf.stack([resized_h, resized_w]),
                                 method="bilinear", antialias=False)[..., 0]
  mask_resized = tf.cast(mask_resized >= 0.5, tf.uint8)
  mask_canvas = tf.pad(mask_resized, tf.stack([tf.stack([top, bottom]), tf.stack([left, right])]))
  mask_canvas = tf.ensure_shape(mask_canvas, [size, size])
  return {
      "image": canvas,
      "mask": mask_canvas,
      "resized_hw": tf.stack([resized_h, resized_w]),
      "offset": tf.stack([top, left]),
      "scale": tf.cast(scale, tf.float32),
  }


def _decode_image_and_mask(features: Dict[str, tf.Tensor]) -> Tuple[tf.Tensor, tf.Tensor]:
  """Decodes to uint8 h×w×3 RGB (JPEG or PNG, grey/CMYK → RGB, EXIF ignored) and uint8 h×w mask."""
  image = tf.io.decode_image(features["image/encoded"], channels=3, expand_animations=False)
  mask = tf.io.decode_png(features["mask/encoded"], channels=1)[..., 0]
  stored_hw = tf.cast(tf.stack([features["image/height"], features["image/width"]]), tf.int32)
  ok = tf.debugging.Assert(
      tf.logical_and(tf.reduce_all(tf.shape(image)[:2] == stored_hw),
                     tf.reduce_all(tf.shape(mask) == stored_hw)),
      ["record of ref_id", features["ref_id"], "image/height,width =", stored_hw,
       "but image/encoded decodes to", tf.shape(image)[:2], "and mask/encoded to", tf.shape(mask)])
  with tf.control_dependencies([ok]):
    return tf.identity(image), tf.identity(mask)


def _example(features: Dict[str, tf.Tensor], sentence: tf.Tensor, image_size: int,
             context_length: int) -> Tuple[Dict[str, tf.Tensor], tf.Tensor]:
  """One letterboxed example of sentence number `sentence` of a parsed record, and the h×w mask."""
  image, mask = _decode_image_and_mask(features)
  example = letterbox(image, mask, image_size)
  example["tokens"] = truncate_tokens(features["sentences/tokens"][sentence], context_length)
  example["orig_hw"] = tf.shape(image)[:2]
  example["ref_id"] = features["ref_id"]
  example["sent_id"] = features["sentences/sent_id"][sentence]
  example["valid"] = tf.constant(True)
  return example, mask


def _options(threads: int = 0) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  if threads:
    options.threading.private_threadpool_size = threads
  return options


# --------------------------------------------------------------------------------------------------------------
# Training.


def train_dataset(data_dir: str, split: str, *, image_size: int, context_length: int, batch_size: int,
                  seed: int, process_index: int = 0, process_count: int = 1, shuffle_buffer: int = 4096,
                  start_step: int = 0, threads: int = 0) -> tf.data.Dataset:
  """The endless training stream of this process: shuffled refs, one random sentence per visit.

  Each process reads its own part of the split: whole files when there are at least as many shards as
  processes, otherwise every `process_count`-th record. Epoch e shuffles the file order and the records (a
  `shuffle_buffer` window) with seeds hashed from (seed, process, e); the buffer drains at the end of every
  epoch, so each epoch visits each of this process's refs once. Element i of the stream takes sentence
  `stateless_uniform(seed=(hash(seed, process), i))` of its ref, which stays the same after a skip.

  Args:
    data_dir: the converter's output folder (holds summary.json).
    split: e.g. "train".
    image_size: S.
    context_length: L.
    batch_size: per-process batch B (the global batch / process_count).
    seed: the stream is a pure function of (seed, process_index, process_count).
    process_index: this process (`jax.process_index()`).
    process_count: `jax.process_count()`.
    shuffle_buffer: records held by the shuffle (serialized, so ~ the JPEG size each).
    start_step: yield the batches of the uninterrupted stream from step `start_step` on (resume). The skip
      counts records from their TFRecord headers and drops serialized records, so no image is decoded.
    threads: tf.data private thread-pool size (0: TF's default, all cores).

  Returns:
    A dataset of batches (module docstring) with static shapes, `valid` all True.
  """
  _check_process(process_index, process_count)
  info = dataset_info(data_dir)
  split_info = _split_info(info, data_dir, split)
  stored_length = int(info["context_length"])
  _check_sizes(image_size, context_length, batch_size, stored_length)
  if shuffle_buffer < 1:
    raise ValueError(f"shuffle_buffer must be positive; got {shuffle_buffer}.")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0; got {start_step}.")
  if split_info["refs"] < process_count:
    raise ValueError(f"split {split!r} of {data_dir} has {split_info['refs']} refs, fewer than "
                     f"process_count={process_count}.")
  files = _split_files(data_dir, split, split_info)
  by_file = len(files) >= process_count
  own_files = files[process_index::process_count] if by_file else files

  stream_seed = _mix_seed("train", seed, process_index, process_count)
  sentence_seed = _mix_seed("sentence", seed, process_index, process_count)

  @tf.autograph.experimental.do_not_convert
  def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
    file_seed, record_seed = tf.unstack(tf.random.stateless_uniform(
        [2], seed=tf.stack([tf.constant(stream_seed, tf.int64), epoch]), minval=None, maxval=None,
        dtype=tf.int64))
    if by_file:
      names = tf.data.Dataset.from_tensor_slices(own_files).shuffle(len(own_files), seed=file_seed)
      serialized = names.interleave(
          tf.data.TFRecordDataset, cycle_length=min(len(own_files), _MAX_INTERLEAVE_FILES), block_length=1,
          num_parallel_calls=_AUTOTUNE, deterministic=True)
    else:  # Every process reads all files in the same fixed order and keeps its share of the records.
      serialized = tf.data.TFRecordDataset(files).shard(process_count, process_index)
    return serialized.shuffle(shuffle_buffer, seed=record_seed)

  skip = start_step * batch_size
  first_epoch = 0
  if skip:
    # Whole epochs are skipped by their number, so resuming late in training does not re-read the data.
    if by_file:
      per_epoch = sum(_count_records(f) for f in own_files)
    else:
      per_epoch = len(range(process_index, sum(_count_records(f) for f in files), process_count))
    if per_epoch == 0:
      raise ValueError(f"process {process_index} of {process_count} has no records of split {split!r}.")
    first_epoch, skip = divmod(skip, per_epoch)
    index_start = first_epoch * per_epoch
  else:
    index_start = 0

  @tf.autograph.experimental.do_not_convert
  def decode(index: tf.Tensor, serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
    features = _parse(serialized, stored_length)
    sentence = tf.random.stateless_uniform(
        [], seed=tf.stack([tf.constant(sentence_seed, tf.int64), index]), minval=0,
        maxval=tf.size(features["sentences/sent_id"]), dtype=tf.int32)
    example, _ = _example(features, sentence, image_size, context_length)
    return example

  dataset = (tf.data.Dataset.counter(first_epoch)
             .flat_map(epoch_records)
             .enumerate(index_start)
             .skip(skip)
             .map(decode, num_parallel_calls=_AUTOTUNE, deterministic=True)
             .batch(batch_size, drop_remainder=True)
             .prefetch(_AUTOTUNE))
  return dataset.with_options(_options(threads))


def train_iterator(data_dir: str, split: str, **kwargs) -> Iterator[Batch]:
  """`train_dataset(...)` as an endless iterator of NumPy batches (same arguments)."""
  return train_dataset(data_dir, split, **kwargs).as_numpy_iterator()


# --------------------------------------------------------------------------------------------------------------
# Evaluation.


def eval_num_batches(num_pairs: int, batch_size: int, process_count: int) -> int:
  """Batches every process yields for `num_pairs` (ref, sentence) pairs."""
  return math.ceil(math.ceil(num_pairs / process_count) / batch_size)


def eval_dataset(data_dir: str, split: str, *, image_size: int, context_length: int, batch_size: int,
                 process_index: int = 0, process_count: int = 1, canvas: int = 640,
                 threads: int = 0) -> tf.data.Dataset:
  """Every (ref, sentence) pair of a split exactly once across processes, padded to equal batch counts.

  Pairs are numbered in file order (sorted shard names), record order within a file and sentence order
  within a ref; process p takes the pairs with number ≡ p (mod process_count). The stream is padded with
  copies of the split's first pair flagged `valid=False` up to `eval_num_batches(...)` full batches, so
  every process yields the same number of batches of the same static shape. The pair count is checked
  against summary.json while reading (an error names the split and both counts).

  Args:
    data_dir: the converter's output folder (holds summary.json).
    split: e.g. "val", "testA".
    image_size: S.
    context_length: L.
    batch_size: per-process batch B.
    process_index: this process (`jax.process_index()`).
    process_count: `jax.process_count()`.
    canvas: K, the side of the `orig_mask` canvas; an image larger than K raises an error.
    threads: tf.data private thread-pool size (0: TF's default).

  Returns:
    A finite dataset of batches (module docstring) including `orig_mask` uint8 B×K×K.
  """
  _check_process(process_index, process_count)
  info = dataset_info(data_dir)
  split_info = _split_info(info, data_dir, split)
  stored_length = int(info["context_length"])
  _check_sizes(image_size, context_length, batch_size, stored_length)
  num_pairs = int(split_info["sentences"])
  if num_pairs < 1:
    raise ValueError(f"split {split!r} of {data_dir} has no sentences (summary.json).")
  files = _split_files(data_dir, split, split_info)
  own_pairs = len(range(process_index, num_pairs, process_count))
  num_padding = eval_num_batches(num_pairs, batch_size, process_count) * batch_size - own_pairs

  @tf.autograph.experimental.do_not_convert
  def to_pairs(serialized: tf.Tensor) -> tf.data.Dataset:
    # Only the sentence ids are parsed here; images are decoded after the process filter.
    sent_id = tf.io.parse_single_example(
        serialized, {"sentences/sent_id": tf.io.VarLenFeature(tf.int64)})["sentences/sent_id"].values
    return tf.data.Dataset.zip((tf.data.Dataset.from_tensors(serialized).repeat(),
                                tf.data.Dataset.range(tf.size(sent_id, out_type=tf.int64))))

  count_error = (f"split {split!r} of {data_dir}: summary.json says {num_pairs} (ref, sentence) pairs but "
                 "the shards hold a different number; pairs read:")

  @tf.autograph.experimental.do_not_convert
  def check_count(number: tf.Tensor, pair: Tuple[tf.Tensor, tf.Tensor]):
    # The sentinel (sentence -1) after the last pair carries the number of pairs read.
    is_sentinel = pair[1] < 0
    ok = tf.debugging.Assert(tf.where(is_sentinel, number == num_pairs, number < num_pairs),
                             [count_error, tf.where(is_sentinel, number, number + 1)])
    with tf.control_dependencies([ok]):
      return tf.identity(number), pair

  @tf.autograph.experimental.do_not_convert
  def is_own(number: tf.Tensor, pair: Tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
    return tf.logical_and(pair[1] >= 0, number % process_count == process_index)

  @tf.autograph.experimental.do_not_convert
  def drop_number(number: tf.Tensor, pair: Tuple[tf.Tensor, tf.Tensor]):
    del number
    return pair[0], pair[1], tf.constant(True)

  @tf.autograph.experimental.do_not_convert
  def decode(serialized: tf.Tensor, sentence: tf.Tensor, valid: tf.Tensor) -> Dict[str, tf.Tensor]:
    features = _parse(serialized, stored_length)
    example, mask = _example(features, sentence, image_size, context_length)
    height, width = tf.shape(mask)[0], tf.shape(mask)[1]
    ok = tf.debugging.Assert(
        tf.logical_and(height <= canvas, width <= canvas),
        [f"split {split!r}: ref_id", features["ref_id"], "has an image of (h, w) =", tf.shape(mask),
         f"larger than the evaluation canvas {canvas} (config data.eval_canvas)"])
    with tf.control_dependencies([ok]):
      example["orig_mask"] = tf.ensure_shape(
          tf.pad(mask, [[0, canvas - height], [0, canvas - width]]), [canvas, canvas])
    example["valid"] = valid
    return example

  @tf.autograph.experimental.do_not_convert
  def as_padding(serialized: tf.Tensor, sentence: tf.Tensor):
    return serialized, sentence, tf.constant(False)

  pairs = tf.data.TFRecordDataset(files).flat_map(to_pairs)
  sentinel = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(-1, tf.int64)))
  dataset = (pairs.concatenate(sentinel)
             .enumerate()
             .map(check_count)
             .filter(is_own)
             .map(drop_number))
  if num_padding:
    # Padding: the split's first pair (so the model sees a normal input), kept serialized in memory.
    dataset = dataset.concatenate(pairs.take(1).map(as_padding).cache().repeat(num_padding))
  dataset = (dataset.map(decode, num_parallel_calls=_AUTOTUNE, deterministic=True)
             .batch(batch_size, drop_remainder=True)
             .prefetch(_AUTOTUNE))
  return dataset.with_options(_options(threads))


def eval_iterator(data_dir: str, split: str, **kwargs) -> Iterator[Batch]:
  """`eval_dataset(...)` as an iterator of NumPy batches (same arguments)."""
  return eval_dataset(data_dir, split, **kwargs).as_numpy_iterator()
