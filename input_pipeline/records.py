"""The TFRecord format of converted RefCOCO-family shards: one `tf.train.Example` per ref.

This module is the single definition of the record layout shared by the converter (writer) and the input
pipeline (reader). It imports TensorFlow lazily so the names can be read without it.

Layout on disk (written by `input_pipeline.convert`):
  <out>/summary.json                                  dataset, split_by, context_length, splits{name: {refs,
                                                      sentences, shards}}
  <out>/<split>/<split>-<i:05d>-of-<n:05d>.tfrecord   uncompressed TFRecord shards

Features of one record (one ref):
  image/encoded      bytes     the original JPEG bytes (decoded in the stored pixel frame: EXIF is ignored,
                               which is the frame COCO's masks are drawn in)
  image/height       int64     original height (pixels)
  image/width        int64     original width
  mask/encoded       bytes     single-channel PNG, values 0/1, height×width, the referred annotation
  ref_id, ann_id, image_id, category_id   int64
  bbox               float[4]  COCO xywh of the referred annotation
  sentences/sent     bytes[N]  the normalized sentences (`sent`) of the ref
  sentences/sent_id  int64[N]
  sentences/tokens   int64[N*T] CLIP token ids, row-major N×T with T = summary["context_length"] (77), [SOS]…[EOS]
                               zero-padded; truncate to the configured L with `truncate_tokens`.
"""
from typing import Dict

import numpy as np

from fcnet_jax.tokenizer import EOT_TOKEN

SUMMARY_FILE = "summary.json"
STORED_CONTEXT_LENGTH = 77  # CLIP's full context; the configured L (17/22) is cut at read time.


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def feature_spec() -> Dict[str, object]:
  """The `tf.io.parse_single_example` spec of a record."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return {
      "image/encoded": tf.io.FixedLenFeature([], tf.string),
      "image/height": tf.io.FixedLenFeature([], tf.int64),
      "image/width": tf.io.FixedLenFeature([], tf.int64),
      "mask/encoded": tf.io.FixedLenFeature([], tf.string),
      "ref_id": tf.io.FixedLenFeature([], tf.int64),
      "ann_id": tf.io.FixedLenFeature([], tf.int64),
      "image_id": tf.io.FixedLenFeature([], tf.int64),
      "category_id": tf.io.FixedLenFeature([], tf.int64),
      "bbox": tf.io.FixedLenFeature([4], tf.float32),
      "sentences/sent": tf.io.VarLenFeature(tf.string),
      "sentences/sent_id": tf.io.VarLenFeature(tf.int64),
      "sentences/tokens": tf.io.VarLenFeature(tf.int64),
  }


def truncate_tokens(tokens: np.ndarray, context_length: int) -> np.ndarray:
  """Cuts N×T token rows to N×L the way CLIP's `tokenize(..., truncate=True)` does: [EOS] forced last.

  A row whose [EOS] does not fall within the first L tokens keeps its first L-1 tokens and ends with [EOS].
  (Id 0 is also a real BPE token, "!" without end-of-word, so overflow is detected by the missing [EOS], not by a
  non-zero token at position L.)
  """
  tokens = np.asarray(tokens)
  if context_length > tokens.shape[-1]:
    raise ValueError(f"context_length={context_length} exceeds the stored token length {tokens.shape[-1]}")
  out = tokens[..., :context_length].copy()
  overflow = ~np.any(out == EOT_TOKEN, axis=-1)
  out[..., context_length - 1] = np.where(overflow, EOT_TOKEN, out[..., context_length - 1])
  return out
