"""Training of FCNet: schedule, optimiser, train state, the jitted sharded step, and the loop.

Reads top to bottom: learning-rate schedule → optimiser (encoders at lr × lr_multi) → train state →
`train_step` (pure; `jit_train_step` jits it over a device mesh) → `train_and_evaluate`, the loop: resume from
the latest checkpoint, train, evaluate periodically (`fcnet_jax.evaluate`), keep checkpoints
(`fcnet_jax.checkpoints`). Batches come from a `fcnet_jax.data.DataSource` as host-local NumPy dicts, so this
module imports without TensorFlow.
"""

import functools
import re
import time
from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging
import flax
from flax.training import train_state as flax_train_state
import jax
import jax.numpy as jnp
import ml_collections
import optax

from fcnet_jax import checkpoints as checkpoints_lib
from fcnet_jax import data as data_lib
from fcnet_jax import evaluate as evaluate_lib
from fcnet_jax import image_ops
from fcnet_jax import letterbox
from fcnet_jax import metrics as metrics_lib
from fcnet_jax import preemption
from fcnet_jax import run_config
from fcnet_jax import sharding
from fcnet_jax.models import fcnet
from fcnet_jax.models import mask_head

Batch = data_lib.Batch
model_inputs = data_lib.model_inputs  # Public here too: the train step's view of a batch.
PROFILE_WARMUP_STEPS = 10  # The profiler window opens after these steps (compilation, warm-up) when it can.


class TrainState(flax_train_state.TrainState):
  """Params, optimiser state, BatchNorm statistics and the dropout key (all replicated)."""

  batch_stats: Any
  dropout_rng: jax.Array

  def for_inference(self) -> evaluate_lib.InferenceState:
    """The step, parameters and BatchNorm statistics: all that prediction and evaluation read.

    A jitted call flattens every leaf of its arguments on the host, used or not (~0.4 µs each); dropping Adam's
    two moments cuts an R101 state from ~2,300 leaves to ~800, about 0.6 ms per batch-1 inference call.
    """
    return evaluate_lib.InferenceState(step=self.step, params=self.params, batch_stats=self.batch_stats)


# ----------------------------------------------------------------------------------------------------- schedule


def create_learning_rate_fn(
  config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
  """The base learning rate over steps.

  "piecewise" (the paper): constant `learning_rate`, × `lr_decay_factor` at each epoch in `lr_decay_epochs`.
  "cosine": linear warm-up over `warmup_steps`, cosine decay to 0 at `total_steps` (short CPU runs).
  With "piecewise" and `warmup_steps` > 0, a linear warm-up from 0 replaces the first steps; the decay steps stay
  where the epochs put them. The value at step n is the rate of the update that takes state.step n → n + 1.
  """
  if config.lr_schedule == "piecewise":
    boundaries = {int(epoch * steps_per_epoch): config.lr_decay_factor for epoch in config.lr_decay_epochs}
    schedule = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
  elif config.lr_schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, max(config.warmup_steps, 1), max(total_steps, config.warmup_steps + 1)
    )
  else:
    raise ValueError(f"config.lr_schedule={config.lr_schedule!r}; expected 'piecewise' or 'cosine'")
  if config.lr_schedule == "piecewise" and config.warmup_steps:
    warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    # join_schedules hands the second schedule the steps since the join; shift them back so that the decay
    # boundaries stay at their absolute steps (epoch × steps_per_epoch).
    piecewise = schedule
    schedule = optax.join_schedules([warmup, lambda step: piecewise(step + config.warmup_steps)], [config.warmup_steps])
  return schedule


def schedule_lengths(config: ml_collections.ConfigDict, train_refs: int) -> Tuple[int, int]:
  """(steps_per_epoch, total_steps): an epoch visits every training ref once (one sentence each)."""
  steps_per_epoch = max(train_refs // config.batch_size, 1)
  total_steps = config.num_train_steps or int(config.num_epochs * steps_per_epoch)
  return steps_per_epoch, total_steps


def parameter_labels(params: Any, encoder_regex: str) -> Any:
  """'encoder' for parameters whose path ("image_encoder/stem1/conv/kernel") matches the regex, else 'head'."""
  pattern = re.compile(encoder_regex)
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  labels = {path: "encoder" if pattern.search(path) else "head" for path in flat}
  return flax.traverse_util.unflatten_dict(labels, sep="/")


def create_optimizer(
  config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
  """Adam (AdamW when weight_decay > 0); the encoders matching `encoder_lr_regex` train at lr × lr_multi (CRIS).

  With `grad_clip_norm` > 0 the gradients are first clipped to that global norm (over all parameters).
  """

  def adam(multiplier):
    def lr(step):
      return learning_rate_fn(step) * multiplier

    if config.weight_decay:
      return optax.adamw(lr, weight_decay=config.weight_decay)
    return optax.adam(lr)

  tx = optax.multi_transform(
    {"encoder": adam(config.lr_multi), "head": adam(1.0)},
    functools.partial(parameter_labels, encoder_regex=config.encoder_lr_regex),
  )
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx


# ----------------------------------------------------------------------------------------------------- state


def _fresh_state_fn(model: fcnet.FCNet, tx: optax.GradientTransformation) -> Callable[[jax.Array], TrainState]:
  """rng → a fresh TrainState of `model` (its own initialisation, zero optimiser moments, a dropout key)."""
  images, tokens = data_lib.init_inputs(model.image_size, model.context_length)

  def init(rng):
    init_rng, dropout_rng = jax.random.split(rng)
    variables = model.init(init_rng, images, tokens, train=False)
    return TrainState.create(
      apply_fn=model.apply,
      params=variables["params"],
      tx=tx,
      batch_stats=variables.get("batch_stats", {}),
      dropout_rng=dropout_rng,
    )

  return init


def create_train_state(
  config: ml_collections.ConfigDict, model: fcnet.FCNet, rng: jax.Array, tx: optax.GradientTransformation
) -> TrainState:
  """Fresh variables (fp32) for `model`, the optimiser state and a dropout key (host-local).

  With `config.init_from`, the converted CLIP encoders (`fcnet_jax.tools.convert_clip`) replace the fresh
  encoder variables; everything else, and the optimiser state, stays fresh.
  """
  # One compiled program: the optimiser's zero moments, built eagerly, would compile one small kernel per shape.
  state = jax.jit(_fresh_state_fn(model, tx))(rng)
  if config.init_from:
    from fcnet_jax.weights import clip  # pylint: disable=g-import-not-at-top

    variables, report = clip.load_pretrained(
      {"params": state.params, "batch_stats": state.batch_stats}, read_init_from(config.init_from)
    )
    logging.info("Loaded %s:\n%s", config.init_from, report)
    state = state.replace(
      params=variables["params"], batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"])
    )
  return state


def read_init_from(path: str) -> Dict[str, Any]:
  """The variables `config.init_from` names, as NumPy arrays.

  Either converted CLIP encoders (`fcnet_jax.tools.convert_clip`: the encoder subtrees), or a whole trained FCNet:
  an exported model (`fcnet_jax.tools.export --format=orbax`) or a training workdir (its best checkpoint) — a
  full-model initialisation, e.g. to fine-tune a RefCOCO model on RefCOCO+.
  """
  from fcnet_jax import pretrained  # pylint: disable=g-import-not-at-top
  from fcnet_jax.weights import clip  # pylint: disable=g-import-not-at-top

  if pretrained.is_exported(path) or pretrained.is_workdir(path):
    _, variables = pretrained.read_variables(path, "best")
    return variables
  return clip.restore_converted(path)


def _seed_key(config: ml_collections.ConfigDict) -> jax.Array:
  """The key of `config.seed` that a train state starts from; its PRNG is also that of the saved dropout key.

  The rbg PRNG: the jitted init of a full FCNet compiles ~4× faster than with threefry on the CPU.
  """
  return jax.random.key(config.seed, impl="rbg")


def initial_state(
  config: ml_collections.ConfigDict, model: fcnet.FCNet, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> TrainState:
  """`create_train_state` from `config.seed`, replicated over every device of `mesh`."""
  return sharding.replicate(create_train_state(config, model, _seed_key(config), tx), mesh)


def abstract_initial_state(
  config: ml_collections.ConfigDict, model: fcnet.FCNet, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> TrainState:
  """`initial_state`'s structure, shapes, dtypes and (replicated) shardings, computing nothing: the target a resumed
  run restores its checkpoint into. The model's initialisation is traced, not compiled or run."""
  replicated = sharding.replicated_sharding(mesh)
  return jax.tree.map(
    lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated),
    jax.eval_shape(_fresh_state_fn(model, tx), _seed_key(config)),
  )


# ----------------------------------------------------------------------------------------------------- step


def train_step(
  state: TrainState,
  batch: Batch,
  *,
  model: fcnet.FCNet,
  mask_threshold: float,
  dice_weight: float = 0.0,
  mask_levels: int = 1,
) -> Tuple[TrainState, metrics_lib.TrainMetrics]:
  """One optimisation step on a (globally sharded) batch: BCE at H/4 (sec. 3.4; + Dice by config), Adam.

  The target is the letterboxed mask at H/4 divided by `mask_levels` (`letterbox.MASK_LEVELS`: 1 for our 0/1
  masks, 255 for CRIS's soft masks).
  """
  batch = data_lib.letterbox_on_device(batch, model.image_size)  # No-op unless config.data.device_letterbox.
  images, tokens = model_inputs(batch, fcnet.DTYPES[model.dtype])
  pred_size = model.image_size // 4
  target = image_ops.downsample_mask(batch["mask"], (pred_size, pred_size))
  if mask_levels != 1:
    target = target.astype(jnp.float32) / mask_levels
  weights = batch.get("valid")
  # A per-step key: resuming at step n reproduces the dropout masks of an uninterrupted run.
  dropout_rng = jax.random.fold_in(state.dropout_rng, state.step)

  def loss_fn(params):
    logits, new_model_state = model.apply(
      {"params": params, "batch_stats": state.batch_stats},
      images,
      tokens,
      train=True,
      rngs={"dropout": dropout_rng},
      mutable=["batch_stats"],
    )
    return mask_head.mask_loss(logits, target, weights, dice_weight), (logits, new_model_state)

  (loss, (logits, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=new_model_state["batch_stats"])
  outputs = metrics_lib.train_step_outputs(logits, target if mask_levels == 1 else target >= 0.5, loss, mask_threshold)
  if weights is not None:
    outputs["mask"] = weights
  return state, metrics_lib.TrainMetrics.single_from_model_output(**outputs)


def jit_train_step(config: ml_collections.ConfigDict, model: fcnet.FCNet, mesh: jax.sharding.Mesh):
  """`train_step` with the config's loss settings, jitted over `mesh`: batch sharded, state replicated and donated.

  The one definition of the step that the loop runs and `fcnet_jax.tools.benchmark` times.
  """
  replicated, data = sharding.replicated_sharding(mesh), sharding.batch_sharding(mesh)
  return jax.jit(
    functools.partial(
      train_step,
      model=model,
      mask_threshold=config.mask_threshold,
      dice_weight=config.dice_weight,
      mask_levels=letterbox.MASK_LEVELS[letterbox.check_mode(config.data.letterbox)],
    ),
    in_shardings=(replicated, data),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
  )


# ----------------------------------------------------------------------------------------------------- loop


def check_batch_sizes(config: ml_collections.ConfigDict):
  """Both global batch sizes must split evenly over the devices."""
  for field in ("batch_size", "eval_batch_size"):
    value = config[field]
    if value % jax.device_count():
      raise ValueError(f"config.{field}={value} is not divisible by the {jax.device_count()} devices")


def _profiler(config: ml_collections.ConfigDict, workdir: str, start_step: int, total_steps: int):
  """One profiler window of `config.profile_steps` steps (a trace under `workdir`/plugins/profile), or None.

  It opens after `PROFILE_WARMUP_STEPS` steps of this run, earlier when the run is too short for that, so that
  it closes before the last step; only process 0 profiles.
  """
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top

  if not config.profile_steps or jax.process_index() != 0:
    return None
  # The hook runs after each step; opened after step `first`, it traces steps first + 1 … first + profile_steps.
  first = start_step + max(1, min(PROFILE_WARMUP_STEPS, total_steps - start_step - config.profile_steps))
  return periodic_actions.Profile(
    num_profile_steps=config.profile_steps,
    logdir=workdir,
    profile_duration_ms=None,
    first_profile=first,
    every_secs=None,
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, data: Optional[data_lib.DataSource] = None
) -> Tuple[TrainState, Dict[str, evaluate_lib.Scores]]:
  """Trains (resuming from the latest checkpoint in `workdir`), evaluates periodically, keeps checkpoints.

  Every `eval_every_*` and at the last step, the evaluation splits are scored (`evaluate.Evaluator.run`:
  `eval_<split>.json`, TensorBoard scalars and overlays; the final one with the shuffled-sentence control when
  config.eval_shuffled_control is set), and the step is kept in best/ if the first split's mIoU is the highest.
  On SIGTERM (`fcnet_jax.preemption`) the step in flight finishes, its checkpoint is written and
  `preemption.Preempted` (a SystemExit with status 143) is raised; a non-finite loss raises
  `preemption.NonFiniteError` before anything after it is saved.

  Returns:
    (the final state, the metrics of the last evaluation per split name); the metrics are empty when the run
    had nothing left to train.
  """
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top

  data = data or data_lib.DataSource(config, workdir)
  sizes = data.split_sizes()
  if config.data.train_split not in sizes:
    raise ValueError(
      f"config.data.train_split={config.data.train_split!r} not among the converted splits {sorted(sizes)}"
    )
  steps_per_epoch, total_steps = schedule_lengths(config, sizes[config.data.train_split]["refs"])
  check_batch_sizes(config)
  model, mesh = fcnet.build_model(config.model), sharding.create_mesh()
  learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch, total_steps)
  tx = create_optimizer(config, learning_rate_fn)
  step_fn = jit_train_step(config, model, mesh)
  evaluator = evaluate_lib.Evaluator(config, model, mesh, data)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams(
    {
      k: v
      for k, v in flax.traverse_util.flatten_dict(config.to_dict(), sep=".").items()
      if isinstance(v, (int, float, str, bool))
    }
  )
  if run_config.exists(workdir):  # Resuming: the parameter tree and preprocessing must be those of the run.
    run_config.check_matches(run_config.load(workdir), config, workdir)
  if jax.process_index() == 0:
    run_config.save(config, workdir)
  checkpoints = checkpoints_lib.Checkpoints(workdir, config.keep_checkpoints)
  if checkpoints.latest_step() is not None:  # Resuming: the checkpoint replaces every value of a fresh state.
    state = checkpoints.restore_newest(abstract_initial_state(config, model, tx, mesh))
    logging.info("Resumed from step %d", int(state.step))
  else:
    state = initial_state(config, model, tx, mesh)
  start_step = int(state.step)
  eval_every = config.eval_every_steps or max(int(config.eval_every_epochs * steps_per_epoch), 1)

  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)]
  profiler = _profiler(config, workdir, start_step, total_steps)
  if profiler is not None:
    hooks.append(profiler)
  train_metrics, eval_metrics, t0 = None, {}, time.time()
  train_iter = data.train(start_step)
  stop, finite = preemption.StopSignal(), preemption.FiniteCheck(mesh)

  def check_finite(step: int, state: Optional[TrainState] = None):
    problem = finite.problem(step, state)
    if problem:
      checkpoints.wait()  # The saves in flight are of finite states: let them complete.
      raise preemption.non_finite_error(problem, checkpoints.latest_step(), checkpoints.latest.directory)

  try:
    with sharding.use_mesh(mesh):
      for step in range(start_step + 1, total_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          batch = sharding.global_batch(next(train_iter), mesh)
          if step == start_step + 1 and jax.process_count() > 1:  # None runs it before all have compiled it.
            step_fn = sharding.compile_together(step_fn, state, batch, name="train_step")
          state, update = step_fn(state, batch)
          finite.update(update.loss.total, state.step)
          train_metrics = update if train_metrics is None else train_metrics.merge(update)
        for hook in hooks:
          hook(step)
        if step % config.log_every_steps == 0 or step == total_steps:
          check_finite(step)
          scalars = {f"train/{k}": v for k, v in train_metrics.compute().items()}
          elapsed, train_metrics = time.time() - t0, None
          scalars["train/learning_rate"] = float(learning_rate_fn(step - 1))
          scalars["train/images_per_second"] = config.log_every_steps * config.batch_size / max(elapsed, 1e-9)
          writer.write_scalars(step, scalars)
          t0 = time.time()
        # Every process asks at every step (the multi-process agreement needs it); the last step just finishes.
        preempted = stop.reached(step) and step < total_steps
        if (step % eval_every == 0 or step == total_steps) and not preempted:
          check_finite(step, state)
          eval_metrics = evaluator.run(state.for_inference(), step, workdir, writer=writer, final=step == total_steps)
          checkpoints.save_best(step, state, eval_metrics[config.data.eval_splits[0]])
        if step % config.checkpoint_every_steps == 0 or step == total_steps or preempted:
          check_finite(step, state)
          checkpoints.save_latest(step, state)
        if preempted:
          checkpoints.wait()
          logging.warning("Preempted at step %d (SIGTERM): checkpoint saved, exiting to be restarted.", step)
          writer.flush()
          raise preemption.Preempted(step, str(checkpoints.latest.directory))
  finally:
    stop.close()
  checkpoints.wait()
  checkpoints.close()
  writer.flush()
  return state, eval_metrics
