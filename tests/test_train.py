"""Tests of fcnet_jax/train.py: the real training loop on tiny synthetic data, exact resume, eval mode, optimiser
(and fcnet_jax/checkpoints.py, the control of fcnet_jax/evaluate.py).

The loop runs as `python main.py` in subprocesses on the synthetic refer data converted by the real converter:

  B: 4 uninterrupted steps, evaluation + checkpoint every 2 (the shared `trained_tiny_workdir` of conftest.py).

Resuming (bitwise, across the learning-rate drop at step 3, after SIGTERM, SIGKILL and a corrupt checkpoint) is
tested by tests/test_preemption.py against the same run B; `--mode=eval` of a chosen, the latest and the best
checkpoint, TensorBoard and the profiler by tests/test_eval_paths.py. The optimiser tests run in-process on the real
parameter tree (`jax.eval_shape`, nothing compiled but one optimiser update) against hand-computed Adam steps.
"""

import functools
import json
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from flax import traverse_util  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position
from fcnet_jax import checkpoints as checkpoints_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from fcnet_jax import evaluate  # pylint: disable=g-import-not-at-top,wrong-import-position
from fcnet_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from fcnet_jax.models import fcnet  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_worker  # pylint: disable=g-import-not-at-top,wrong-import-position

# pycocotools (synthetic data / converter) warns once per decoded mask under NumPy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

LEARNING_RATE = train_worker.TRAINED_LEARNING_RATE
DECAY_STEP = 3  # lr_decay_epochs=(0.6,) × steps_per_epoch 5 (43 training refs // batch 8).
METRIC_NAMES = ("mIoU", "oIoU", "prec@0.5", "prec@0.6", "prec@0.7", "prec@0.8", "prec@0.9")


# ------------------------------------------------------------------------------------------------------------
# The runs (module fixture).


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def runs(trained_tiny_workdir):
  """What B (shared, read-only) left behind."""
  b = trained_tiny_workdir
  out = {"b": b.workdir, "summary": b.dataset.summary}
  out["b_eval_4"] = _read_json(os.path.join(b.workdir, "eval_val.json"))
  # TensorBoard's float32 copies of B's evaluations at steps 2 and 4.
  out["val_miou"] = train_worker.read_scalars(b.workdir)["eval/val/mIoU"]
  return out


# ------------------------------------------------------------------------------------------------------------
# The real loop.


def _check_eval_json(payload: dict, step: int, num_pairs: int):
  assert payload["step"] == step and payload["split"] == "val"
  assert payload["count"] == num_pairs  # Every (ref, sentence) pair of the split scored once.
  for name in METRIC_NAMES:
    assert math.isfinite(payload[name]) and 0.0 <= payload[name] <= 1.0, (name, payload)
  precisions = [payload[f"prec@{x}"] for x in ("0.5", "0.6", "0.7", "0.8", "0.9")]
  assert precisions == sorted(precisions, reverse=True)  # Prec@X cannot grow with X.


def test_training_writes_evaluations_checkpoints_and_logs(runs):
  num_pairs = runs["summary"]["splits"]["val"]["sentences"]
  _check_eval_json(runs["b_eval_4"], 4, num_pairs)
  assert sorted(runs["val_miou"]) == [2, 4]
  assert train_worker.checkpoint_steps(runs["b"], "checkpoints") == [2, 4]
  # The best manager keeps the one step with the highest validation mIoU.
  best = train_worker.checkpoint_steps(runs["b"], "best")
  assert len(best) == 1 and runs["val_miou"][best[0]] == max(runs["val_miou"].values())

  scalars = train_worker.read_scalars(runs["b"])
  losses = scalars["train/loss"]
  assert sorted(losses) == [1, 2, 3, 4]
  assert all(math.isfinite(v) and 0.0 < v < 5.0 for v in losses.values()), losses
  # The rate logged at step n is that of the n-th update (optax count n - 1): ×0.1 from update DECAY_STEP on.
  expected = {n: LEARNING_RATE * (0.1 if n - 1 >= DECAY_STEP else 1.0) for n in range(1, 5)}
  np.testing.assert_allclose(
    [scalars["train/learning_rate"][n] for n in range(1, 5)], [expected[n] for n in range(1, 5)], rtol=1e-6
  )
  for name in METRIC_NAMES:
    assert scalars[f"eval/val/{name}"][4] == pytest.approx(runs["b_eval_4"][name], abs=1e-7)


# ------------------------------------------------------------------------------------------------------------
# Optimiser and schedule (in-process, no model compile).


def _schedule_config(**overrides) -> ml_collections.ConfigDict:
  config = tiny.get_config()
  for name, value in overrides.items():
    config[name] = value
  return config


def test_piecewise_schedule_decays_at_the_epoch_boundary():
  # The paper: lr 1e-4, ×0.1 at epoch 35 (CRIS MultiStepLR: epochs 0…34 at lr, epoch 35 on at 0.1 lr).
  config = _schedule_config(
    learning_rate=1e-4, lr_schedule="piecewise", lr_decay_epochs=(35,), lr_decay_factor=0.1, warmup_steps=0
  )
  steps_per_epoch = 100
  lr = train.create_learning_rate_fn(config, steps_per_epoch, 50 * steps_per_epoch)
  steps = np.array([0, 1, 3499, 3500, 3501, 4999])
  np.testing.assert_allclose([float(lr(s)) for s in steps], [1e-4, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5], rtol=1e-6)
  # Two boundaries compound; a linear warm-up does not move them.
  config = _schedule_config(
    learning_rate=1e-4, lr_schedule="piecewise", lr_decay_epochs=(35, 45), lr_decay_factor=0.1, warmup_steps=10
  )
  lr = train.create_learning_rate_fn(config, steps_per_epoch, 50 * steps_per_epoch)
  steps = np.array([0, 5, 10, 3499, 3500, 4499, 4500])
  np.testing.assert_allclose(
    [float(lr(s)) for s in steps], [0.0, 5e-5, 1e-4, 1e-4, 1e-5, 1e-5, 1e-6], rtol=1e-6, atol=1e-12
  )


def test_cosine_schedule_warms_up_and_reaches_zero():
  config = _schedule_config(learning_rate=1e-3, lr_schedule="cosine", warmup_steps=10)
  lr = train.create_learning_rate_fn(config, 7, 110)
  np.testing.assert_allclose(
    [float(lr(s)) for s in (0, 5, 10, 60, 110)], [0.0, 5e-4, 1e-3, 5e-4, 0.0], rtol=1e-5, atol=1e-9
  )
  with pytest.raises(ValueError, match="lr_schedule"):
    train.create_learning_rate_fn(_schedule_config(lr_schedule="step"), 7, 110)


@pytest.fixture(scope="module")
def param_shapes():
  """The tiny model's parameter tree as ShapeDtypeStructs (traced, not compiled)."""
  model = fcnet.build_model(tiny.get_config().model)
  images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  tokens = jnp.zeros((1, model.context_length), jnp.int32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images, tokens)
  return variables["params"]


ENCODERS = ("image_encoder", "text_encoder")


def test_parameter_labels_split_encoders_from_the_rest(param_shapes):
  config = tiny.get_config()
  labels = train.parameter_labels(param_shapes, config.encoder_lr_regex)
  flat_labels = traverse_util.flatten_dict(labels, sep="/")
  expected = {path: "encoder" if path.split("/")[0] in ENCODERS else "head" for path in flat_labels}
  assert flat_labels == expected
  assert {p.split("/")[0] for p, label in flat_labels.items() if label == "head"} >= {"neck", "decoder", "mask_head"}
  assert sum(label == "encoder" for label in flat_labels.values()) > 20


def _random_tree(shapes, rng, scale=1.0):
  return jax.tree.map(lambda s: (rng.normal(size=s.shape) * scale).astype(np.float32), shapes)


def _one_update(params, grads, **overrides):
  """params after one step of the real optimiser (`train.create_optimizer`) at LEARNING_RATE, flattened "a/b/c"."""
  config = _schedule_config(learning_rate=LEARNING_RATE, lr_schedule="piecewise", warmup_steps=0, **overrides)
  tx = train.create_optimizer(config, train.create_learning_rate_fn(config, 10, 100))

  @jax.jit
  def step(params, grads):
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)

  return traverse_util.flatten_dict(jax.device_get(step(params, grads)), sep="/")


def _check_adam_first_step(new, params, direction, lr_multi, atol=1e-6):
  """new − params == −lr·scale·direction per parameter (scale = lr_multi for the encoders); direction float64."""
  for path, old in traverse_util.flatten_dict(params, sep="/").items():
    scale = lr_multi if path.split("/")[0] in ENCODERS else 1.0
    if scale == 0.0:
      np.testing.assert_array_equal(new[path], old, err_msg=path)
      continue
    # |params| ≲ 5, so float32 rounding of the new value is ≤ 3e-7 — far below the 1e-4 of lr × 0.1.
    np.testing.assert_allclose(
      new[path].astype(np.float64) - old, -LEARNING_RATE * scale * direction[path], rtol=0, atol=atol, err_msg=path
    )


EPS = 1e-8  # optax.adam's eps


def test_encoders_train_at_lr_times_lr_multi(param_shapes):
  """One Adam step of the real optimiser: the first update is −lr·g/(|g| + eps) (bias-corrected moments)."""
  rng = np.random.default_rng(0)
  params = _random_tree(param_shapes, rng)
  grads = jax.tree.map(
    lambda p: (rng.normal(size=p.shape) * 10.0 ** rng.uniform(-6, 0, p.shape)).astype(np.float32), params
  )
  flat_grad = {k: g.astype(np.float64) for k, g in traverse_util.flatten_dict(grads, sep="/").items()}
  direction = {k: g / (np.abs(g) + EPS) for k, g in flat_grad.items()}
  for multiplier in (0.0, 0.1):
    new = _one_update(params, grads, lr_multi=multiplier, weight_decay=0.0, grad_clip_norm=0.0)
    _check_adam_first_step(new, params, direction, multiplier)


def test_adamw_weight_decay_is_decoupled_and_scaled_by_the_learning_rate(param_shapes):
  """AdamW's first step: −lr·scale·(g/(|g| + eps) + weight_decay·p) for every parameter (biases included)."""
  rng = np.random.default_rng(1)
  params = _random_tree(param_shapes, rng)
  grads = _random_tree(param_shapes, rng, scale=1e-3)
  weight_decay = 0.1
  flat_params = {k: p.astype(np.float64) for k, p in traverse_util.flatten_dict(params, sep="/").items()}
  flat_grad = {k: g.astype(np.float64) for k, g in traverse_util.flatten_dict(grads, sep="/").items()}
  adam = {k: g / (np.abs(g) + EPS) for k, g in flat_grad.items()}
  new = _one_update(params, grads, lr_multi=0.1, weight_decay=weight_decay, grad_clip_norm=0.0)
  _check_adam_first_step(new, params, {k: adam[k] + weight_decay * flat_params[k] for k in adam}, 0.1)
  # The decay term is visible: without it the step would be off by up to lr·wd·|p| ≈ 4e-4 on the head.
  with pytest.raises(AssertionError):
    _check_adam_first_step(new, params, adam, 0.1)


def test_gradient_clipping_scales_the_global_norm(param_shapes):
  """Gradients clipped to global norm c before Adam: g·min(1, c/‖g‖). Adam's first step is scale-free except
  through eps, so the gradients are small (~1e-6, |g| ~ eps after clipping) with one large entry setting ‖g‖."""
  rng = np.random.default_rng(2)
  params = _random_tree(param_shapes, rng)
  flat = traverse_util.flatten_dict(_random_tree(param_shapes, rng, scale=1e-6), sep="/")
  flat[sorted(k for k in flat if k.startswith("neck/"))[0]].reshape(-1)[0] = 100.0
  grads = traverse_util.unflatten_dict(flat, sep="/")
  flat_grad = {k: g.astype(np.float64) for k, g in flat.items()}
  norm = np.sqrt(sum(np.sum(g**2) for g in flat_grad.values()))
  clip = 1.0
  clipped = {k: g * min(1.0, clip / norm) for k, g in flat_grad.items()}
  new = _one_update(params, grads, lr_multi=0.1, weight_decay=0.0, grad_clip_norm=clip)
  _check_adam_first_step(new, params, {k: g / (np.abs(g) + EPS) for k, g in clipped.items()}, 0.1)
  with pytest.raises(AssertionError):  # Unclipped, the small gradients would take near-full ±lr steps.
    _check_adam_first_step(new, params, {k: g / (np.abs(g) + EPS) for k, g in flat_grad.items()}, 0.1)


def test_best_checkpoint_survives_a_restart_that_re_evaluates_its_step(tmp_path):
  """Preempted after the best checkpoint of step 4 but before a latest one: the rerun evaluates step 4 again."""
  state = {"w": jnp.arange(3.0)}
  checkpoints = checkpoints_lib.Checkpoints(str(tmp_path), keep=2)
  checkpoints.save_latest(2, state)
  checkpoints.save_best(4, state, {"mIoU": 0.5})
  checkpoints.save_best(6, state, {"mIoU": 0.25})  # Not better: Orbax drops it again.
  checkpoints.wait()
  checkpoints.close()
  restarted = checkpoints_lib.Checkpoints(str(tmp_path), keep=2)
  assert restarted.latest_step() == 2 and restarted.steps() == {"checkpoints": [2], "best": [4]}
  restarted.save_best(4, state, {"mIoU": 0.5})
  restarted.save_best(6, state, {"mIoU": 0.75})
  restarted.wait()
  assert restarted.steps()["best"] == [6]
  restored = restarted.restore({"w": jnp.zeros(3)}, "best")
  np.testing.assert_array_equal(restored["w"], [0.0, 1.0, 2.0])
  restarted.close()


def test_shuffled_control_gives_every_example_another_objects_sentence():
  ref_ids = np.array([7, 7, 7, 3, 3, 9, 9, 9, 5, 7])
  tokens = np.arange(10)[:, None] * np.ones((1, 4), np.int32)  # Row i holds i: its donor is readable.
  valid = np.ones(10, bool)
  valid[-1] = False  # Padding never donates a sentence.
  batch = {"tokens": tokens, "ref_id": ref_ids, "valid": valid, "image": np.zeros((10, 2, 2, 3), np.uint8)}
  shuffled = evaluate.shuffle_sentences(batch)
  donors = shuffled["tokens"][:, 0]
  assert np.all(ref_ids[donors] != ref_ids)
  assert np.all(valid[donors])
  assert len(set(donors.tolist())) > 3  # Drawn across the batch, not one fixed neighbour.
  np.testing.assert_array_equal(shuffled["image"], batch["image"])
  np.testing.assert_array_equal(evaluate.shuffle_sentences(batch)["tokens"], shuffled["tokens"])  # Deterministic.
  # A batch of one object has no wrong sentence to give: every example keeps its own.
  single = {"tokens": tokens[:3], "ref_id": ref_ids[:3]}
  np.testing.assert_array_equal(evaluate.shuffle_sentences(single)["tokens"], tokens[:3])
