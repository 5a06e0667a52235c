"""Per-example preprocessing of the input pipeline (graph code): decoding, the letterbox, the tokens.

Follows the CRIS protocol that FCNet uses (docs/data.md, "Preprocessing"):

* Letterbox to S×S: scale = min(S/h, S/w) (aspect kept), resized size (nh, nw) = (round(h·scale),
  round(w·scale)) rounded half to even (`tf.round`; at least 1 pixel), bilinear resize WITHOUT antialias,
  centred at (top, left) = ((S-nh)//2, (S-nw)//2), padded with the uint8 CLIP mean colour (123, 117, 104).
  Images ship as uint8 and are normalized on the device, about twice the host throughput of normalizing in
  float32 here.
* The mask goes through the same map: bilinear resize of the 0/1 mask, then a pixel is foreground when the
  interpolate is ≥ 0.5, padding 0. Thresholding the bilinear interpolate (rather than nearest neighbour) puts
  the mask edge where the image edge is, so the inverse letterbox on the device recovers the original mask
  to IoU ≥ 0.99 (tests/test_pipeline.py); only masks thinner than ~30 resized pixels lose more, because the
  threshold moves the edge by up to half a resized pixel.
* Tokens: the stored 77 CLIP ids are cut to L with [EOS] forced last (`records.truncate_tokens`).

The tf.data functions of the pipeline have no Python control flow on tensors, so they skip AutoGraph
(`do_not_convert`), which would only slow their tracing.
"""

from typing import Dict, Tuple

from fcnet_jax import letterbox as letterbox_lib
from fcnet_jax.letterbox import MEAN_RGB_UINT8
from input_pipeline import import_tensorflow
from input_pipeline import records

tf = import_tensorflow()

__all__ = ["MEAN_RGB_UINT8", "decode_image_and_mask", "example", "letterbox", "undecoded_example"]


def _fill(colour: tf.Tensor, rows: tf.Tensor, cols: tf.Tensor) -> tf.Tensor:
  return tf.broadcast_to(colour, tf.stack([rows, cols, 3]))


def letterbox(image: tf.Tensor, mask: tf.Tensor, image_size: int, mode: str = "integer") -> Dict[str, tf.Tensor]:
  """Letterboxes an image and its mask onto an S×S canvas (module docstring; docs/data.md).

  Args:
    image: uint8 h×w×3.
    mask: uint8 h×w, 0/1.
    image_size: S.
    mode: "integer" (ours) or "cris" (CRIS's float affine, `fcnet_jax.letterbox`; config.data.letterbox).

  Returns:
    image uint8 S×S×3 (padding = `MEAN_RGB_UINT8`), mask uint8 S×S (padding 0; foreground = 1, or in "cris"
    mode the interpolated levels 0…255), resized_hw int32 [2], offset int32 [2] (top, left), scale float32 []
    ("cris": the integer letterbox's rounded size and offset, for reference only; the float geometry follows
    from orig_hw).
  """
  geometry = _integer_geometry(tf.shape(image)[0], tf.shape(image)[1], image_size)
  if letterbox_lib.check_mode(mode) == "cris":
    return _cris_letterbox(image, mask, image_size, geometry)
  size = image_size
  resized_h, resized_w = tf.unstack(geometry["resized_hw"])
  top, left = tf.unstack(geometry["offset"])
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

  mask_resized = tf.image.resize(
    tf.cast(mask[..., None], tf.float32), tf.stack([resized_h, resized_w]), method="bilinear", antialias=False
  )[..., 0]
  mask_resized = tf.cast(mask_resized >= 0.5, tf.uint8)
  mask_canvas = tf.pad(mask_resized, tf.stack([tf.stack([top, bottom]), tf.stack([left, right])]))
  mask_canvas = tf.ensure_shape(mask_canvas, [size, size])
  return {"image": canvas, "mask": mask_canvas, **geometry}


def _integer_geometry(height: tf.Tensor, width: tf.Tensor, size: int) -> Dict[str, tf.Tensor]:
  """resized_hw (nh, nw), offset (top, left) and scale of the integer letterbox (module docstring)."""
  # float64 so that (nh, nw) equal a NumPy float64 computation of the same formula bit for bit.
  height_f, width_f = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  scale = tf.minimum(size / height_f, size / width_f)
  resized_h = tf.maximum(tf.cast(tf.round(height_f * scale), tf.int32), 1)
  resized_w = tf.maximum(tf.cast(tf.round(width_f * scale), tf.int32), 1)
  return {
    "resized_hw": tf.stack([resized_h, resized_w]),
    "offset": tf.stack([(size - resized_h) // 2, (size - resized_w) // 2]),
    "scale": tf.cast(scale, tf.float32),
  }


def _cris_letterbox(
  image: tf.Tensor, mask: tf.Tensor, image_size: int, geometry: Dict[str, tf.Tensor]
) -> Dict[str, tf.Tensor]:
  """CRIS's letterbox (OpenCV's warpAffine, reproduced in NumPy) on the host; the integer geometry alongside."""

  def warp(image_np, mask_np):
    return letterbox_lib.cris_letterbox(image_np, mask_np, image_size, MEAN_RGB_UINT8)

  canvas, mask_canvas = tf.numpy_function(warp, [image, mask], [tf.uint8, tf.uint8], stateful=False)
  return {
    "image": tf.ensure_shape(canvas, [image_size, image_size, 3]),
    "mask": tf.ensure_shape(mask_canvas, [image_size, image_size]),
    **geometry,
  }


def decode_image_and_mask(features: Dict[str, tf.Tensor]) -> Tuple[tf.Tensor, tf.Tensor]:
  """Decodes to uint8 h×w×3 RGB (JPEG or PNG, grey/CMYK → RGB, EXIF ignored) and uint8 h×w mask."""
  image = tf.io.decode_image(features["image/encoded"], channels=3, expand_animations=False)
  mask = tf.io.decode_png(features["mask/encoded"], channels=1)[..., 0]
  stored_hw = tf.cast(tf.stack([features["image/height"], features["image/width"]]), tf.int32)
  ok = tf.debugging.Assert(
    tf.logical_and(tf.reduce_all(tf.shape(image)[:2] == stored_hw), tf.reduce_all(tf.shape(mask) == stored_hw)),
    [
      "record of ref_id",
      features["ref_id"],
      "image/height,width =",
      stored_hw,
      "but image/encoded decodes to",
      tf.shape(image)[:2],
      "and mask/encoded to",
      tf.shape(mask),
    ],
  )
  with tf.control_dependencies([ok]):
    return tf.identity(image), tf.identity(mask)


def example(
  features: Dict[str, tf.Tensor],
  sentence: tf.Tensor,
  image_size: int,
  context_length: int,
  letterbox_mode: str = "integer",
) -> Tuple[Dict[str, tf.Tensor], tf.Tensor]:
  """One letterboxed example of sentence number `sentence` of a parsed record (`records.parse`), and the h×w mask."""
  image, mask = decode_image_and_mask(features)
  out = letterbox(image, mask, image_size, letterbox_mode)
  out["tokens"] = records.truncate_tokens(features["sentences/tokens"][sentence], context_length)
  out["orig_hw"] = tf.shape(image)[:2]
  out["ref_id"] = features["ref_id"]
  out["sent_id"] = features["sentences/sent_id"][sentence]
  out["valid"] = tf.constant(True)
  return out, mask


def undecoded_example(
  features: Dict[str, tf.Tensor], sentence: tf.Tensor, image_size: int, context_length: int
) -> Dict[str, tf.Tensor]:
  """`example` without the pixels, for the device letterbox (`input_pipeline.host_decode`): the encoded image
  and mask crop, the integer letterbox geometry of the stored size, and every other key of `example`."""
  stored_hw = tf.cast(tf.stack([features["image/height"], features["image/width"]]), tf.int32)
  out = _integer_geometry(stored_hw[0], stored_hw[1], image_size)
  out["tokens"] = records.truncate_tokens(features["sentences/tokens"][sentence], context_length)
  out["orig_hw"] = stored_hw
  out["ref_id"] = features["ref_id"]
  out["sent_id"] = features["sentences/sent_id"][sentence]
  out["valid"] = tf.constant(True)
  for key in ("image/encoded", records.REENCODED_FEATURE, "mask/crop"):
    out[key] = features[key]
  out["mask_box"] = tf.cast(features["mask/box"], tf.int32)
  return out
