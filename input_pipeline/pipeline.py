"""The tf.data input pipeline: converted RefCOCO-family shards → NumPy batches (TensorFlow stops here).

Reads the TFRecord shards of `input_pipeline.records` and yields per-process batches ready to be placed on a
device mesh. Each example is decoded, letterboxed to S×S and its tokens cut to L as `input_pipeline.preprocess`
describes (the CRIS protocol FCNet uses, docs/data.md "Preprocessing"); `input_pipeline.metadata` reads and
checks summary.json. The public names (`dataset_info`, `letterbox`, `train_iterator`, `eval_iterator`, ...) are
all reached through this module.

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

The fast training path (`train_iterator(device_letterbox=True)`, docs/data.md) yields the same stream with
`image_raw`, `mask_raw` and `mask_box` in place of `image` and `mask` (`host_decode`); the step finishes it with
`fcnet_jax.data.letterbox_on_device`.

Training visits the refs of this process's part of the split in a per-epoch shuffled order, one random
sentence per visit; the stream is a pure function of (seed, process_index, process_count) and `start_step`
resumes it exactly. Evaluation yields every (ref, sentence) pair exactly once across processes, padded with
`valid=False` copies of a real example so that every process yields the same number of batches.
"""

import math
from typing import Dict, Iterator, Tuple

import numpy as np

from input_pipeline import host_decode
from input_pipeline import import_tensorflow
from input_pipeline import metadata
from input_pipeline import preprocess
from input_pipeline import records
from input_pipeline import tfds_metadata
from input_pipeline.metadata import dataset_info
from input_pipeline.preprocess import letterbox
from input_pipeline.preprocess import MEAN_RGB_UINT8

# The public names of the input pipeline, all reached through this module.
__all__ = [
  "Batch",
  "MEAN_RGB_UINT8",
  "dataset_info",
  "eval_dataset",
  "eval_iterator",
  "eval_num_batches",
  "letterbox",
  "train_dataset",
  "train_iterator",
]

tf = import_tensorflow()

_AUTOTUNE = tf.data.AUTOTUNE
_MAX_INTERLEAVE_FILES = 16  # Files read at once by one training process.

Batch = Dict[str, np.ndarray]


def _options(threads: int = 0) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  if threads:
    options.threading.private_threadpool_size = threads
  return options


# --------------------------------------------------------------------------------------------------------------
# Training.


def train_dataset(
  data_dir: str,
  split: str,
  *,
  image_size: int,
  context_length: int,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  shuffle_buffer: int = 4096,
  start_step: int = 0,
  threads: int = 0,
  letterbox_mode: str = "integer",
  device_letterbox: bool = False,
) -> tf.data.Dataset:
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
      takes the records per shard from the TFDS metadata (else from the TFRecord headers) and drops serialized
      records, so no image is decoded.
    threads: tf.data private thread-pool size (0: TF's default, all cores).
    letterbox_mode: config.data.letterbox ("integer" or "cris"; `preprocess.letterbox`).
    device_letterbox: stop before decoding: batches of `preprocess.undecoded_example` (needs record format 2 and
      letterbox_mode "integer"); `train_iterator` decodes them (`host_decode`).

  Returns:
    A dataset of batches (module docstring) with static shapes, `valid` all True.
  """
  metadata.check_process(process_index, process_count)
  info = metadata.dataset_info(data_dir)
  if device_letterbox:
    metadata.check_device_letterbox(info, data_dir, letterbox_mode)
  split_info = metadata.split_info(info, data_dir, split)
  stored_length = int(info["context_length"])
  metadata.check_sizes(image_size, context_length, batch_size, stored_length)
  if shuffle_buffer < 1:
    raise ValueError(f"shuffle_buffer must be positive; got {shuffle_buffer}.")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0; got {start_step}.")
  if split_info["refs"] < process_count:
    raise ValueError(
      f"split {split!r} of {data_dir} has {split_info['refs']} refs, fewer than process_count={process_count}."
    )
  files = metadata.split_files(data_dir, split, split_info)
  by_file = len(files) >= process_count
  own_files = files[process_index::process_count] if by_file else files

  stream_seed = metadata.mix_seed("train", seed, process_index, process_count)
  sentence_seed = metadata.mix_seed("sentence", seed, process_index, process_count)

  @tf.autograph.experimental.do_not_convert
  def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
    file_seed, record_seed = tf.unstack(
      tf.random.stateless_uniform(
        [2], seed=tf.stack([tf.constant(stream_seed, tf.int64), epoch]), minval=None, maxval=None, dtype=tf.int64
      )
    )
    if by_file:
      names = tf.data.Dataset.from_tensor_slices(own_files).shuffle(len(own_files), seed=file_seed)
      serialized = names.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(own_files), _MAX_INTERLEAVE_FILES),
        block_length=1,
        num_parallel_calls=_AUTOTUNE,
        deterministic=True,
      )
    else:  # Every process reads all files in the same fixed order and keeps its share of the records.
      serialized = tf.data.TFRecordDataset(files).shard(process_count, process_index)
    return serialized.shuffle(shuffle_buffer, seed=record_seed)

  skip = start_step * batch_size
  first_epoch = 0
  if skip:
    # Whole epochs are skipped by their number, so resuming late in training does not re-read the data.
    # Records per shard from the TFDS metadata (no read of the shards), else from the record headers.
    lengths = tfds_metadata.shard_lengths(data_dir, split, len(files)) or [metadata.count_records(f) for f in files]
    if by_file:
      per_epoch = sum(lengths[process_index::process_count])
    else:
      per_epoch = len(range(process_index, sum(lengths), process_count))
    if per_epoch == 0:
      raise ValueError(f"process {process_index} of {process_count} has no records of split {split!r}.")
    first_epoch, skip = divmod(skip, per_epoch)
    index_start = first_epoch * per_epoch
  else:
    index_start = 0

  @tf.autograph.experimental.do_not_convert
  def decode(index: tf.Tensor, serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
    features = records.parse(serialized, stored_length)
    sentence = tf.random.stateless_uniform(
      [],
      seed=tf.stack([tf.constant(sentence_seed, tf.int64), index]),
      minval=0,
      maxval=tf.size(features["sentences/sent_id"]),
      dtype=tf.int32,
    )
    if device_letterbox:
      return preprocess.undecoded_example(features, sentence, image_size, context_length)
    example, _ = preprocess.example(features, sentence, image_size, context_length, letterbox_mode)
    return example

  dataset = (
    tf.data.Dataset.counter(first_epoch)
    .flat_map(epoch_records)
    .enumerate(index_start)
    .skip(skip)
    .map(decode, num_parallel_calls=_AUTOTUNE, deterministic=True)
    .batch(batch_size, drop_remainder=True)
    .prefetch(_AUTOTUNE)
  )
  return dataset.with_options(_options(threads))


def train_iterator(
  data_dir: str, split: str, *, canvas: int = 640, decode_threads: int = 2, **kwargs
) -> Iterator[Batch]:
  """`train_dataset(...)` as an endless iterator of NumPy batches (same arguments).

  With `device_letterbox=True` the batches hold the decoded images and masks on a flat K×K canvas
  (`host_decode`, K = `canvas`, decoded in `decode_threads` threads) instead of `image` and `mask`;
  `fcnet_jax.data.letterbox_on_device` turns them into the host path's batch on the accelerator.
  """
  batches = train_dataset(data_dir, split, **kwargs).as_numpy_iterator()
  if kwargs.get("device_letterbox"):
    return host_decode.decoded_batches(batches, canvas, decode_threads)
  return batches


# --------------------------------------------------------------------------------------------------------------
# Evaluation.


def eval_num_batches(num_pairs: int, batch_size: int, process_count: int) -> int:
  """Batches every process yields for `num_pairs` (ref, sentence) pairs."""
  return math.ceil(math.ceil(num_pairs / process_count) / batch_size)


def eval_dataset(
  data_dir: str,
  split: str,
  *,
  image_size: int,
  context_length: int,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  canvas: int = 640,
  threads: int = 0,
  letterbox_mode: str = "integer",
) -> tf.data.Dataset:
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
    letterbox_mode: config.data.letterbox ("integer" or "cris"; `preprocess.letterbox`).

  Returns:
    A finite dataset of batches (module docstring) including `orig_mask` uint8 B×K×K.
  """
  metadata.check_process(process_index, process_count)
  info = metadata.dataset_info(data_dir)
  split_info = metadata.split_info(info, data_dir, split)
  stored_length = int(info["context_length"])
  metadata.check_sizes(image_size, context_length, batch_size, stored_length)
  num_pairs = int(split_info["sentences"])
  if num_pairs < 1:
    raise ValueError(f"split {split!r} of {data_dir} has no sentences (summary.json).")
  files = metadata.split_files(data_dir, split, split_info)
  own_pairs = len(range(process_index, num_pairs, process_count))
  num_padding = eval_num_batches(num_pairs, batch_size, process_count) * batch_size - own_pairs

  @tf.autograph.experimental.do_not_convert
  def to_pairs(serialized: tf.Tensor) -> tf.data.Dataset:
    # Only the sentence ids are parsed here; images are decoded after the process filter.
    sent_id = tf.io.parse_single_example(serialized, records.feature_spec(["sentences/sent_id"]))[
      "sentences/sent_id"
    ].values
    return tf.data.Dataset.zip(
      (tf.data.Dataset.from_tensors(serialized).repeat(), tf.data.Dataset.range(tf.size(sent_id, out_type=tf.int64)))
    )

  count_error = (
    f"split {split!r} of {data_dir}: summary.json says {num_pairs} (ref, sentence) pairs but "
    "the shards hold a different number; pairs read:"
  )

  @tf.autograph.experimental.do_not_convert
  def check_count(number: tf.Tensor, pair: Tuple[tf.Tensor, tf.Tensor]):
    # The sentinel (sentence -1) after the last pair carries the number of pairs read.
    is_sentinel = pair[1] < 0
    ok = tf.debugging.Assert(
      tf.where(is_sentinel, number == num_pairs, number < num_pairs),
      [count_error, tf.where(is_sentinel, number, number + 1)],
    )
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
    features = records.parse(serialized, stored_length)
    example, mask = preprocess.example(features, sentence, image_size, context_length, letterbox_mode)
    height, width = tf.shape(mask)[0], tf.shape(mask)[1]
    ok = tf.debugging.Assert(
      tf.logical_and(height <= canvas, width <= canvas),
      [
        f"split {split!r}: ref_id",
        features["ref_id"],
        "has an image of (h, w) =",
        tf.shape(mask),
        f"larger than the evaluation canvas {canvas} (config data.eval_canvas)",
      ],
    )
    with tf.control_dependencies([ok]):
      example["orig_mask"] = tf.ensure_shape(
        tf.pad(mask, [[0, canvas - height], [0, canvas - width]]), [canvas, canvas]
      )
    example["valid"] = valid
    return example

  @tf.autograph.experimental.do_not_convert
  def as_padding(serialized: tf.Tensor, sentence: tf.Tensor):
    return serialized, sentence, tf.constant(False)

  pairs = tf.data.TFRecordDataset(files).flat_map(to_pairs)
  sentinel = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(-1, tf.int64)))
  dataset = pairs.concatenate(sentinel).enumerate().map(check_count).filter(is_own).map(drop_number)
  if num_padding:
    # Padding: the split's first pair (so the model sees a normal input), kept serialized in memory.
    dataset = dataset.concatenate(pairs.take(1).map(as_padding).cache().repeat(num_padding))
  dataset = (
    dataset.map(decode, num_parallel_calls=_AUTOTUNE, deterministic=True)
    .batch(batch_size, drop_remainder=True)
    .prefetch(_AUTOTUNE)
  )
  return dataset.with_options(_options(threads))


def eval_iterator(data_dir: str, split: str, **kwargs) -> Iterator[Batch]:
  """`eval_dataset(...)` as an iterator of NumPy batches (same arguments)."""
  return eval_dataset(data_dir, split, **kwargs).as_numpy_iterator()
