"""On-device image and mask operations around the letterbox (docs/data.md, "Preprocessing" and "Evaluation").

The host ships letterboxed uint8 images and masks (aspect kept, centred on an S×S canvas); everything here runs
on the accelerator inside `jit`, per example with traced sizes, so batch shapes stay static.

Coordinates. A pixel with index i covers the continuous interval [i, i + 1) and has its centre at i + 0.5. The
letterbox resizes an h×w image to nh×nw with half-pixel centres (tf.image.resize) and places it at (top, left),
so an original continuous coordinate y lands at canvas coordinate `top + y·nh/h` (likewise for x). The model
predicts at P = S/r (r = 4). Its training target is `downsample_mask` of the canvas mask, which takes canvas
pixel ⌊i·S/P⌋ = r·i for prediction pixel i (PyTorch nearest, as CRIS), so a trained prediction pixel i shows the
canvas at pixel r·i, i.e. continuous canvas coordinate r·i + 0.5; `inverse_letterbox` inverts exactly that
relation. The block-centre relation r·i + r/2 (what `jax.image.scale_and_translate` assumes, right for
area-averaged targets) would be wrong for these targets: 1.5 canvas pixels off for r = 4, about 2 original pixels
for a 640-pixel side at S = 480, which costs ~1–2 IoU points on mid-sized objects.
"""

from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# CLIP's RGB statistics on [0, 1] pixels (docs/data.md, "Preprocessing").
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_images(images: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
  """B×S×S×3 uint8 RGB → B×S×S×3 `dtype`, (x/255 − CLIP mean) / CLIP std.

  The host pads with the uint8 mean colour (123, 117, 104), as CRIS does, which normalizes to |x| < 0.004.
  The arithmetic is float32 whatever `dtype` is; only the result is cast.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"batch['image'] must be B×S×S×3, got shape {images.shape}")
  mean = jnp.asarray(CLIP_MEAN, jnp.float32)
  std = jnp.asarray(CLIP_STD, jnp.float32)
  normalized = (images.astype(jnp.float32) / 255.0 - mean) / std
  return normalized.astype(dtype)


def downsample_mask(mask: jax.Array, out_hw: Sequence[int]) -> jax.Array:
  """B×H×W → B×h×w nearest neighbour, source index ⌊i·H/h⌋ like PyTorch `F.interpolate(mode='nearest')`.

  This is the training target at H/4 (CRIS). The indices are static, so this is a cheap gather under jit.
  """
  if mask.ndim != 3:
    raise ValueError(f"downsample_mask expects a B×H×W mask, got shape {mask.shape}")
  out_h, out_w = (int(s) for s in out_hw)
  in_h, in_w = mask.shape[1:]
  rows = (np.arange(out_h) * in_h) // out_h  # Exact integer floor(i * in / out).
  cols = (np.arange(out_w) * in_w) // out_w
  return mask[:, rows][:, :, cols]


def _axis_taps(
  out_size: int, pred_size: int, image_size: int, start: jax.Array, resized: jax.Array, original: jax.Array
) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Bilinear taps along one axis: original pixel k → prediction indices (i0, i1) and the weight of i1.

  Scalars `start` (top or left), `resized` (nh or nw) and `original` (h or w) are traced per example.
  Only prediction pixels whose sample point lies on the resized image are used; beyond the first/last of them
  the value is held (edge clamp). Pixels on the padding were trained towards 0 and would otherwise erode
  objects that touch the image border by up to one prediction pixel.
  """
  ratio = image_size / pred_size  # r (4 for S/4 predictions).
  centres = jnp.arange(out_size, dtype=jnp.float32) + 0.5
  start = start.astype(jnp.float32)
  # Guard against 0 sizes on padding examples (their output is masked out, but must not be NaN indices).
  scale = jnp.maximum(resized, 1).astype(jnp.float32) / jnp.maximum(original, 1).astype(jnp.float32)
  canvas = start + centres * scale  # Continuous canvas coordinate.
  end = start + resized.astype(jnp.float32)  # The resized image covers canvas [start, end).
  index = (canvas - 0.5) / ratio  # Prediction pixel i shows canvas pixel r·i (centre r·i + 0.5).
  first, last = jnp.ceil(start / ratio), jnp.floor((end - 1.0) / ratio)  # r·i ∈ [start, end − 1].
  first = jnp.clip(first, 0.0, pred_size - 1.0)
  last = jnp.clip(jnp.maximum(last, first), 0.0, pred_size - 1.0)
  index = jnp.clip(index, first, last)
  if pred_size == 1:
    zeros = jnp.zeros(out_size, jnp.int32)
    return zeros, zeros, jnp.zeros(out_size, jnp.float32)
  i0 = jnp.minimum(jnp.floor(index).astype(jnp.int32), pred_size - 2)
  return i0, i0 + 1, index - i0.astype(jnp.float32)


def inverse_letterbox(
  prob: jax.Array, resized_hw: jax.Array, offset: jax.Array, orig_hw: jax.Array, canvas: int, image_size: int
) -> jax.Array:
  """Maps B×P×P predictions back to the original image frame: B×K×K, the image at the top-left.

  Bilinear interpolation (no antialiasing) of the inverse letterbox map, per example with traced sizes, so it
  works under jit and vmap. Output pixel (i, j) with i < h, j < w is the prediction at the original pixel
  centre; the rest of the K×K canvas is meaningless — AND with `valid_region(orig_hw, canvas)`. Prediction
  pixel i is taken to show canvas pixel r·i, as in targets made by `downsample_mask` (see the module docstring).

  Args:
    prob: B×P×P float predictions (probabilities; interpolating logits is possible but not CRIS).
    resized_hw: B×2 int (nh, nw) resized size on the S×S letterbox canvas (the rounded size actually used).
    offset: B×2 int (top, left) of the resized image on the letterbox canvas.
    orig_hw: B×2 int (h, w) original image size, h, w ≤ canvas.
    canvas: K, the side of the original-frame canvas (config.data.eval_canvas).
    image_size: S, the side of the letterbox canvas (config.model.image_size).

  Returns:
    B×K×K float32.
  """
  if prob.ndim != 3 or prob.shape[1] != prob.shape[2]:
    raise ValueError(f"inverse_letterbox expects B×P×P predictions, got shape {prob.shape}")
  pred_size = prob.shape[1]
  if image_size % pred_size:
    raise ValueError(
      f"image_size={image_size} (config.model.image_size) is not a multiple of the prediction size {pred_size}"
    )

  def one_example(prob_e, resized_e, offset_e, orig_e):
    r0, r1, rw = _axis_taps(canvas, pred_size, image_size, offset_e[0], resized_e[0], orig_e[0])
    c0, c1, cw = _axis_taps(canvas, pred_size, image_size, offset_e[1], resized_e[1], orig_e[1])
    rows = prob_e[r0] * (1.0 - rw)[:, None] + prob_e[r1] * rw[:, None]  # K×P
    return rows[:, c0] * (1.0 - cw)[None, :] + rows[:, c1] * cw[None, :]  # K×K

  return jax.vmap(one_example)(prob.astype(jnp.float32), resized_hw, offset, orig_hw)


def valid_region(orig_hw: jax.Array, canvas: int) -> jax.Array:
  """B×K×K bool: True on pixel (i, j) with i < h and j < w, the original image inside the K×K canvas."""
  index = jnp.arange(canvas)
  rows = index[None, :] < orig_hw[:, 0, None]
  cols = index[None, :] < orig_hw[:, 1, None]
  return rows[:, :, None] & cols[:, None, :]


def batch_iou_terms(
  prob: jax.Array, target: jax.Array, threshold: float, region: Optional[jax.Array] = None
) -> Tuple[jax.Array, jax.Array]:
  """Per-example intersection and union pixel counts of `prob > threshold` (strict, CRIS) and `target`.

  Args:
    prob: B×H×W probabilities (pass logits with threshold log(t/(1−t)) for the same decision).
    target: B×H×W ground truth, nonzero = object.
    threshold: decision threshold (config.mask_threshold, 0.35).
    region: optional B×H×W bool; pixels outside it count for neither prediction nor ground truth.

  Returns:
    (intersection, union), each B int32 (exact: counts < 2^31).
  """
  if prob.shape != target.shape:
    raise ValueError(f"prediction {prob.shape} and ground-truth mask {target.shape} shapes differ")
  predicted = prob > threshold
  truth = target != 0
  if region is not None:
    predicted &= region
    truth &= region
  intersection = jnp.sum(predicted & truth, axis=(1, 2), dtype=jnp.int32)
  union = jnp.sum(predicted | truth, axis=(1, 2), dtype=jnp.int32)
  return intersection, union
