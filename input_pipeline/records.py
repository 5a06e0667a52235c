"""The TFRecord format of converted RefCOCO-family shards: one `tf.train.Example` per ref.

The one definition of the record layout: the writer (`make_example`, used by the converter, the throughput
tool's fake data and the tests), the reader (`feature_spec`, `parse`) and the rule that cuts the stored token
ids to the configured context length (`truncate_tokens`). TensorFlow is imported only when a function needs it,
so the names and constants can be read without it. docs/data.md describes the format for users.

Layout on disk (written by `input_pipeline.convert`):
  <out>/summary.json                                  format_version, dataset, split_by, context_length,
                                                      splits{name: {refs, sentences, shards, skipped_refs,
                                                      reencoded_refs}}
  <out>/<split>/<split>-<i:05d>-of-<n:05d>.tfrecord   uncompressed TFRecord shards
  <out>/dataset_info.json, features.json              TFDS metadata (`input_pipeline.tfds_metadata`)

Record format versions (summary.json `format_version`; absent means 1):
  1  the features below without mask/crop and mask/box.
  2  adds mask/crop and mask/box, so the training path that letterboxes on the device
     (`pipeline.train_iterator(device_letterbox=True)`) gets the mask without decoding a PNG. Every feature of
     version 1 is kept, so readers of version 1 read version 2.

Features of one record (one ref):
  image/encoded      bytes     the original JPEG bytes (decoded in the stored pixel frame: EXIF is ignored,
                               which is the frame COCO's masks are drawn in), or a lossless RGB PNG
  image/reencoded    int64     1 when image/encoded is such a PNG (the original could not be stored), else 0
  image/height       int64     original height (pixels)
  image/width        int64     original width
  mask/encoded       bytes     single-channel PNG, values 0/1, height×width, the referred annotation
  mask/crop          bytes     (v2) zlib of the uint8 0/1 mask inside mask/box, row-major (empty when no pixel is set)
  mask/box           int64[4]  (v2) top, left, height, width of the smallest box holding every foreground pixel
  ref_id, ann_id, image_id, category_id   int64
  bbox               float[4]  COCO xywh of the referred annotation
  sentences/sent     bytes[N]  the normalized sentences (`sent`) of the ref
  sentences/sent_id  int64[N]
  sentences/tokens   int64[N*T] CLIP token ids, row-major N×T with T = summary["context_length"] (77), [SOS]…[EOS]
                               zero-padded; cut to the configured L with `truncate_tokens`.
"""

import io
from typing import Dict, Optional, Sequence, Tuple
import zlib

import numpy as np
from PIL import Image

from fcnet_jax.tokenizer import EOT_TOKEN
from input_pipeline import import_tensorflow

SUMMARY_FILE = "summary.json"
FORMAT_VERSION = 2  # What the converter writes (module docstring).
STORED_CONTEXT_LENGTH = 77  # CLIP's full context; the configured L (17/22) is cut at read time.
REENCODED_FEATURE = "image/reencoded"


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def encode_mask_png(mask: np.ndarray) -> bytes:
  """Single-channel PNG of an H×W 0/1 mask (values stay 0/1): the mask/encoded feature."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(mask, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def mask_box(mask: np.ndarray) -> Tuple[int, int, int, int]:
  """(top, left, height, width) of the smallest box holding every non-zero pixel; (0, 0, 0, 0) when none is."""
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  if rows.size == 0:
    return 0, 0, 0, 0
  return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def encode_mask_crop(mask: np.ndarray) -> Tuple[bytes, Tuple[int, int, int, int]]:
  """The mask/crop and mask/box features of an H×W 0/1 mask (format 2)."""
  top, left, height, width = box = mask_box(mask)
  crop = np.ascontiguousarray(np.asarray(mask, np.uint8)[top : top + height, left : left + width])
  return zlib.compress(crop.tobytes(), 6), box


def decode_mask_crop(crop: bytes, box: Sequence[int], where: str = "") -> np.ndarray:
  """The uint8 height×width crop of mask/crop and mask/box (NumPy; zlib releases the GIL on large inputs)."""
  height, width = int(box[2]), int(box[3])
  values = np.frombuffer(zlib.decompress(crop), np.uint8) if height * width else np.zeros(0, np.uint8)
  if values.size != height * width:
    raise ValueError(f"{where}: mask/crop holds {values.size} pixels but mask/box is {height}×{width}")
  return values.reshape(height, width)


def make_example(
  *,
  image: bytes,
  height: int,
  width: int,
  mask: np.ndarray,
  ref_id: int,
  ann_id: int,
  image_id: int,
  category_id: int,
  bbox: Sequence[float],
  sents: Sequence[str],
  sent_ids: Sequence[int],
  tokens: np.ndarray,
  reencoded: bool = False,
  format_version: int = FORMAT_VERSION,
) -> bytes:
  """The serialized `tf.train.Example` of one ref; `mask` is the 0/1 height×width mask, `tokens` N×T (T =
  `STORED_CONTEXT_LENGTH` on disk). `format_version=1` writes the older layout (to measure the old path).

  Serialized deterministically (fields in key order), so the same ref always gives the same bytes: a rerun of
  the converter, in any process, writes byte-equal shards.
  """
  tf = import_tensorflow()
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[0] != len(sents) or len(sent_ids) != len(sents):
    raise ValueError(
      f"ref_id={ref_id}: {len(sents)} sentences, {len(sent_ids)} sent_ids and tokens of shape "
      f"{tokens.shape} do not match (need N sentences, N ids and N×T tokens)"
    )
  mask = np.asarray(mask, np.uint8)
  if mask.shape != (height, width) or mask.max(initial=0) > 1:
    raise ValueError(f"ref_id={ref_id}: the mask must be 0/1 of shape ({height}, {width}); got shape {mask.shape}")
  if format_version not in (1, 2):
    raise ValueError(f"format_version={format_version}; this code writes 1 or 2")
  feature = tf.train.Feature
  ints = lambda values: feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
  raw = lambda values: feature(bytes_list=tf.train.BytesList(value=list(values)))
  features = {
    "image/encoded": raw([image]),
    "image/height": ints([height]),
    "image/width": ints([width]),
    REENCODED_FEATURE: ints([reencoded]),
    "mask/encoded": raw([encode_mask_png(mask)]),
    "ref_id": ints([ref_id]),
    "ann_id": ints([ann_id]),
    "image_id": ints([image_id]),
    "category_id": ints([category_id]),
    "bbox": feature(float_list=tf.train.FloatList(value=[float(v) for v in bbox])),
    "sentences/sent": raw([s.encode("utf-8") for s in sents]),
    "sentences/sent_id": ints(sent_ids),
    "sentences/tokens": ints(tokens.reshape(-1)),
  }
  if format_version >= 2:
    crop, box = encode_mask_crop(mask)
    features["mask/crop"], features["mask/box"] = raw([crop]), ints(box)
  example = tf.train.Example(features=tf.train.Features(feature=features))
  return example.SerializeToString(deterministic=True)


def feature_spec(keys: Optional[Sequence[str]] = None) -> Dict[str, object]:
  """The `tf.io.parse_single_example` spec of a record, or of its features `keys` only (cheaper to parse)."""
  tf = import_tensorflow()
  spec = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    # A record written without it holds the original image bytes.
    REENCODED_FEATURE: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "mask/encoded": tf.io.FixedLenFeature([], tf.string),
    # Format 2 only (a format 1 record reads as an empty crop: check the format before relying on them).
    "mask/crop": tf.io.FixedLenFeature([], tf.string, default_value=b""),
    "mask/box": tf.io.FixedLenFeature([4], tf.int64, default_value=[0, 0, 0, 0]),
    "ref_id": tf.io.FixedLenFeature([], tf.int64),
    "ann_id": tf.io.FixedLenFeature([], tf.int64),
    "image_id": tf.io.FixedLenFeature([], tf.int64),
    "category_id": tf.io.FixedLenFeature([], tf.int64),
    "bbox": tf.io.FixedLenFeature([4], tf.float32),
    "sentences/sent": tf.io.VarLenFeature(tf.string),
    "sentences/sent_id": tf.io.VarLenFeature(tf.int64),
    "sentences/tokens": tf.io.VarLenFeature(tf.int64),
  }
  return spec if keys is None else {key: spec[key] for key in keys}


def parse(serialized, stored_length: int) -> Dict[str, object]:
  """Parses one serialized record (graph code); `sentences/tokens` comes back as N×T int64, T = `stored_length`.

  A record without sentences, or whose token count is not N×T, fails with an error naming its ref_id.
  """
  tf = import_tensorflow()
  features = tf.io.parse_single_example(serialized, feature_spec())
  sent_id = features["sentences/sent_id"].values
  tokens = features["sentences/tokens"].values
  num_sentences = tf.size(sent_id)
  ok = tf.debugging.Assert(
    tf.logical_and(num_sentences > 0, tf.size(tokens) == num_sentences * stored_length),
    [
      "record of ref_id",
      features["ref_id"],
      f"needs >= 1 sentence and sentences/tokens of size N*{stored_length} (summary.json context_length); N, size =",
      num_sentences,
      tf.size(tokens),
    ],
  )
  with tf.control_dependencies([ok]):
    features["sentences/tokens"] = tf.reshape(tokens, [num_sentences, stored_length])
  features["sentences/sent_id"] = sent_id
  return features


def truncate_tokens(tokens, context_length: int):
  """Cuts rows of T token ids to L the way CLIP's `tokenize(..., truncate=True)` does: [EOS] forced last.

  A row with no [EOS] within its first L ids did not fit: it keeps its first L-1 ids and ends with [EOS]. Overflow
  is told by the missing [EOS] and not by a non-zero id at position L, because id 0 is also a real BPE token ("!"
  not at the end of a word, as in "dog!;"), not only the padding.

  Args:
    tokens: int …×T (a tensor or an array), each row [SOS] … [EOS] zero-padded.
    context_length: L ≤ T.

  Returns:
    int32 …×L tensor.
  """
  tf = import_tensorflow()
  tokens = tf.convert_to_tensor(tokens)
  stored_length = tokens.shape[-1]
  if stored_length is not None and context_length > stored_length:
    raise ValueError(f"context_length={context_length} exceeds the stored token length {stored_length}")
  cut = tokens[..., :context_length]
  overflow = tf.logical_not(tf.reduce_any(cut == tf.constant(EOT_TOKEN, cut.dtype), axis=-1))
  last = tf.where(overflow, tf.constant(EOT_TOKEN, cut.dtype), cut[..., context_length - 1])
  return tf.cast(tf.concat([cut[..., : context_length - 1], last[..., None]], axis=-1), tf.int32)
