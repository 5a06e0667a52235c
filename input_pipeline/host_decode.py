"""The host half of the training path that letterboxes on the device: decode into flat canvases, nothing else.

`pipeline.train_iterator(device_letterbox=True)` reads, shuffles and parses records in tf.data exactly as the host
path does (the same stream, the same resume), but stops before the pixels: its batches carry the undecoded JPEG
bytes and format 2's mask crop (`records`). `decoded_batches` then decodes each batch in a few Python threads
straight into one zeroed uint8 buffer per batch, and `fcnet_jax.data.letterbox_on_device` does the resize and
the padding on the accelerator. Measured on 2 shared cores (BENCHMARKS.md, "Input pipeline"): the letterbox
resize and the mask PNG decode were about half of the host's time per example, and tf.data's `padded_batch` of
decoded images onto a fixed canvas cost ~1.5 ms per example (one more copy of every pixel; the JPEG decode is ~2.4),
which the decode-in-place here avoids.

Batch keys this adds (B = batch, K = canvas), in place of `image` and `mask`:
  image_raw  uint8 B×(K·K·3)  the decoded h×w×3 RGB image, row-major, at the start of the row; the rest is 0
  mask_raw   uint8 B×(K·K)    the 0/1 mask inside mask_box, row-major, at the start of the row; the rest is 0
  mask_box   int32 B×4        (top, left, height, width) of that crop in the h×w image
The other keys (tokens, orig_hw, resized_hw, offset, scale, ref_id, sent_id, valid) are the host path's.

JPEGs are decoded with libjpeg-turbo through `simplejpeg` with TensorFlow's settings (`fastdct=True`, fancy
upsampling): the pixels equal `tf.io.decode_image` bit for bit (tests/test_pipeline_device.py). CMYK JPEGs and the
re-encoded PNGs go through `tf.io.decode_image`, as on the host path.
"""

import collections
import concurrent.futures
import sys
from typing import Dict, Iterator, Optional

import numpy as np
import simplejpeg

from input_pipeline import import_tensorflow
from input_pipeline import records

# The undecoded features the tf.data half hands over (dropped from the batch once decoded).
ENCODED_KEYS = ("image/encoded", records.REENCODED_FEATURE, "mask/crop")
_JPEG_START = b"\xff\xd8"
_SIMPLEJPEG_COLOURS = ("Gray", "YCbCr", "RGB")  # libjpeg-turbo converts these to RGB itself; CMYK/YCCK it cannot.


def decode_image_into(data: bytes, out: np.ndarray, height: int, width: int, reencoded: bool, ref_id: int) -> None:
  """Decodes an image record's bytes into `out` (uint8, height·width·3), exactly as `tf.io.decode_image` does."""
  if not reencoded and data[:2] == _JPEG_START:
    try:
      jpeg_h, jpeg_w, colour, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
      colour = None  # Left to TensorFlow, which raises its own error if it cannot decode it either.
    if colour in _SIMPLEJPEG_COLOURS:
      if (jpeg_h, jpeg_w) != (height, width):
        raise ValueError(_size_error(ref_id, height, width, (jpeg_h, jpeg_w)))
      # fastdct=True is libjpeg's JDCT_IFAST, TensorFlow's default dct_method; strict=False ignores libjpeg's
      # warnings, as TensorFlow does.
      simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False, buffer=out, strict=False)
      return
  tf = import_tensorflow()
  image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
  if image.shape[:2] != (height, width):
    raise ValueError(_size_error(ref_id, height, width, image.shape[:2]))
  out[:] = image.reshape(-1)


def _size_error(ref_id: int, height: int, width: int, decoded) -> str:
  return (
    f"record of ref_id {ref_id}: image/height,width = ({height}, {width}) but image/encoded decodes to "
    f"{tuple(int(v) for v in decoded)}"
  )


def decode_batch(batch: Dict[str, np.ndarray], canvas: int) -> Dict[str, np.ndarray]:
  """One tf.data batch of undecoded examples → the batch with image_raw / mask_raw (module docstring)."""
  size = len(batch["ref_id"])
  # np.zeros gets pages the kernel zeroes on first touch: the decode writes each pixel once, nothing copies it.
  images = np.zeros((size, canvas * canvas * 3), np.uint8)
  masks = np.zeros((size, canvas * canvas), np.uint8)
  for i in range(size):
    height, width = (int(v) for v in batch["orig_hw"][i])
    ref_id = int(batch["ref_id"][i])
    if height > canvas or width > canvas:
      raise ValueError(
        f"record of ref_id {ref_id}: the image is {height}×{width}, larger than the canvas {canvas} "
        "(config.data.eval_canvas)"
      )
    decode_image_into(
      batch["image/encoded"][i],
      images[i, : height * width * 3],
      height,
      width,
      bool(batch[records.REENCODED_FEATURE][i]),
      ref_id,
    )
    box = batch["mask_box"][i]
    crop = records.decode_mask_crop(batch["mask/crop"][i], box, where=f"record of ref_id {ref_id}")
    if box[0] + box[2] > height or box[1] + box[3] > width:
      raise ValueError(f"record of ref_id {ref_id}: mask/box {tuple(box)} exceeds the {height}×{width} image")
    masks[i, : crop.size] = crop.reshape(-1)
  out = {key: value for key, value in batch.items() if key not in ENCODED_KEYS}
  out["image_raw"], out["mask_raw"] = images, masks
  return out


def decoded_batches(
  batches: Iterator[Dict[str, np.ndarray]], canvas: int, threads: int = 2, prefetch: Optional[int] = None
) -> Iterator[Dict[str, np.ndarray]]:
  """Decodes the undecoded batches of `batches` in `threads` threads (one batch per thread), in order.

  The decoders release the GIL, so `threads` batches decode at once; `prefetch` batches (default threads + 1)
  are kept in flight ahead of the consumer. The output is a pure function of the input batches.
  """
  threads = max(1, threads)
  prefetch = prefetch or threads + 1
  pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="decode")
  pending = collections.deque()
  try:
    for batch in batches:
      pending.append(pool.submit(decode_batch, batch, canvas))
      if len(pending) > prefetch:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    if not sys.is_finalizing():  # A generator closed at interpreter exit finds the modules torn down.
      pool.shutdown(wait=False, cancel_futures=True)
