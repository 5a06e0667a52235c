"""Training and evaluation of FCNet: train state, optimiser, jitted sharded steps, the loop.

Reads top to bottom: learning-rate schedule → optimiser (encoders at lr × lr_multi) → train state →
`train_step` / `eval_step` (pure, jitted over a device mesh) → `evaluate` → `train_and_evaluate`.
Batches arrive as iterators of host-local NumPy dicts (built by `input_pipeline`, imported lazily), so this
module imports without TensorFlow.
"""
import functools
import logging as std_logging
import os
import re
import time
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple

from absl import logging
import flax
from flax.training import train_state as flax_train_state
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fcnet_jax import image_ops
from fcnet_jax import metrics as metrics_lib
from fcnet_jax import sharding
from fcnet_jax.models import fcnet
from fcnet_jax.models import mask_head

Batch = Mapping[str, Any]


class TrainState(flax_train_state.TrainState):
  """Params, optimiser state, BatchNorm statistics and the dropout key (all replicated)."""
  batch_stats: Any
  dropout_rng: jax.Array

  def for_inference(self) -> "TrainState":
    """The state without the optimiser's moments: all that prediction and evaluation read.

    A jitted call flattens every leaf of its arguments on the host, used or not (~0.4 µs each); dropping Adam's
    two moments cuts an R101 state from ~2,300 leaves to ~800, about 0.6 ms per batch-1 inference call.
    """
    return self.replace(opt_state=None)


# ----------------------------------------------------------------------------------------------------- schedule


def create_learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int,
                            total_steps: int) -> optax.Schedule:
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
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1),
                                                  max(total_steps, config.warmup_steps + 1))
  else:
    raise ValueError(f"config.lr_schedule={config.lr_schedule!r}; expected 'piecewise' or 'cosine'")
  if config.lr_schedule == "piecewise" and config.warmup_steps:
    warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    # join_schedules hands the second schedule the steps since the join; shift them back so that the decay
    # boundaries stay at their absolute steps (epoch × steps_per_epoch).
    piecewise = schedule
    schedule = optax.join_schedules([warmup, lambda step: piecewise(step + config.warmup_steps)],
                                    [config.warmup_steps])
  return schedule


def parameter_labels(params: Any, encoder_regex: str) -> Any:
  """'encoder' for parameters whose path ("image_encoder/stem1/conv/kernel") matches the regex, else 'head'."""
  pattern = re.compile(encoder_regex)
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  labels = {path: "encoder" if pattern.search(path) else "head" for path in flat}
  return flax.traverse_util.unflatten_dict(labels, sep="/")


def create_optimizer(config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """Adam (AdamW when weight_decay > 0); the encoders matching `encoder_lr_regex` train at lr × lr_multi (CRIS)."""
  def adam(multiplier):
    lr = lambda step: learning_rate_fn(step) * multiplier
    if config.weight_decay:
      return optax.adamw(lr, weight_decay=config.weight_decay)
    return optax.adam(lr)
  tx = optax.multi_transform({"encoder": adam(config.lr_multi), "head": adam(1.0)},
                             functools.partial(parameter_labels, encoder_regex=config.encoder_lr_regex))
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx


def create_train_state(config: ml_collections.ConfigDict, model: fcnet.FCNet, rng: jax.Array,
                       tx: optax.GradientTransformation) -> TrainState:
  """Fresh variables (fp32) for `model`, the optimiser state and a dropout key."""
  images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  tokens = jnp.zeros((1, model.context_length), jnp.int32).at[:, 0].set(49406).at[:, 1].set(49407)

  def init(rng):
    init_rng, dropout_rng = jax.random.split(rng)
    variables = model.init(init_rng, images, tokens, train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}), dropout_rng=dropout_rng)

  # One compiled program: the optimiser's zero moments, built eagerly, would compile one small kernel per shape.
  return jax.jit(init)(rng)


# ----------------------------------------------------------------------------------------------------- steps


def model_inputs(batch: Batch, dtype: Any) -> Tuple[jax.Array, jax.Array]:
  """uint8 letterboxed images → normalized `dtype` images on the device (the host ships uint8), and tokens."""
  return image_ops.normalize_images(batch["image"], dtype), batch["tokens"]


def train_step(state: TrainState, batch: Batch, *, model: fcnet.FCNet, mask_threshold: float,
               dice_weight: float = 0.0) -> Tuple[TrainState, metrics_lib.TrainMetrics]:
  """One optimisation step on a (globally sharded) batch: BCE at H/4 (sec. 3.4; + Dice by config), Adam."""
  images, tokens = model_inputs(batch, fcnet.DTYPES[model.dtype])
  pred_size = model.image_size // 4
  target = image_ops.downsample_mask(batch["mask"], (pred_size, pred_size))
  weights = batch.get("valid")
  # A per-step key: resuming at step n reproduces the dropout masks of an uninterrupted run.
  dropout_rng = jax.random.fold_in(state.dropout_rng, state.step)

  def loss_fn(params):
    logits, new_model_state = model.apply({"params": params, "batch_stats": state.batch_stats}, images, tokens,
                                          train=True, rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
    return mask_head.mask_loss(logits, target, weights, dice_weight), (logits, new_model_state)

  (loss, (logits, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=new_model_state["batch_stats"])
  outputs = metrics_lib.train_step_outputs(logits, target, loss, mask_threshold)
  if weights is not None:
    outputs["mask"] = weights
  return state, metrics_lib.TrainMetrics.single_from_model_output(**outputs)


def _logits(state: TrainState, batch: Batch, model: fcnet.FCNet) -> jax.Array:
  images, tokens = model_inputs(batch, fcnet.DTYPES[model.dtype])
  return model.apply({"params": state.params, "batch_stats": state.batch_stats}, images, tokens, train=False)


def predict_step(state: TrainState, batch: Batch, *, model: fcnet.FCNet) -> jax.Array:
  """Inference: B×S/4×S/4 sigmoid probabilities (BatchNorm with running statistics, no dropout)."""
  return jax.nn.sigmoid(_logits(state, batch, model))


def eval_step(state: TrainState, batch: Batch, *, model: fcnet.FCNet, mask_threshold: float,
              canvas: int) -> Tuple[metrics_lib.EvalMetrics, jax.Array]:
  """Scores a batch in the original image frame (protocol.md); padding examples (valid=False) are excluded.

  Returns the metrics of the batch and the B×S/4×S/4 probabilities (for overlays).
  """
  logits = _logits(state, batch, model)
  outputs = metrics_lib.eval_step_outputs(logits, batch, mask_threshold, canvas, model.image_size)
  return metrics_lib.EvalMetrics.single_from_model_output(**outputs), jax.nn.sigmoid(logits)


# ----------------------------------------------------------------------------------------------------- data


class DataSource:
  """How batches reach the loop: host-local NumPy iterators and the split sizes.

  The default reads converted TFRecord shards through `input_pipeline.pipeline` (imported lazily, so this module
  works where TensorFlow is absent); tests and other front-ends can pass their own callables.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               train_iter_fn: Optional[Callable[[int], Iterator[Batch]]] = None,
               eval_iter_fn: Optional[Callable[[str], Iterable[Batch]]] = None,
               split_sizes: Optional[Mapping[str, Mapping[str, int]]] = None):
    self.config = config
    self._train_iter_fn, self._eval_iter_fn, self._split_sizes = train_iter_fn, eval_iter_fn, split_sizes

  def _pipeline(self):
    from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
    if not self.config.data.tfrecord_dir:
      raise ValueError("config.data.tfrecord_dir is empty: point it at the output of `python -m input_pipeline.convert`")
    return pipeline

  def split_sizes(self) -> Mapping[str, Mapping[str, int]]:
    if self._split_sizes is None:
      self._split_sizes = self._pipeline().dataset_info(self.config.data.tfrecord_dir)["splits"]
    return self._split_sizes

  def train(self, start_step: int) -> Iterator[Batch]:
    if self._train_iter_fn is not None:
      return self._train_iter_fn(start_step)
    c = self.config
    return self._pipeline().train_iterator(
        c.data.tfrecord_dir, c.data.train_split, image_size=c.model.image_size,
        context_length=c.model.context_length, batch_size=c.batch_size // jax.process_count(), seed=c.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        shuffle_buffer=c.data.shuffle_buffer, start_step=start_step)

  def eval(self, split: str) -> Iterable[Batch]:
    if self._eval_iter_fn is not None:
      return self._eval_iter_fn(split)
    c = self.config
    return self._pipeline().eval_iterator(
        c.data.tfrecord_dir, split, image_size=c.model.image_size, context_length=c.model.context_length,
        batch_size=c.eval_batch_size // jax.process_count(), process_index=jax.process_index(),
        process_count=jax.process_count(), canvas=c.data.eval_canvas)


def shuffle_sentences(batch: Batch, seed: int = 0) -> Batch:
  """Gives every example the sentence of another example of the batch that refers to a DIFFERENT object.

  The control of the embedded default: a model that reads the sentence drops to chance, one that segments the
  most salient object regardless does not. Each example draws its donor from a seeded permutation of the batch,
  skipping donors with the same `ref_id` (another sentence of the same object would not be a wrong sentence);
  an example without such a donor (a batch of a single ref) keeps its own sentence. Padding examples
  (`valid=False`) are never donors.
  """
  tokens = np.asarray(batch["tokens"])
  size = tokens.shape[0]
  ref_ids = np.asarray(batch["ref_id"]) if "ref_id" in batch else np.arange(size)
  valid = np.asarray(batch["valid"], bool) if "valid" in batch else np.ones(size, bool)
  rng = np.random.default_rng(seed)
  donors = np.arange(size)
  for i in range(size):
    candidates = [j for j in rng.permutation(size) if valid[j] and ref_ids[j] != ref_ids[i]]
    if candidates:
      donors[i] = candidates[0]
  return {**batch, "tokens": tokens[donors]}


# ----------------------------------------------------------------------------------------------------- loop


def jit_train_step(config: ml_collections.ConfigDict, model: fcnet.FCNet, mesh: jax.sharding.Mesh):
  """`train_step` with the config's loss settings, jitted over `mesh`: batch sharded, state replicated and donated.

  The one definition of the step that `Trainer` runs and `tools.benchmark` times.
  """
  replicated, data = sharding.replicated_sharding(mesh), sharding.batch_sharding(mesh)
  return jax.jit(functools.partial(train_step, model=model, mask_threshold=config.mask_threshold,
                                   dice_weight=config.dice_weight),
                 in_shardings=(replicated, data), out_shardings=(replicated, replicated), donate_argnums=(0,))


class Trainer:
  """The jitted, sharded steps of one configuration on one mesh."""

  def __init__(self, config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int):
    self.config = config
    self.model = fcnet.build_model(config.model)
    self.mesh = sharding.create_mesh()
    self.learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch, total_steps)
    self.tx = create_optimizer(config, self.learning_rate_fn)
    replicated, data = sharding.replicated_sharding(self.mesh), sharding.batch_sharding(self.mesh)
    self.train_step = jit_train_step(config, self.model, self.mesh)
    self.eval_step = jax.jit(
        functools.partial(eval_step, model=self.model, mask_threshold=config.mask_threshold,
                          canvas=config.data.eval_canvas),
        in_shardings=(replicated, data), out_shardings=(replicated, data))

  def initial_state(self) -> TrainState:
    # The rbg PRNG: the jitted init of a full FCNet compiles ~4× faster than with threefry on the CPU.
    rng = jax.random.key(self.config.seed, impl="rbg")
    state = create_train_state(self.config, self.model, rng, self.tx)
    if self.config.init_from:
      state = self._load_pretrained(state)
    return sharding.replicate(state, self.mesh)

  def _load_pretrained(self, state: TrainState) -> TrainState:
    from fcnet_jax.weights import clip  # pylint: disable=g-import-not-at-top
    variables, report = clip.load_pretrained({"params": state.params, "batch_stats": state.batch_stats},
                                             clip.restore_converted(self.config.init_from))
    logging.info("Loaded %s:\n%s", self.config.init_from, report)
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                         opt_state=self.tx.init(variables["params"]))

  def evaluate(self, state: TrainState, batches: Iterable[Batch], *, sentences_shuffled: bool = False,
               num_overlays: int = 0) -> Tuple[Dict[str, float], Optional[np.ndarray]]:
    """Metrics over every batch of an evaluation split, and overlays of the first examples."""
    metrics, overlays = None, None
    state = state.for_inference()
    with sharding.use_mesh(self.mesh):
      for batch in batches:
        if sentences_shuffled:
          batch = shuffle_sentences(batch)
        update, prob = self.eval_step(state, sharding.global_batch(batch, self.mesh))
        metrics = update if metrics is None else metrics.merge(update)
        if overlays is None and num_overlays:
          overlays = make_overlays(batch, multihost_utils.process_allgather(prob, tiled=True)
                                   if jax.process_count() > 1 else np.asarray(prob),
                                   self.config.mask_threshold, num_overlays)
    if metrics is None:
      raise ValueError("the evaluation split yielded no batches")
    return metrics.compute(), overlays


def make_overlays(batch: Batch, prob: np.ndarray, threshold: float, count: int) -> np.ndarray:
  """N×S×3S×3 float images in [0, 1]: the input | ground truth (green) | prediction (red), letterboxed frame."""
  images = np.asarray(batch["image"][:count], np.float32) / 255.0
  size = images.shape[1]
  factor = size // prob.shape[1]
  pred = np.repeat(np.repeat(np.asarray(prob[:count]) > threshold, factor, 1), factor, 2)
  gt = np.asarray(batch["mask"][:count]) > 0
  tint = lambda mask, colour: images * 0.5 + 0.5 * np.where(mask[..., None], colour, images)
  return np.concatenate([images, tint(gt, np.array([0.0, 1.0, 0.0])), tint(pred, np.array([1.0, 0.0, 0.0]))],
                        axis=2).clip(0, 1)


# ----------------------------------------------------------------------------------------------------- checkpoints


class Checkpoints:
  """Two Orbax managers: the latest K steps (for resuming; asynchronous) and the best by validation mIoU.

  They are separate because a `best_fn` manager with `max_to_keep` may delete the newest step, which resuming
  needs. The data position is the step itself (the input pipeline resumes from `start_step`), and the dropout
  key is part of the state, so a restarted run continues exactly.
  """

  def __init__(self, workdir: str, keep: int):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    quiet_orbax_logging()
    # Both managers save the same step numbers; with several processes their barriers are named after the step
    # directory, so each manager needs its own barrier prefix or the two saves of a step collide.
    barriers = lambda name: ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)
    self.latest = ocp.CheckpointManager(
        f"{workdir}/checkpoints", options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, multiprocessing_options=barriers("latest")))
    self.best = ocp.CheckpointManager(
        f"{workdir}/best", options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m["mIoU"], best_mode="max", create=True,
            keep_checkpoints_without_metrics=False, multiprocessing_options=barriers("best")))

  def save_latest(self, step: int, state: TrainState, force: bool = False):
    self.latest.save(step, args=self._ocp.args.StandardSave(state), force=force)

  def save_best(self, step: int, state: TrainState, eval_metrics: Mapping[str, float]):
    # A run resumed from an older "latest" step re-evaluates steps whose best checkpoint is already kept; resuming
    # is exact, so that checkpoint holds this very state (and Orbax refuses to save a step twice).
    if step in self.best.all_steps():
      return
    self.best.save(step, args=self._ocp.args.StandardSave(state), metrics=dict(eval_metrics), force=True)

  def restore(self, state: TrainState, which: str = "latest", step: Optional[int] = None) -> Optional[TrainState]:
    """`which` = "latest" | "best"; `step` picks one step of that manager. None when there is nothing."""
    manager = {"latest": self.latest, "best": self.best}.get(which)
    if manager is None:
      raise ValueError(f"checkpoint {which!r}: expected 'latest' or 'best'")
    step = manager.latest_step() if step is None and which == "latest" else (
        manager.best_step() if step is None else step)
    if step is None:
      return None
    if step not in manager.all_steps():
      raise ValueError(f"no {which} checkpoint at step {step} in {manager.directory}; have {manager.all_steps()}")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                            if hasattr(x, "sharding") else x, state)
    return manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

  def wait(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.latest.close()
    self.best.close()


class _DropOrbaxInfo(std_logging.Filter):
  """Drops the INFO/DEBUG records that Orbax logs through absl (dozens per save); its warnings stay."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax_logging():
  """Installs `_DropOrbaxInfo` on absl's logger once; other modules' INFO logs are untouched."""
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _DropOrbaxInfo) for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxInfo())


# ----------------------------------------------------------------------------------------------------- driver


def schedule_lengths(config: ml_collections.ConfigDict, train_refs: int) -> Tuple[int, int]:
  """(steps_per_epoch, total_steps): an epoch visits every training ref once (one sentence each)."""
  steps_per_epoch = max(train_refs // config.batch_size, 1)
  total_steps = config.num_train_steps or int(config.num_epochs * steps_per_epoch)
  return steps_per_epoch, total_steps


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       data: Optional[DataSource] = None) -> Dict[str, Any]:
  """Trains (resuming from the latest checkpoint in `workdir`), evaluates periodically, keeps checkpoints.

  Returns the final state and the last evaluation metrics per split.
  """
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  data = data or DataSource(config)
  sizes = data.split_sizes()
  if config.data.train_split not in sizes:
    raise ValueError(f"config.data.train_split={config.data.train_split!r} not among the converted splits "
                     f"{sorted(sizes)}")
  steps_per_epoch, total_steps = schedule_lengths(config, sizes[config.data.train_split]["refs"])
  _check_batch_sizes(config)
  trainer = Trainer(config, steps_per_epoch, total_steps)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams({k: v for k, v in flax.traverse_util.flatten_dict(config.to_dict(), sep=".").items()
                        if isinstance(v, (int, float, str, bool))})
  checkpoints = Checkpoints(workdir, config.keep_checkpoints)
  state = trainer.initial_state()
  restored = checkpoints.restore(state)
  if restored is not None:
    state = restored
    logging.info("Resumed from step %d", int(state.step))
  start_step = int(state.step)
  eval_every = config.eval_every_steps or max(int(config.eval_every_epochs * steps_per_epoch), 1)

  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)]
  if jax.process_index() == 0 and config.profile_steps:
    hooks.append(periodic_actions.Profile(num_profile_steps=config.profile_steps, logdir=workdir,
                                          profile_duration_ms=None))
  train_metrics, last_eval, t0 = None, {}, time.time()
  train_iter = data.train(start_step)
  with sharding.use_mesh(trainer.mesh):
    for step in range(start_step + 1, total_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = sharding.global_batch(next(train_iter), trainer.mesh)
        state, update = trainer.train_step(state, batch)
        train_metrics = update if train_metrics is None else train_metrics.merge(update)
      for hook in hooks:
        hook(step)
      if step % config.log_every_steps == 0 or step == total_steps:
        scalars = {f"train/{k}": v for k, v in train_metrics.compute().items()}
        elapsed, train_metrics = time.time() - t0, None
        scalars["train/learning_rate"] = float(trainer.learning_rate_fn(step - 1))
        scalars["train/images_per_second"] = config.log_every_steps * config.batch_size / max(elapsed, 1e-9)
        writer.write_scalars(step, scalars)
        t0 = time.time()
      if step % eval_every == 0 or step == total_steps:
        last_eval = evaluate_splits(trainer, state, data, config.data.eval_splits, writer, step, workdir)
        first = last_eval[config.data.eval_splits[0]]
        checkpoints.save_best(step, state, first)
      if step % config.checkpoint_every_steps == 0 or step == total_steps:
        checkpoints.save_latest(step, state)
  checkpoints.wait()
  checkpoints.close()
  writer.flush()
  return {"state": state, "eval": last_eval, "trainer": trainer}


def evaluate_splits(trainer: Trainer, state: TrainState, data: DataSource, splits, writer, step: int,
                    workdir: str) -> Dict[str, Dict[str, float]]:
  """Evaluates each split, writes scalars, overlays and `eval_<split>.json`."""
  results = {}
  for split in splits:
    scores, overlays = trainer.evaluate(state, data.eval(split), num_overlays=4)
    results[split] = scores
    writer.write_scalars(step, {f"eval/{split}/{k}": v for k, v in scores.items()})
    if overlays is not None:
      writer.write_images(step, {f"eval/{split}/image|ground_truth|prediction": overlays})
    if jax.process_index() == 0:
      _write_json(f"{workdir}/eval_{split}.json", {"step": step, "split": split, **scores})
  writer.flush()
  return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *, checkpoint: str = "latest",
                        data: Optional[DataSource] = None, shuffled_control: bool = False
                        ) -> Dict[str, Dict[str, float]]:
  """`--mode=eval`: restores a checkpoint ("latest", "best" or a step number) and evaluates config's splits.

  Prints a table and writes `eval_<split>.json` (every metric and the number of (ref, sentence) pairs scored).
  With `shuffled_control`, also scores every split with the sentences shuffled across examples.
  """
  data = data or DataSource(config)
  trainer = Trainer(config, 1, 1)
  state = trainer.initial_state()
  which, step = ("latest", int(checkpoint)) if checkpoint.isdigit() else (checkpoint, None)
  checkpoints = Checkpoints(workdir, config.keep_checkpoints)
  restored = checkpoints.restore(state, which, step)
  checkpoints.close()
  if restored is None:
    raise FileNotFoundError(f"no {which} checkpoint under {workdir}")
  results = {}
  for split in config.data.eval_splits:
    results[split], _ = trainer.evaluate(restored, data.eval(split))
    if shuffled_control:
      results[f"{split}_shuffled_sentences"], _ = trainer.evaluate(restored, data.eval(split),
                                                                   sentences_shuffled=True)
  if jax.process_index() == 0:
    for split, scores in results.items():
      _write_json(f"{workdir}/eval_{split}.json", {"step": int(restored.step), "split": split, **scores})
    print(format_table(results))
  return results


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
  names = ["mIoU", "oIoU", "prec@0.5", "prec@0.6", "prec@0.7", "prec@0.8", "prec@0.9", "count"]
  lines = [f"{'split':<28}" + "".join(f"{n:>10}" for n in names)]
  for split, scores in results.items():
    lines.append(f"{split:<28}" + "".join(
        f"{int(scores[n]):>10d}" if n == "count" else f"{100 * scores[n]:>10.2f}" for n in names))
  return "\n".join(lines)


def _check_batch_sizes(config: ml_collections.ConfigDict):
  for field in ("batch_size", "eval_batch_size"):
    value = config[field]
    if value % jax.device_count():
      raise ValueError(f"config.{field}={value} is not divisible by the {jax.device_count()} devices")


def _write_json(path: str, payload: Mapping[str, Any]):
  import json  # pylint: disable=g-import-not-at-top
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
