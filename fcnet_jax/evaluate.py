"""Evaluation of FCNet: the inference steps, the scoring of every evaluation split, and `--mode=eval`.

Reads top to bottom: the state that inference reads (`InferenceState`: no optimiser) → `predict_step` /
`eval_step` (pure; jitted over a device mesh) → the shuffled-sentence control → overlays → `Evaluator`, which
scores `config.data.eval_splits` and writes `eval_<split>.json` for both the training loop and `--mode=eval` →
`evaluate` (restore a checkpoint's parameters, evaluate) → `format_table`.

Metrics are those of docs/data.md ("Evaluation"): every (ref, sentence) pair of a split once, scored in the
original image frame (`metrics.eval_step_outputs`).

The shuffled-sentence control (`config.eval_shuffled_control`): the final evaluation of a training run and
`--mode=eval` also score every split with each example paired with the sentence of another example of its batch
that refers to a different object, reported as "<split>_shuffled_sentences". A model that reads the sentence
drops towards chance there; one that segments the most salient object regardless does not.
"""

import functools
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import flax
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from fcnet_jax import checkpoints as checkpoints_lib
from fcnet_jax import data as data_lib
from fcnet_jax import fileio
from fcnet_jax import letterbox
from fcnet_jax import metrics as metrics_lib
from fcnet_jax import pretrained
from fcnet_jax import sharding
from fcnet_jax.models import fcnet

Batch = data_lib.Batch
Scores = Dict[str, float]
NUM_OVERLAYS = 4  # Examples per split drawn into TensorBoard at each evaluation of a training run.
SHUFFLED_SUFFIX = "_shuffled_sentences"
SHUFFLE_SEED = 0
# The printed table (eval_<split>.json and TensorBoard have every metric of both protocols).
TABLE_METRICS = (
  "mIoU",
  "oIoU",
  "prec@0.5",
  "prec@0.6",
  "prec@0.7",
  "prec@0.8",
  "prec@0.9",
  "cris/mIoU",
  "cris/oIoU",
  "cris/prec@0.5",
  "cris/prec@0.7",
  "cris/prec@0.9",
  "count",
)


@flax.struct.dataclass
class InferenceState:
  """What prediction and evaluation read of a train state: the step, parameters and BatchNorm statistics.

  `TrainState.for_inference()` makes one from a train state; `restore_for_inference` from a checkpoint.
  """

  step: jax.Array
  params: Any
  batch_stats: Any


# ----------------------------------------------------------------------------------------------------- steps


def _logits(state: InferenceState, batch: Batch, model: fcnet.FCNet) -> jax.Array:
  images, tokens = data_lib.model_inputs(batch, fcnet.DTYPES[model.dtype])
  return model.apply({"params": state.params, "batch_stats": state.batch_stats}, images, tokens, train=False)


def predict_step(state: InferenceState, batch: Batch, *, model: fcnet.FCNet) -> jax.Array:
  """Inference: B×S/4×S/4 sigmoid probabilities (BatchNorm with running statistics, no dropout)."""
  return jax.nn.sigmoid(_logits(state, batch, model))


def eval_step(
  state: InferenceState,
  batch: Batch,
  *,
  model: fcnet.FCNet,
  mask_threshold: float,
  canvas: int,
  letterbox_mode: str = "integer",
) -> Tuple[metrics_lib.EvalMetrics, jax.Array]:
  """Scores a batch in the original image frame (docs/data.md); padding examples (valid=False) are excluded.

  Returns the metrics of the batch and the B×S/4×S/4 probabilities (for overlays).
  """
  logits = _logits(state, batch, model)
  outputs = metrics_lib.eval_step_outputs(logits, batch, mask_threshold, canvas, model.image_size, letterbox_mode)
  return metrics_lib.EvalMetrics.single_from_model_output(**outputs), jax.nn.sigmoid(logits)


def jit_eval_step(config: ml_collections.ConfigDict, model: fcnet.FCNet, mesh: jax.sharding.Mesh):
  """`eval_step` with the config's threshold and canvas, jitted over `mesh`: batch sharded, state replicated."""
  replicated, data = sharding.replicated_sharding(mesh), sharding.batch_sharding(mesh)
  return jax.jit(
    functools.partial(
      eval_step,
      model=model,
      mask_threshold=config.mask_threshold,
      canvas=config.data.eval_canvas,
      letterbox_mode=config.data.letterbox,
    ),
    in_shardings=(replicated, data),
    out_shardings=(replicated, data),
  )


# ----------------------------------------------------------------------------------------------------- control


def shuffle_sentences(batch: Batch) -> Batch:
  """Gives every example the sentence of another example of the batch that refers to a DIFFERENT object.

  Each example draws its donor from a permutation of the batch (seeded: the same batch gets the same donors in
  every run and mode), skipping donors with the same `ref_id`
  (another sentence of the same object would not be a wrong sentence); an example without such a donor (a batch
  of a single ref) keeps its own sentence. Padding examples (`valid=False`) are never donors.
  """
  tokens = np.asarray(batch["tokens"])
  size = tokens.shape[0]
  ref_ids = np.asarray(batch["ref_id"]) if "ref_id" in batch else np.arange(size)
  valid = np.asarray(batch["valid"], bool) if "valid" in batch else np.ones(size, bool)
  rng = np.random.default_rng(SHUFFLE_SEED)
  donors = np.arange(size)
  for i in range(size):
    candidates = [j for j in rng.permutation(size) if valid[j] and ref_ids[j] != ref_ids[i]]
    if candidates:
      donors[i] = candidates[0]
  return {**batch, "tokens": tokens[donors]}


def make_overlays(batch: Batch, prob: np.ndarray, threshold: float, count: int, mask_levels: int = 1) -> np.ndarray:
  """N×S×3S×3 float images in [0, 1]: the input | ground truth (green) | prediction (red), letterboxed frame."""
  images = np.asarray(batch["image"][:count], np.float32) / 255.0
  size = images.shape[1]
  factor = size // prob.shape[1]
  pred = np.repeat(np.repeat(np.asarray(prob[:count]) > threshold, factor, 1), factor, 2)
  gt = 2 * np.asarray(batch["mask"][:count], np.int32) >= mask_levels  # 0/1 masks, or CRIS's levels at half.

  def tint(mask, colour):
    return images * 0.5 + 0.5 * np.where(mask[..., None], colour, images)

  return np.concatenate(
    [images, tint(gt, np.array([0.0, 1.0, 0.0])), tint(pred, np.array([1.0, 0.0, 0.0]))], axis=2
  ).clip(0, 1)


# ----------------------------------------------------------------------------------------------------- splits


class Evaluator:
  """The jitted evaluation of one configuration on one mesh, over the evaluation splits of a data source."""

  def __init__(
    self, config: ml_collections.ConfigDict, model: fcnet.FCNet, mesh: jax.sharding.Mesh, data: data_lib.DataSource
  ):
    self.config, self.model, self.mesh, self.data = config, model, mesh, data
    self._eval_step = jit_eval_step(config, model, mesh)
    self._compiled_step = None  # Several processes: `_eval_step` compiled by all (`sharding.compile_together`).

  def score(
    self, state: InferenceState, batches: Iterable[Batch], *, shuffled: bool = False, num_overlays: int = 0
  ) -> Tuple[Scores, Optional[np.ndarray]]:
    """Metrics over every batch (merged across devices and processes), and overlays of the first examples."""
    metrics, overlays = None, None
    with sharding.use_mesh(self.mesh):
      for batch in batches:
        if shuffled:
          batch = shuffle_sentences(batch)
        batch_arrays = sharding.global_batch(batch, self.mesh)
        if jax.process_count() > 1 and self._compiled_step is None:  # No process runs it before all compiled it.
          self._compiled_step = sharding.compile_together(self._eval_step, state, batch_arrays, name="eval_step")
        update, prob = (self._compiled_step or self._eval_step)(state, batch_arrays)
        metrics = update if metrics is None else metrics.merge(update)
        if overlays is None and num_overlays:
          prob = multihost_utils.process_allgather(prob, tiled=True) if jax.process_count() > 1 else prob
          overlays = make_overlays(
            batch,
            np.asarray(prob),
            self.config.mask_threshold,
            num_overlays,
            letterbox.MASK_LEVELS[self.config.data.letterbox],
          )
    if metrics is None:
      raise ValueError("the evaluation split yielded no batches")
    return metrics.compute(), overlays

  def run(
    self, state: InferenceState, step: int, workdir: str, *, writer: Any = None, final: bool = True
  ) -> Dict[str, Scores]:
    """Scores every split of config.data.eval_splits; writes `<workdir>/eval_<name>.json` (and TensorBoard).

    Args:
      state: the parameters to evaluate.
      step: the training step they are from (recorded in the JSON files and TensorBoard).
      workdir: where the JSON files go (process 0 writes them).
      writer: a `clu.metric_writers` writer: scalars "eval/<name>/<metric>" and overlays of each split.
      final: the last evaluation of a run (or `--mode=eval`): adds the shuffled-sentence control when
        config.eval_shuffled_control is set.

    Returns:
      {name: {"mIoU", "oIoU", "prec@0.5", …, "prec@0.9", "count"}}, the names being the splits in config order,
      each followed by "<split>_shuffled_sentences" when the control ran.
    """
    results = {}
    for split in self.config.data.eval_splits:
      results[split], overlays = self.score(
        state, self.data.eval(split), num_overlays=NUM_OVERLAYS if writer is not None else 0
      )
      if writer is not None and overlays is not None:
        writer.write_images(step, {f"eval/{split}/image|ground_truth|prediction": overlays})
      if final and self.config.eval_shuffled_control:
        results[split + SHUFFLED_SUFFIX], _ = self.score(state, self.data.eval(split), shuffled=True)
    for name, scores in results.items():
      if writer is not None:
        writer.write_scalars(step, {f"eval/{name}/{k}": v for k, v in scores.items()})
      if jax.process_index() == 0:
        fileio.write_json(f"{workdir}/eval_{name}.json", {"step": step, "split": name, **scores})
    if writer is not None:
      writer.flush()
    return results


# ----------------------------------------------------------------------------------------------------- eval mode


def abstract_inference_state(model: fcnet.FCNet, mesh: jax.sharding.Mesh) -> InferenceState:
  """The shapes, dtypes and (replicated) shardings of `model`'s inference state; nothing is computed."""
  images, tokens = data_lib.init_inputs(model.image_size, model.context_length)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images, tokens)
  replicated = sharding.replicated_sharding(mesh)

  def place(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)

  return InferenceState(
    step=place(jax.ShapeDtypeStruct((), np.int32)),
    params=jax.tree.map(place, variables["params"]),
    batch_stats=jax.tree.map(place, variables.get("batch_stats", {})),
  )


def restore_for_inference(
  model: fcnet.FCNet, mesh: jax.sharding.Mesh, workdir: str, checkpoint: checkpoints_lib.CheckpointSpec = "latest"
) -> InferenceState:
  """The step, parameters and BatchNorm statistics of a saved train state, replicated over `mesh`.

  Only those are read (the optimiser's moments and the dropout key stay on disk): evaluation needs no optimiser
  and no schedule. `checkpoint`: "latest", "best" or a step number (`Checkpoints.resolve` names what is missing).
  """
  target = abstract_inference_state(model, mesh)
  checkpoints = checkpoints_lib.Checkpoints(workdir, read_only=True)
  try:
    restored = checkpoints.restore(flax.serialization.to_state_dict(target), checkpoint, partial=True)
  finally:
    checkpoints.close()
  return flax.serialization.from_state_dict(target, restored)


def evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  checkpoint: checkpoints_lib.CheckpointSpec = "latest",
  data: Optional[data_lib.DataSource] = None,
) -> Dict[str, Scores]:
  """`--mode=eval`: restores a checkpoint and scores config.data.eval_splits (`Evaluator.run`).

  `checkpoint` is "latest", "best" or a step number of `workdir`, or the path of another trained model (an
  exported model directory, or a training workdir whose best checkpoint is used). Writes
  `<workdir>/eval_<name>.json` (every metric, the step and the number of (ref, sentence) pairs scored), with the
  shuffled-sentence control when config.eval_shuffled_control is set, exactly as the final evaluation of a
  training run does.
  """
  source, spec = workdir, checkpoint
  if is_model_path(checkpoint):
    source, spec = str(checkpoint), "best"
  # Only the model must match: scoring under the other letterbox protocol is allowed (a warning says so).
  loaded = pretrained.load(source, spec, config=config, match=("model",))
  data = data or data_lib.DataSource(config, workdir)
  return Evaluator(config, loaded.model, loaded.mesh, data).run(loaded.state, loaded.step, workdir, final=True)


def is_model_path(checkpoint: checkpoints_lib.CheckpointSpec) -> bool:
  """Whether a --checkpoint value names a model directory rather than a step of the workdir."""
  spec = str(checkpoint)
  return spec not in ("latest", "best") and not spec.isdigit()


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
  """Every evaluated split as a fixed-width text table (percentages; count as an integer): our protocol's
  metrics, then CRIS's ("cris/…", the protocol of the CRIS and FCNet papers' tables; docs/data.md)."""
  names = [n for n in TABLE_METRICS if all(n in scores for scores in results.values())]
  width = max([28] + [len(name) + 2 for name in results])
  lines = [f"{'split':<{width}}" + "".join(f"{n:>14}" for n in names)]
  for name, scores in results.items():
    lines.append(
      f"{name:<{width}}"
      + "".join(f"{int(scores[n]):>14d}" if n == "count" else f"{100 * scores[n]:>14.2f}" for n in names)
    )
  return "\n".join(lines)
