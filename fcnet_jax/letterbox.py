"""Letterbox geometry and the interpolation that CRIS's protocol uses, for the host (NumPy) and the device (jax).

Two letterboxes exist in this project (`config.data.letterbox`, docs/data.md "Preprocessing"):
  * "integer" (default): the image is resized to the rounded size round(h·s) × round(w·s) and pasted at an
    integer offset (tf.image.resize, bilinear, half-pixel centres); evaluation maps the H/4 prediction back with
    one bilinear map (`image_ops.inverse_letterbox`).
  * "cris": CRIS's float affine. s = min(S/h, S/w), the image spans h·s × w·s (not rounded) and is centred with
    the float bias ((S − w·s)/2, (S − h·s)/2): OpenCV `warpAffine` of the image (INTER_CUBIC, mean-colour border)
    and of the mask (INTER_LINEAR, soft targets /255). Evaluation upsamples the H/4 probabilities to S with
    PyTorch's bicubic `align_corners=True`, warps them back to the original size with `warpAffine` INTER_CUBIC
    and border 0, thresholds and scores IoU = I / (U + 1e-6).

Both CRIS steps are separable linear maps, because the letterbox affine is a scale and a shift per axis, so they
are written here as per-axis taps (index, weight, valid) that reproduce the two libraries:
  * OpenCV's warpAffine maps output pixel index x to the source coordinate m·x + c in fixed point: 10 fractional
    bits, rounded (`cvRound`), then cut to 1/32 pixel (INTER_BITS = 5) with a rounding offset; taps outside the
    source read the border value (BORDER_CONSTANT).
  * PyTorch's bicubic with align_corners=True samples source coordinate i·(in − 1)/(out − 1) and clamps taps to
    the edge.
  * Both use the cubic convolution kernel with a = −0.75 (`jax.image` uses a = −0.5, so it is not used here).
Every function takes `xp` (numpy or jax.numpy), so the input pipeline and the jitted evaluation share one
definition of the geometry.

`bilinear_canvas_taps` and `bilinear_canvas` are the "integer" letterbox's resize (`tf.image.resize` bilinear with
half-pixel centres, no antialias) in TensorFlow's float32 arithmetic, bit for bit, for NumPy and jax alike:
`integer_letterbox` (prediction without TensorFlow, `fcnet_jax.predict`) and the jitted
`fcnet_jax.data.letterbox_on_device` (the training path that ships decoded images) are both built on them.
`letterbox_image` picks either mode's image letterbox.
"""

from typing import Any, Callable, Tuple

import numpy as np

CUBIC_A = -0.75  # OpenCV's and PyTorch's bicubic kernel parameter.
LETTERBOX_MODES = ("integer", "cris")
# The value of a foreground pixel in the letterboxed uint8 mask each mode ships: 0/1 masks for "integer", OpenCV's
# linearly interpolated 0…255 levels for "cris". The training target is mask / MASK_LEVELS[mode].
MASK_LEVELS = {"integer": 1, "cris": 255}
CRIS_IOU_EPSILON = 1e-6  # IoU = I / (U + ε): an empty union scores 0 under CRIS's protocol.
_INTER_BITS = 5  # OpenCV: sub-pixel positions in 1/32 pixel.
_AB_BITS = 10  # OpenCV warpAffine: fixed-point bits of the mapped coordinates.
# The CLIP mean colour (0.48145466, 0.4578275, 0.40821073) × 255, rounded: the letterbox padding of both modes.
MEAN_RGB_UINT8 = (123, 117, 104)


def check_mode(mode: str) -> str:
  if mode not in LETTERBOX_MODES:
    raise ValueError(f"config.data.letterbox={mode!r}; expected one of {LETTERBOX_MODES}")
  return mode


def cris_affine(height: Any, width: Any, size: int, xp: Any = np) -> Tuple[Any, Any, Any]:
  """CRIS's letterbox of an h×w image on an S×S canvas: (scale, bias_y, bias_x), floats.

  Original pixel index (y, x) lands on canvas coordinate (scale·y + bias_y, scale·x + bias_x) (OpenCV maps
  pixel indices, not pixel centres).
  """
  height = xp.asarray(height, xp.float32)
  width = xp.asarray(width, xp.float32)
  scale = xp.minimum(size / xp.maximum(height, 1.0), size / xp.maximum(width, 1.0))
  return scale, (size - height * scale) / 2.0, (size - width * scale) / 2.0


def inverse_geometry(resized_hw: Any, offset: Any, orig_hw: Any, image_size: int, mode: str, xp: Any = np):
  """The (resized_hw, offset) that `image_ops.inverse_letterbox` maps back through, for letterbox `mode`.

  "integer": the batch's rounded geometry itself. "cris": CRIS's float affine of each B×2 (h, w) in pixel-centre
  coordinates: OpenCV maps pixel indices (index i → scale·i + bias), so the image starts at bias + (1 − scale)/2
  and spans h·scale canvas pixels. Evaluation's protocol ("ours", `metrics.eval_step_outputs`) and the predictor.
  """
  if check_mode(mode) != "cris":
    return resized_hw, offset
  scale, bias_y, bias_x = cris_affine(orig_hw[:, 0], orig_hw[:, 1], image_size, xp)
  resized = xp.asarray(orig_hw, xp.float32) * scale[:, None]
  return resized, xp.stack([bias_y, bias_x], axis=-1) + 0.5 * (1.0 - scale[:, None])


def cubic_coefficients(t: Any, xp: Any = np) -> Any:
  """(..., 4) weights of the taps at floor − 1, floor, floor + 1, floor + 2 for fraction t ∈ [0, 1)."""
  a = CUBIC_A
  near = lambda x: ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0  # |x| ≤ 1
  far = lambda x: ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a  # 1 < |x| < 2
  w0, w1, w2 = far(t + 1.0), near(t), near(1.0 - t)
  return xp.stack([w0, w1, w2, 1.0 - w0 - w1 - w2], axis=-1)


def warp_taps(out_size: int, src_size: Any, slope: Any, offset: Any, kind: str, xp: Any = np) -> Tuple[Any, Any, Any]:
  """OpenCV warpAffine's taps along one axis: output index i reads source coordinate slope·i + offset.

  Returns (index, weight, valid), each out_size × n (n = 4 for "cubic", 2 for "linear"); `valid` is False for
  taps outside [0, src_size), which read the border value.
  """
  ab_scale = float(1 << _AB_BITS)
  tab = 1 << _INTER_BITS
  i = xp.arange(out_size, dtype=xp.float32)
  # X0 = cvRound(offset·2^10) + 2^4, Δ(i) = cvRound(slope·i·2^10), X = (X0 + Δ) >> 5: 1/32-pixel units.
  fixed = xp.round(offset * ab_scale) + ab_scale / tab / 2.0 + xp.round(slope * i * ab_scale)
  position = xp.floor(fixed / float(1 << (_AB_BITS - _INTER_BITS)))
  base = xp.floor(position / tab)
  t = (position - base * tab) / tab
  if kind == "cubic":
    weight = cubic_coefficients(t, xp)
    index = base[:, None] + xp.arange(-1, 3, dtype=xp.float32)[None, :]
  elif kind == "linear":
    weight = xp.stack([1.0 - t, t], axis=-1)
    index = base[:, None] + xp.arange(0, 2, dtype=xp.float32)[None, :]
  else:
    raise ValueError(f"kind={kind!r}; expected 'cubic' or 'linear'")
  valid = (index >= 0) & (index < src_size)
  index = xp.clip(index, 0, xp.maximum(src_size - 1, 0)).astype(xp.int32)
  return index, weight.astype(xp.float32), valid


def taps_matrix(index: Any, weight: Any, valid: Any, src_size: int, xp: Any = np) -> Any:
  """The out × src_size matrix of per-axis taps (invalid taps contribute nothing: a zero border)."""
  one_hot = index[..., None] == xp.arange(src_size)[None, None, :]
  return xp.sum(xp.where(one_hot & valid[..., None], weight[..., None], 0.0), axis=1)


def torch_bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
  """out × in float32 matrix of PyTorch `F.interpolate(mode="bicubic", align_corners=True)` along one axis."""
  scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
  source = np.float32(scale) * np.arange(out_size, dtype=np.float32)
  base = np.floor(source)
  weight = cubic_coefficients(source - base)
  index = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.repeat(np.arange(out_size), 4), index.ravel()), weight.ravel())
  return matrix.astype(np.float32)


def _warp_separable(
  image: np.ndarray, rows: Tuple[Any, Any, Any], cols: Tuple[Any, Any, Any], border: np.ndarray
) -> np.ndarray:
  """Σ_ij w_i w_j v(y_i, x_j) with v = border outside the source: rows first, then columns (float64)."""
  (r_index, r_weight, r_valid), (c_index, c_weight, c_valid) = rows, cols
  image = image.astype(np.float64)
  border = np.asarray(border, np.float64)
  taps = np.where(r_valid[..., None, None], image[r_index], border)  # out_h × n × w × C
  along_rows = np.einsum("hn,hnwc->hwc", r_weight.astype(np.float64), taps)
  taps = np.where(c_valid[None, ..., None], along_rows[:, c_index], border)  # out_h × out_w × n × C
  return np.einsum("wn,hwnc->hwc", c_weight.astype(np.float64), taps)


def cris_letterbox(
  image: np.ndarray, mask: np.ndarray, size: int, mean_rgb: Tuple[int, int, int]
) -> Tuple[np.ndarray, np.ndarray]:
  """CRIS's preprocessing of one example on the host: (S×S×3 uint8 image, S×S uint8 mask levels 0…255).

  The image as `cv2.warpAffine(image, M, (S, S), INTER_CUBIC, borderValue=mean)`, the 0/1 mask as
  `cv2.warpAffine(mask·255, M, (S, S), INTER_LINEAR, borderValue=0)`, rounded like OpenCV's uint8 output. CRIS
  trains on the soft target mask / 255 (`MASK_LEVELS["cris"]`).
  """
  height, width = image.shape[:2]
  scale, bias_y, bias_x = (float(v) for v in cris_affine(height, width, size))
  # OpenCV inverts the forward map: canvas index i reads original coordinate (i − bias) / scale.
  axis = lambda src, bias, kind: warp_taps(size, src, 1.0 / scale, -bias / scale, kind)
  warped = _warp_separable(
    image, axis(height, bias_y, "cubic"), axis(width, bias_x, "cubic"), np.asarray(mean_rgb, np.float64)
  )
  soft = _warp_separable(
    np.asarray(mask, np.float64)[..., None] * 255.0,
    axis(height, bias_y, "linear"),
    axis(width, bias_x, "linear"),
    np.zeros(1),
  )
  image_out = np.clip(np.round(warped), 0, 255).astype(np.uint8)
  return image_out, np.clip(np.round(soft[..., 0]), 0, 255).astype(np.uint8)


def cris_inverse(prob: Any, orig_hw: Any, canvas: int, image_size: int) -> Any:
  """CRIS's post-processing on the device: B×P×P probabilities → B×K×K in the original frame (top-left).

  The PyTorch bicubic upsampling to S×S (align_corners=True) and OpenCV's INTER_CUBIC warp back to the original
  size (border 0) are folded into one K×P matrix per axis and example, so the whole map is two matmuls; the
  output equals the two libraries' result up to float rounding. Pixels (i, j) with i ≥ h or j ≥ w are
  meaningless: AND with `image_ops.valid_region(orig_hw, canvas)`.
  """
  import jax  # pylint: disable=g-import-not-at-top  (the host-side functions above need only NumPy)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  pred_size = prob.shape[1]
  upsample = jnp.asarray(torch_bicubic_matrix(image_size, pred_size))  # S×P
  highest = jax.lax.Precision.HIGHEST

  def axis_map(scale, bias):
    # CRIS passes the inverse matrix to warpAffine, which inverts it: original index i reads canvas scale·i + bias.
    taps = warp_taps(canvas, image_size, scale, bias, "cubic", jnp)
    return jnp.matmul(taps_matrix(*taps, image_size, jnp), upsample, precision=highest)  # K×P

  def one_example(prob_e, hw_e):
    scale, bias_y, bias_x = cris_affine(hw_e[0], hw_e[1], image_size, jnp)
    rows, cols = axis_map(scale, bias_y), axis_map(scale, bias_x)
    return jnp.matmul(jnp.matmul(rows, prob_e, precision=highest), cols.T, precision=highest)

  return jax.vmap(one_example)(prob.astype(jnp.float32), orig_hw)


# ----------------------------------------------------------------------------------------------------- integer


def integer_geometry(height: int, width: int, size: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
  """((nh, nw), (top, left)) of the integer letterbox of an h×w image on an S×S canvas.

  scale = min(S/h, S/w) in float64, (nh, nw) = round-half-even(h·scale, w·scale) (at least 1), centred with
  (top, left) = ((S − nh) // 2, (S − nw) // 2): `input_pipeline.preprocess`'s geometry in the same float64
  arithmetic, so both give the same integers.
  """
  scale = min(size / np.float64(height), size / np.float64(width))
  resized_h = max(int(np.round(np.float64(height) * scale)), 1)
  resized_w = max(int(np.round(np.float64(width) * scale)), 1)
  return (resized_h, resized_w), ((size - resized_h) // 2, (size - resized_w) // 2)


def _no_fma(value: Any, xp: Any) -> Any:
  """`value`, kept from being fused with the next addition into one FMA (which rounds once instead of twice) by XLA;
  NumPy never fuses."""
  if xp is np:
    return value
  import jax  # pylint: disable=g-import-not-at-top

  return jax.lax.optimization_barrier(value)


def bilinear_canvas_taps(canvas: int, size: Any, resized: Any, start: Any, xp: Any = np) -> Tuple[Any, Any, Any, Any]:
  """TensorFlow's bilinear taps (half-pixel centres, no antialias) along one axis of an integer letterbox.

  An image axis of `size` pixels is resized to `resized` and pasted at `start` on a `canvas`-pixel axis: canvas
  index i shows resized pixel i − start, which samples source coordinate (i − start + 0.5)·size/resized − 0.5 in
  float32, as TensorFlow's kernel computes it; the taps are its floor and ceil clamped to the image, the upper
  tap's weight its fraction. Returns (lower, upper, lerp, inside) per canvas index. Sizes may be traced (xp=jnp).
  """
  index = xp.arange(canvas, dtype=xp.int32) - start
  scale = xp.asarray(size, xp.float32) / xp.asarray(resized, xp.float32)
  source = _no_fma((index.astype(xp.float32) + xp.float32(0.5)) * scale, xp) - xp.float32(0.5)
  floor = xp.floor(source)
  # Clamped to the image (on the padding too, whose taps are computed and then discarded: valid indices there).
  lower = xp.clip(floor.astype(xp.int32), 0, size - 1)
  upper = xp.clip(xp.ceil(source).astype(xp.int32), 0, size - 1)
  return lower, upper, (source - floor).astype(xp.float32), (index >= 0) & (index < resized)


def bilinear_canvas(at: Callable[[Any, Any], Any], rows, cols, xp: Any = np) -> Any:
  """TensorFlow's bilinear formula, in its operation order and without FMA, over the canvas (× channels).

  `rows` and `cols` are `bilinear_canvas_taps`; `at(ys, xs)` gathers the source pixels (ys[i], xs[j]) as float32.
  Per canvas pixel: top = top_left + (top_right − top_left)·x_lerp, bottom likewise, value = top + (bottom −
  top)·y_lerp: the same float32 operations as `tf.image.resize`, so the same values bit for bit.
  """
  (lower_y, upper_y, lerp_y, _), (lower_x, upper_x, lerp_x, _) = rows, cols
  top_left, top_right = at(lower_y, lower_x), at(lower_y, upper_x)
  bottom_left, bottom_right = at(upper_y, lower_x), at(upper_y, upper_x)
  extra = (1,) * (top_left.ndim - 2)
  lerp_x, lerp_y = lerp_x.reshape((1, -1) + extra), lerp_y.reshape((-1, 1) + extra)
  top_step, bottom_step = _no_fma(((top_right - top_left) * lerp_x, (bottom_right - bottom_left) * lerp_x), xp)
  top, bottom = top_left + top_step, bottom_left + bottom_step
  return top + _no_fma((bottom - top) * lerp_y, xp)


def integer_letterbox(
  image: np.ndarray, size: int, mean_rgb: Tuple[int, int, int] = MEAN_RGB_UINT8
) -> Tuple[np.ndarray, Tuple[int, int], Tuple[int, int]]:
  """The integer letterbox of a uint8 h×w×3 image: (S×S×3 uint8 canvas, (nh, nw), (top, left)).

  Equals `input_pipeline.preprocess.letterbox(image, mask, S)["image"]` bit for bit (tests/test_predict.py):
  bilinear resize to (nh, nw) (`bilinear_canvas`, the device letterbox's code), rounded half to even, at (top,
  left) on a canvas of `mean_rgb`.
  """
  (resized_h, resized_w), (top, left) = integer_geometry(image.shape[0], image.shape[1], size)
  rows = bilinear_canvas_taps(size, image.shape[0], resized_h, top)
  cols = bilinear_canvas_taps(size, image.shape[1], resized_w, left)
  resized = bilinear_canvas(lambda ys, xs: image[ys[:, None], xs[None, :]].astype(np.float32), rows, cols)
  inside = rows[3][:, None] & cols[3][None, :]
  canvas = np.where(inside[..., None], np.round(resized), np.asarray(mean_rgb, np.float32))  # Convex: in range.
  return canvas.astype(np.uint8), (resized_h, resized_w), (top, left)


def letterbox_image(image: np.ndarray, size: int, mode: str) -> Tuple[np.ndarray, Tuple[int, int], Tuple[int, int]]:
  """The model input of a uint8 h×w×3 image in letterbox `mode` (config.data.letterbox), as training made it.

  Returns (S×S×3 uint8 canvas, (nh, nw), (top, left)); for "cris" the geometry is the integer letterbox's, which
  the pipeline also ships with CRIS-letterboxed images (evaluation derives CRIS's float geometry from h, w).
  """
  if check_mode(mode) == "cris":
    canvas, _ = cris_letterbox(image, np.zeros(image.shape[:2], np.uint8), size, MEAN_RGB_UINT8)
    return (canvas, *integer_geometry(image.shape[0], image.shape[1], size))
  return integer_letterbox(image, size)
