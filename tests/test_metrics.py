"""Tests of fcnet_jax.metrics against a plain NumPy implementation of the evaluation protocol (protocol.md)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcnet_jax import image_ops
from fcnet_jax import metrics
# Float64 NumPy references of the letterbox geometry and of the inverse map (tested in test_image_ops.py).
from test_image_ops import K, P, S, batch_geometry, inverse_letterbox_np

THRESHOLD = 0.35  # config.mask_threshold (CRIS).
PREC = (0.5, 0.6, 0.7, 0.8, 0.9)


# ---------------------------------------------------------------- NumPy reference of the protocol.


def protocol_terms_np(logits, batch, threshold=THRESHOLD):
  """Per valid sample (I, U): sigmoid → inverse letterbox (float64) → > threshold, vs orig_mask inside h×w."""
  terms = []
  for b in range(logits.shape[0]):
    if not batch["valid"][b]:
      continue
    h, w = batch["orig_hw"][b]
    (nh, nw), (top, left) = batch["resized_hw"][b], batch["offset"][b]
    prob = 1.0 / (1.0 + np.exp(-logits[b].astype(np.float64)))
    pred = inverse_letterbox_np(prob, nh, nw, top, left, h, w, "nearest") > threshold
    truth = batch["orig_mask"][b, :h, :w] > 0
    terms.append((np.logical_and(pred, truth).sum(), np.logical_or(pred, truth).sum()))
  return np.array(terms, np.int64).reshape(-1, 2)


def protocol_metrics_np(terms):
  """The protocol's numbers from per-sample (I, U): IoU of an empty union is 1; Prec@X uses IoU > X."""
  inter, union = terms[:, 0], terms[:, 1]
  iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
  result = {"mIoU": iou.mean(), "oIoU": inter.sum() / union.sum() if union.sum() else 1.0}
  for x in PREC:
    result[f"prec@{x:.1f}"] = np.mean(iou > x)
  result["count"] = float(len(iou))
  return result


# ---------------------------------------------------------------- Synthetic eval batches.


def ellipse_field(yy, xx, cy, cx, ay, ax):
  return 1.0 - np.sqrt(((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2)


def make_eval_batch(rng, sizes, kinds, valid=None):
  """Logits B×P×P×1 and an eval batch. kinds[b] picks the case: "shape" (a ground-truth ellipse and a jittered
  predicted one, so IoUs spread over [0, 1]), "empty_pred", "empty_gt", "both_empty", "one_pixel",
  "junk_outside" (ground truth also painted outside h×w, which must be ignored) or "padding"."""
  n = len(sizes)
  real_sizes = [(h, w) if h else (1, 1) for h, w in sizes]
  resized_hw, offset, orig_hw = batch_geometry(real_sizes)
  logits = np.zeros((n, P, P), np.float32)
  orig_mask = np.zeros((n, K, K), np.uint8)
  for b, ((h, w), kind) in enumerate(zip(real_sizes, kinds)):
    (nh, nw), (top, left) = resized_hw[b], offset[b]
    # Original-frame coordinates of the canvas pixel 4i each prediction pixel stands for.
    py = (4 * np.arange(P) + 0.5 - top) * h / nh
    px = (4 * np.arange(P) + 0.5 - left) * w / nw
    yy, xx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ay, ax = rng.uniform(0.15, 0.4) * h, rng.uniform(0.15, 0.4) * w
    gt = ellipse_field(yy, xx, cy, cx, ay, ax) > 0
    jitter = (b % 6) * 0.12  # Relative displacement of the prediction: IoU from ~1 down to ~0.4.
    pyy, pxx = np.meshgrid(py, px, indexing="ij")
    pred_field = ellipse_field(pyy, pxx, cy, cx + jitter * ax * rng.choice([-1, 1]), ay, ax)
    # Centred on the decision threshold so that an undisplaced prediction recovers the ellipse.
    logits[b] = 12.0 * pred_field + np.log(THRESHOLD / (1 - THRESHOLD)) + rng.normal(0, 0.3, (P, P))
    if kind == "empty_pred":
      logits[b] = -10.0
    elif kind == "empty_gt":
      gt[:] = False
    elif kind == "both_empty":
      logits[b], gt[:] = -10.0, False
    elif kind == "one_pixel":
      gt[:] = False
      gt[rng.integers(h), rng.integers(w)] = True
    elif kind == "junk_outside":
      orig_mask[b, h:, :] = 1
      orig_mask[b, :, w:] = 1
    elif kind == "padding":
      logits[b] = rng.normal(0, 5, (P, P))
      orig_mask[b] = rng.integers(0, 2, (K, K))
    if kind != "padding":
      orig_mask[b, :h, :w] = gt
  valid = np.array([kind != "padding" for kind in kinds]) if valid is None else valid
  for b, kind in enumerate(kinds):
    if kind == "padding":  # Padding examples carry zeros, as the input pipeline's filler does.
      resized_hw[b], offset[b], orig_hw[b] = 0, 0, 0
  batch = {"resized_hw": resized_hw, "offset": offset, "orig_hw": orig_hw, "orig_mask": orig_mask,
           "valid": valid, "tokens": np.zeros((n, 17), np.int32)}
  return logits[..., None], batch


SIZES = [(480, 640), (640, 427), (640, 40), (30, 640), (1, 1), (333, 500), (612, 612), (100, 77), (480, 640),
         (0, 0), (427, 640), (640, 480), (200, 300), (0, 0), (375, 500), (500, 375)]
KINDS = ["shape", "shape", "shape", "shape", "one_pixel", "empty_pred", "empty_gt", "both_empty", "junk_outside",
         "padding", "shape", "shape", "one_pixel", "padding", "shape", "shape"]


@pytest.fixture(scope="module")
def eval_case():
  rng = np.random.default_rng(0)
  logits, batch = make_eval_batch(rng, SIZES, KINDS)
  return logits, batch, protocol_terms_np(logits[..., 0], batch)


@pytest.fixture(scope="module")
def eval_update():
  """The jitted eval-side computation: outputs and the metric collection of one batch."""

  @jax.jit
  def update(logits, batch):
    outputs = metrics.eval_step_outputs(logits, batch, THRESHOLD, K, image_size=S)
    return outputs, metrics.EvalMetrics.single_from_model_output(**outputs)

  return update


# ---------------------------------------------------------------- Eval.


def test_eval_step_outputs_match_numpy_protocol(eval_case, eval_update):
  logits, batch, expected_terms = eval_case
  outputs, _ = eval_update(logits, batch)
  valid = batch["valid"]
  np.testing.assert_array_equal(np.asarray(outputs["mask"]), valid)
  inter = np.asarray(outputs["intersection"])[valid]
  union = np.asarray(outputs["union"])[valid]
  # float32 vs float64 can only flip pixels within ~1e-6 of the threshold.
  np.testing.assert_allclose(inter, expected_terms[:, 0], atol=2)
  np.testing.assert_allclose(union, expected_terms[:, 1], atol=2)
  iou = np.asarray(outputs["iou"])[valid]
  expected_iou = np.where(expected_terms[:, 1] > 0, expected_terms[:, 0] / np.maximum(expected_terms[:, 1], 1), 1)
  np.testing.assert_allclose(iou, expected_iou, atol=1e-3)
  kinds = [k for k in KINDS if k != "padding"]
  assert iou[kinds.index("empty_pred")] == 0.0 and iou[kinds.index("empty_gt")] == 0.0
  assert iou[kinds.index("both_empty")] == 1.0
  assert union[kinds.index("both_empty")] == 0
  assert iou[kinds.index("one_pixel")] == 1.0  # A 1×1 image predicted everywhere.
  shape_iou = iou[[i for i, k in enumerate(kinds) if k == "shape"]]
  assert shape_iou.min() < 0.5 < 0.9 < shape_iou.max()  # The synthetic IoUs spread across the Prec@X bins.


def test_eval_metrics_match_numpy_protocol(eval_case, eval_update):
  logits, batch, expected_terms = eval_case
  _, collection = eval_update(logits, batch)
  result = collection.compute()
  assert set(result) == {"mIoU", "oIoU", "prec@0.5", "prec@0.6", "prec@0.7", "prec@0.8", "prec@0.9", "count"}
  assert all(isinstance(v, float) for v in result.values())
  expected = protocol_metrics_np(expected_terms)
  assert result["count"] == expected["count"] == 14  # Two padding examples are not scored.
  for name in expected:
    np.testing.assert_allclose(result[name], expected[name], atol=1e-4, err_msg=name)
  # Sanity: the padding examples' junk would change the numbers if it were counted.
  all_valid = dict(batch, valid=np.ones(len(SIZES), bool))
  assert eval_update(logits, all_valid)[1].compute()["count"] == len(SIZES)


def test_eval_metrics_merge_over_batches_equals_one_batch(eval_case, eval_update):
  """Merging per-batch collections (3 uneven batches; each padded to the same shape) equals one big batch."""
  logits, batch, _ = eval_case
  whole = eval_update(logits, batch)[1].compute()
  merged = None
  for part in (slice(0, 5), slice(5, 11), slice(11, 16)):
    part_logits = np.zeros_like(logits[:6])
    part_batch = {k: np.zeros_like(v[:6]) for k, v in batch.items()}
    size = part.stop - part.start
    part_logits[:size] = logits[part]
    for k, v in batch.items():
      part_batch[k][:size] = v[part]  # The rest is padding: valid=False, zeros.
    update = eval_update(part_logits, part_batch)[1]
    merged = update if merged is None else merged.merge(update)
  result = merged.compute()
  for name in whole:
    np.testing.assert_allclose(result[name], whole[name], rtol=1e-6, err_msg=name)
  assert result["count"] == whole["count"] and result["oIoU"] == whole["oIoU"]  # Sums of ints: exact.


def test_eval_metrics_merge_inside_jit_and_empty(eval_case, eval_update):
  logits, batch, _ = eval_case
  _, update = eval_update(logits, batch)
  merged = jax.jit(lambda a, b: a.merge(b))(metrics.EvalMetrics.empty(), update)
  assert merged.compute() == update.compute()
  empty = metrics.EvalMetrics.empty().compute()
  assert empty["count"] == 0.0 and empty["oIoU"] == 1.0 and np.isnan(empty["mIoU"])


def test_eval_step_outputs_takes_image_size_from_the_batch(eval_case):
  logits, batch, _ = eval_case
  logits, batch = logits[7:11], {k: v[7:11] for k, v in batch.items()}  # Includes a padding example.
  with_image = dict(batch, image=np.zeros((4, S, S, 3), np.uint8))
  outputs_fn = jax.jit(metrics.eval_step_outputs, static_argnums=(2, 3, 4))
  a = outputs_fn(logits, with_image, THRESHOLD, K)
  b = outputs_fn(logits[..., 0], batch, THRESHOLD, K, S)  # B×P×P logits too.
  for name in a:
    np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
  # Without "valid" every example is scored.
  c = outputs_fn(logits, {k: v for k, v in batch.items() if k != "valid"}, THRESHOLD, K, S)
  assert np.asarray(c["mask"]).all()


def test_eval_step_outputs_reports_bad_batches(eval_case):
  logits, batch, _ = eval_case
  with pytest.raises(KeyError, match="orig_mask"):
    metrics.eval_step_outputs(logits, {k: v for k, v in batch.items() if k != "orig_mask"}, THRESHOLD, K, S)
  with pytest.raises(ValueError, match="eval_canvas"):
    metrics.eval_step_outputs(logits, batch, THRESHOLD, 512, S)
  with pytest.raises(KeyError, match="image_size"):
    metrics.eval_step_outputs(logits, batch, THRESHOLD, K)
  with pytest.raises(ValueError, match="B×P×P"):
    metrics.eval_step_outputs(logits[..., 0, 0], batch, THRESHOLD, K, S)


def test_overall_iou_sums_are_exact_beyond_int32_and_float32():
  """oIoU over many full 640×640 masks: the pixel sums pass 2^31 and stay exact."""
  per_sample = K * K  # 409600 = the largest possible count.
  inter = jnp.full((64,), per_sample - 7, jnp.int32)
  union = jnp.full((64,), per_sample, jnp.int32)
  update = jax.jit(lambda i, u: metrics.OverallIoU.from_model_output(i, u))(inter, union)
  merge = jax.jit(lambda a, b: a.merge(b))
  total = metrics.OverallIoU.empty()
  for _ in range(100):
    total = merge(total, update)
  steps = 100 * 64
  assert total.totals() == {"intersection": steps * (per_sample - 7), "union": steps * per_sample}
  assert steps * per_sample > 2 ** 31
  assert total.compute() == (per_sample - 7) / per_sample


def test_gather_from_model_output_under_pmap(eval_case, eval_update):
  """The pmap path (all_gather + reduce) works with the custom metrics."""
  logits, batch, _ = eval_case
  outputs, collection = eval_update(logits, batch)
  expected = collection.compute()
  replicated = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], outputs)
  gathered = jax.pmap(lambda o: metrics.EvalMetrics.gather_from_model_output(**o), axis_name="batch")(replicated)
  result = gathered.unreplicate().compute()
  for name in expected:
    np.testing.assert_allclose(result[name], expected[name], rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------- Train.


def test_train_metrics_match_numpy():
  rng = np.random.default_rng(1)
  step_fn = jax.jit(lambda logits, target, loss: metrics.TrainMetrics.single_from_model_output(
      **metrics.train_step_outputs(logits, target, loss, THRESHOLD)))
  merged, all_iou, losses = None, [], []
  for step in range(3):
    target = np.zeros((4, P, P), np.uint8)
    logits = rng.normal(0, 1, (4, P, P)).astype(np.float32)
    for b in range(4):
      top, left, size = rng.integers(0, P // 2, 3)
      target[b, top:top + size + 1, left:left + size + 1] = 1
      logits[b] += np.where(target[b] > 0, 2.0, -2.0) * rng.uniform(0, 2)
    if step == 0:
      target[0], logits[0] = 0, -5.0  # Both empty: IoU 1.
      target[1, :, :], target[1, 3, 4] = 0, 1  # A 1-pixel target.
    loss = float(rng.uniform(0.1, 1.0))
    update = step_fn(logits, target, loss)
    merged = update if merged is None else merged.merge(update)
    pred = 1.0 / (1.0 + np.exp(-logits.astype(np.float64))) > THRESHOLD
    inter = np.logical_and(pred, target > 0).sum(axis=(1, 2))
    union = np.logical_or(pred, target > 0).sum(axis=(1, 2))
    all_iou.extend(np.where(union > 0, inter / np.maximum(union, 1), 1.0))
    losses.append(loss)
  result = merged.compute()
  assert set(result) == {"loss", "iou", "prec@0.5"}
  all_iou = np.array(all_iou)
  assert all_iou[0] == 1.0
  np.testing.assert_allclose(result["loss"], np.mean(losses), rtol=1e-6)
  np.testing.assert_allclose(result["iou"], all_iou.mean(), rtol=1e-5)
  np.testing.assert_allclose(result["prec@0.5"], np.mean(all_iou > 0.5), rtol=1e-6)
  assert 0 < result["prec@0.5"] < 1


def test_train_step_outputs_accept_channel_dim_and_downsampled_targets():
  rng = np.random.default_rng(2)
  canvas_mask = (rng.uniform(size=(2, S, S)) > 0.5).astype(np.uint8)
  target = image_ops.downsample_mask(canvas_mask, (P, P))
  logits = rng.normal(0, 1, (2, P, P, 1)).astype(np.float32)
  out = metrics.train_step_outputs(logits, target, jnp.float32(0.5), THRESHOLD)
  pred = logits[..., 0] > np.log(THRESHOLD / (1 - THRESHOLD))
  truth = np.asarray(target) > 0
  expected = (pred & truth).sum(axis=(1, 2)) / (pred | truth).sum(axis=(1, 2))
  np.testing.assert_allclose(np.asarray(out["iou"]), expected, rtol=1e-6)
  assert out["loss"].shape == ()
