"""Tests of fcnet_jax.image_ops against float64 NumPy implementations of the letterbox protocol (and PyTorch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcnet_jax import image_ops

S = 480  # Letterbox canvas (config.model.image_size).
P = S // 4  # Prediction size.
K = 640  # Original-frame canvas (config.data.eval_canvas).
# (h, w) original sizes: COCO-like, square, extreme aspect ratios both ways, small, and odd rounding cases.
SIZES = [
  (480, 640),
  (640, 427),
  (640, 640),
  (640, 40),
  (30, 640),
  (333, 500),
  (612, 612),
  (100, 77),
  (45, 600),
  (640, 481),
]


# ---------------------------------------------------------------- NumPy float64 references of the protocol.


def letterbox_geometry(h, w, size=S):
  """(nh, nw, top, left) of the letterbox: scale min(S/h, S/w), round half to even (np.round, like tf.round)."""
  scale = min(size / h, size / w)
  nh, nw = int(np.round(h * scale)), int(np.round(w * scale))
  return nh, nw, (size - nh) // 2, (size - nw) // 2


def resize_bilinear_np(image, out_h, out_w):
  """Bilinear resize with half-pixel centres and edge clamp (tf.image.resize, antialias=False), float64."""
  h, w = image.shape

  def taps(out_size, in_size):
    src = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
    src = np.clip(src, 0, in_size - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, src - i0

  r0, r1, rf = taps(out_h, h)
  c0, c1, cf = taps(out_w, w)
  rows = image[r0] * (1 - rf)[:, None] + image[r1] * rf[:, None]
  return rows[:, c0] * (1 - cf)[None, :] + rows[:, c1] * cf[None, :]


def letterbox_np(image, size=S):
  """Forward letterbox of an h×w float field onto a zero S×S canvas; returns (canvas, nh, nw, top, left)."""
  h, w = image.shape
  nh, nw, top, left = letterbox_geometry(h, w, size)
  canvas = np.zeros((size, size))
  canvas[top : top + nh, left : left + nw] = resize_bilinear_np(image.astype(np.float64), nh, nw)
  return canvas, nh, nw, top, left


def inverse_letterbox_np(prob, nh, nw, top, left, h, w, sampling):
  """Direct 2-D float64 bilinear sampling of the inverse map at every original pixel centre (h×w result).

  Derivation: original continuous y → canvas continuous u = top + y·nh/h. A prediction pixel i stands for canvas
  pixel 4i (sampling="nearest": targets made by downsample_mask, continuous u = 4i + 0.5), or for the centre
  4i + 2 of its 4×4 block (sampling="area": the block-centre convention the library does not implement, kept here
  as the mismatched convention the tests must be able to tell apart).
  """
  ratio = S / prob.shape[0]
  yy, xx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
  u, v = top + yy * nh / h, left + xx * nw / w
  if sampling == "nearest":
    fi, fj = (u - 0.5) / ratio, (v - 0.5) / ratio
  else:
    fi, fj = u / ratio - 0.5, v / ratio - 0.5
  # Only prediction pixels whose sample point is on the resized image count; beyond them the edge is held.
  if sampling == "nearest":
    rows = [i for i in range(prob.shape[0]) if top <= ratio * i < top + nh]
    cols = [j for j in range(prob.shape[1]) if left <= ratio * j < left + nw]
  else:
    rows = [i for i in range(prob.shape[0]) if top <= ratio * (i + 0.5) <= top + nh]
    cols = [j for j in range(prob.shape[1]) if left <= ratio * (j + 0.5) <= left + nw]
  fi, fj = np.clip(fi, rows[0], rows[-1]), np.clip(fj, cols[0], cols[-1])
  n = prob.shape[0]
  i0, j0 = np.floor(fi).astype(int), np.floor(fj).astype(int)
  i1, j1 = np.minimum(i0 + 1, n - 1), np.minimum(j0 + 1, n - 1)
  a, b = fi - i0, fj - j0
  return (
    (1 - a) * (1 - b) * prob[i0, j0] + (1 - a) * b * prob[i0, j1] + a * (1 - b) * prob[i1, j0] + a * b * prob[i1, j1]
  )


def batch_geometry(sizes):
  geometry = [letterbox_geometry(h, w) for h, w in sizes]
  resized_hw = np.array([(nh, nw) for nh, nw, _, _ in geometry], np.int32)
  offset = np.array([(top, left) for _, _, top, left in geometry], np.int32)
  return resized_hw, offset, np.array(sizes, np.int32)


def soft_edge(field, width):
  """A probability map from a signed field: 0.5 on its zero set, a linear ramp `width` pixels wide across it."""
  gy, gx = np.gradient(field)
  distance = field / np.maximum(np.hypot(gy, gx), 1e-12)  # First-order signed distance in pixels.
  return np.clip(0.5 + distance / width, 0.0, 1.0)


def random_shape_field(h, w, rng):
  """A signed field, > 0 inside one random ellipse or (rotated) box spanning a good part of the image."""
  yy, xx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
  cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
  ay, ax = rng.uniform(0.2, 0.45) * h, rng.uniform(0.2, 0.45) * w
  if rng.uniform() < 0.5:
    return 1.0 - np.sqrt(((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2)  # Ellipse.
  angle = rng.uniform(-0.3, 0.3)
  dy, dx = yy - cy, xx - cx
  ry, rx = np.cos(angle) * dy - np.sin(angle) * dx, np.sin(angle) * dy + np.cos(angle) * dx
  return np.minimum(1.0 - np.abs(ry) / ay, 1.0 - np.abs(rx) / ax)  # Box.


def iou_np(a, b):
  union = np.logical_or(a, b).sum()
  return np.logical_and(a, b).sum() / union if union else 1.0


def pad_to_canvas(array, canvas=K):
  out = np.zeros((canvas, canvas), array.dtype)
  out[: array.shape[0], : array.shape[1]] = array
  return out


@pytest.fixture(scope="module")
def inverse_fn():
  return jax.jit(image_ops.inverse_letterbox, static_argnames=("canvas", "image_size"))


# ---------------------------------------------------------------- normalize_images.


def test_normalize_images_matches_clip_statistics():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  expected = (images / 255.0 - np.array(image_ops.CLIP_MEAN)) / np.array(image_ops.CLIP_STD)
  out = jax.jit(image_ops.normalize_images)(images)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
  # The uint8 mean colour the host pads with normalizes to (almost) zero.
  padded = np.broadcast_to(np.array([123, 117, 104], np.uint8), (1, 2, 2, 3))
  assert np.abs(np.asarray(image_ops.normalize_images(padded))).max() < 4e-3
  out_bf16 = image_ops.normalize_images(images, jnp.bfloat16)
  assert out_bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out_bf16, np.float32), expected, atol=2e-2)


def test_normalize_images_rejects_bad_shape():
  with pytest.raises(ValueError, match="B×S×S×3"):
    image_ops.normalize_images(np.zeros((2, 8, 8), np.uint8))


# ---------------------------------------------------------------- downsample_mask.


@pytest.mark.parametrize(
  "in_hw,out_hw",
  [((480, 480), (120, 120)), ((480, 480), (100, 100)), ((33, 17), (12, 5)), ((7, 10), (3, 4)), ((64, 48), (64, 48))],
)
def test_downsample_mask_matches_torch_nearest(in_hw, out_hw):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  mask = rng.integers(0, 2, (2,) + in_hw, dtype=np.uint8)
  expected = torch.nn.functional.interpolate(
    torch.from_numpy(mask[:, None].astype(np.float32)), size=out_hw, mode="nearest"
  )[:, 0].numpy()
  out = np.asarray(jax.jit(image_ops.downsample_mask, static_argnums=1)(mask, out_hw))
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, expected)
  # The documented formula: source index floor(i * in / out).
  rows = np.floor(np.arange(out_hw[0]) * in_hw[0] / out_hw[0]).astype(int)
  cols = np.floor(np.arange(out_hw[1]) * in_hw[1] / out_hw[1]).astype(int)
  np.testing.assert_array_equal(out, mask[:, rows][:, :, cols])


# ---------------------------------------------------------------- inverse_letterbox, valid_region.


def test_inverse_letterbox_matches_numpy_bilinear(inverse_fn):
  rng = np.random.default_rng(2)
  prob = rng.uniform(size=(len(SIZES), P, P)).astype(np.float32)
  resized_hw, offset, orig_hw = batch_geometry(SIZES)
  out = np.asarray(inverse_fn(prob, resized_hw, offset, orig_hw, canvas=K, image_size=S))
  assert out.shape == (len(SIZES), K, K) and out.dtype == np.float32
  for b, (h, w) in enumerate(SIZES):
    (nh, nw), (top, left) = resized_hw[b], offset[b]
    expected = inverse_letterbox_np(prob[b].astype(np.float64), nh, nw, top, left, h, w, "nearest")
    np.testing.assert_allclose(out[b, :h, :w], expected, atol=1e-5, err_msg=f"size {(h, w)}")


def test_inverse_letterbox_reproduces_linear_fields(inverse_fn):
  """The pixel-centre convention: a linear field in the original frame survives letterbox → targets at P (canvas
  pixels 4i, as downsample_mask) → inverse map exactly (away from the border clamps); the block-centre convention
  ("area", from the NumPy reference) on the same targets is shifted by 1.5 canvas pixels per axis."""
  rng = np.random.default_rng(4)
  resized_hw, offset, orig_hw = batch_geometry(SIZES)
  targets, fields = [], []
  for h, w in SIZES:
    slope_y, slope_x = rng.uniform(-1, 1, 2)
    yy, xx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    field = slope_y * yy + slope_x * xx
    canvas, *_ = letterbox_np(field)
    targets.append(canvas[::4, ::4].astype(np.float32))  # downsample_mask's canvas pixels 4i (checked above).
    fields.append((field, slope_y, slope_x))
  out = np.asarray(inverse_fn(np.stack(targets), resized_hw, offset, orig_hw, canvas=K, image_size=S))
  for b, (h, w) in enumerate(SIZES):
    field, slope_y, slope_x = fields[b]
    (nh, nw), (top, left) = resized_hw[b], offset[b]
    # Interior: two prediction pixels (in original pixels) plus slack from every border.
    margin_y, margin_x = int(np.ceil(8 * h / nh)) + 2, int(np.ceil(8 * w / nw)) + 2
    inner = (slice(margin_y, h - margin_y), slice(margin_x, w - margin_x))
    assert field[inner].size > 0
    np.testing.assert_allclose(out[b, :h, :w][inner], field[inner], atol=2e-4, err_msg=f"size {(h, w)}")
    # Negative control: the mismatched convention is off by −1.5 canvas pixels along each axis.
    mismatched = inverse_letterbox_np(targets[b].astype(np.float64), nh, nw, top, left, h, w, "area")
    shift = -1.5 * (slope_y * h / nh + slope_x * w / nw)
    np.testing.assert_allclose(mismatched[inner] - field[inner], shift, atol=2e-4, err_msg=f"size {(h, w)}")


def test_inverse_letterbox_round_trip_iou(inverse_fn):
  """Soft masks letterboxed in float64, sampled at P by downsample_mask, mapped back and thresholded recover the
  original shape (IoU ≥ 0.99); a binary mask through the same path loses at most a stride-4 quantization."""
  rng = np.random.default_rng(5)
  resized_hw, offset, orig_hw = batch_geometry(SIZES)
  soft_targets, hard_targets, truths = [], [], []
  for h, w in SIZES:
    field = random_shape_field(h, w, rng)
    truth = field > 0
    nh, nw, _, _ = letterbox_geometry(h, w)
    # A soft edge three prediction pixels wide, like a network's probability map.
    soft = soft_edge(field, 12 * max(h / nh, w / nw))
    soft_targets.append(letterbox_np(soft)[0])
    hard_targets.append((letterbox_np(truth.astype(np.float64))[0] >= 0.5).astype(np.uint8))
    truths.append(truth)
  soft_p = np.asarray(image_ops.downsample_mask(np.stack(soft_targets).astype(np.float32), (P, P)))
  hard_p = np.asarray(image_ops.downsample_mask(np.stack(hard_targets), (P, P))).astype(np.float32)
  soft_out = np.asarray(inverse_fn(soft_p, resized_hw, offset, orig_hw, canvas=K, image_size=S))
  hard_out = np.asarray(inverse_fn(hard_p, resized_hw, offset, orig_hw, canvas=K, image_size=S))
  soft_iou = np.array([iou_np(soft_out[b, :h, :w] > 0.5, truths[b]) for b, (h, w) in enumerate(SIZES)])
  hard_iou = np.array([iou_np(hard_out[b, :h, :w] > 0.5, truths[b]) for b, (h, w) in enumerate(SIZES)])
  # "Large": at least 8 prediction pixels across in both directions (the thin images' shapes are 4-5).
  large = np.array(
    [
      t.any(1).sum() * nh / h >= 32 and t.any(0).sum() * nw / w >= 32
      for t, (h, w), (nh, nw) in zip(truths, SIZES, resized_hw)
    ]
  )
  assert large.sum() >= 6
  assert soft_iou[large].min() >= 0.99 and soft_iou.min() >= 0.9, soft_iou
  # Binary targets quantize the boundary to the stride-4 grid (±2 canvas pixels).
  assert hard_iou[large].min() >= 0.975 and hard_iou.min() >= 0.85, hard_iou
  # Negative control: the mismatched (block-centre) convention is measurably worse on the same targets.
  mismatched_soft, mismatched_hard = [], []
  for b, (h, w) in enumerate(SIZES):
    geometry = (*resized_hw[b], *offset[b], h, w, "area")
    mismatched_soft.append(iou_np(inverse_letterbox_np(soft_p[b].astype(np.float64), *geometry) > 0.5, truths[b]))
    mismatched_hard.append(iou_np(inverse_letterbox_np(hard_p[b].astype(np.float64), *geometry) > 0.5, truths[b]))
  assert np.mean(mismatched_soft) < soft_iou.mean() - 0.02, (mismatched_soft, soft_iou)
  assert np.mean(mismatched_hard) < hard_iou.mean() - 0.005, (mismatched_hard, hard_iou)


def test_inverse_letterbox_keeps_objects_touching_the_border(inverse_fn):
  """A full-image mask comes back full: the last rows/columns are clamped, not zero."""
  resized_hw, offset, orig_hw = batch_geometry(SIZES)
  canvas = np.zeros((len(SIZES), S, S), np.uint8)
  for b in range(len(SIZES)):
    (nh, nw), (top, left) = resized_hw[b], offset[b]
    canvas[b, top : top + nh, left : left + nw] = 1
  target = np.asarray(image_ops.downsample_mask(canvas, (P, P))).astype(np.float32)
  out = np.asarray(inverse_fn(target, resized_hw, offset, orig_hw, canvas=K, image_size=S))
  for b, (h, w) in enumerate(SIZES):
    assert iou_np(out[b, :h, :w] > 0.35, np.ones((h, w), bool)) >= 0.97, (h, w)
    assert np.all(out[b, h // 2, :w][-2:] > 0.35) and np.all(out[b, :h, w // 2][-2:] > 0.35), (h, w)


def test_inverse_letterbox_under_jit_vmap_and_padding_examples():
  """Traced sizes under vmap (one example at a time) agree with the batched call; zero-size padding rows
  (orig_hw = 0) produce finite values."""
  rng = np.random.default_rng(6)
  sizes = SIZES[:3] + [(0, 0)]
  prob = rng.uniform(size=(len(sizes), P, P)).astype(np.float32)
  resized_hw, offset, orig_hw = batch_geometry(SIZES[:3])
  resized_hw = np.concatenate([resized_hw, [[0, 0]]]).astype(np.int32)
  offset = np.concatenate([offset, [[0, 0]]]).astype(np.int32)
  orig_hw = np.concatenate([orig_hw, [[0, 0]]]).astype(np.int32)
  batched = np.asarray(image_ops.inverse_letterbox(prob, resized_hw, offset, orig_hw, K, S))

  def single(p, r, o, hw):
    return image_ops.inverse_letterbox(p[None], r[None], o[None], hw[None], K, S)[0]

  mapped = np.asarray(jax.jit(jax.vmap(single))(prob, resized_hw, offset, orig_hw))
  np.testing.assert_allclose(mapped, batched, atol=3e-5)
  assert np.all(np.isfinite(batched))
  assert not np.asarray(image_ops.valid_region(orig_hw, K))[-1].any()


def test_inverse_letterbox_rejects_bad_arguments():
  args = (np.zeros((2, 2), np.int32), np.zeros((2, 2), np.int32), np.ones((2, 2), np.int32))
  with pytest.raises(ValueError, match="B×P×P"):
    image_ops.inverse_letterbox(np.zeros((2, 4, 5)), *args, K, S)
  with pytest.raises(ValueError, match="image_size"):
    image_ops.inverse_letterbox(np.zeros((2, 7, 7)), *args, K, 50)


def test_valid_region():
  orig_hw = np.array([[3, 5], [640, 40], [1, 1]], np.int32)
  region = np.asarray(image_ops.valid_region(orig_hw, K))
  for b, (h, w) in enumerate(orig_hw):
    expected = np.zeros((K, K), bool)
    expected[:h, :w] = True
    np.testing.assert_array_equal(region[b], expected)


# ---------------------------------------------------------------- batch_iou_terms.


def test_batch_iou_terms_counts_pixels_in_region():
  rng = np.random.default_rng(7)
  prob = rng.uniform(size=(4, 16, 16)).astype(np.float32)
  prob[1] = 0.0  # Empty prediction.
  target = (rng.uniform(size=(4, 16, 16)) > 0.6).astype(np.uint8)
  target[2] = 0  # Empty ground truth.
  prob[3, 5, 5] = 0.35  # Exactly at the threshold: not predicted (strict >, CRIS).
  region = np.zeros((4, 16, 16), bool)
  region[:, :10, :12] = True
  intersection, union = jax.jit(image_ops.batch_iou_terms)(prob, target, 0.35, region)
  pred = (prob > 0.35) & region
  truth = (target > 0) & region
  np.testing.assert_array_equal(np.asarray(intersection), (pred & truth).sum(axis=(1, 2)))
  np.testing.assert_array_equal(np.asarray(union), (pred | truth).sum(axis=(1, 2)))
  assert intersection.dtype == jnp.int32 and union.dtype == jnp.int32
  with pytest.raises(ValueError, match="shapes differ"):
    image_ops.batch_iou_terms(prob, target[:, :8], 0.35)
