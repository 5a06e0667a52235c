"""The checkpoints of a run: the latest steps (to resume) and the best one by validation mIoU (to evaluate).

Layout in the workdir (Orbax):
  checkpoints/<step>/   the latest `config.keep_checkpoints` steps, saved asynchronously; a run resumes from the
                        newest. The data position is the step itself (the input pipeline resumes from
                        `start_step`) and the dropout key is part of the state, so a restarted run continues
                        exactly.
  best/<step>/          the one step with the highest mIoU on the first evaluation split.

The two are separate managers because a `best_fn` manager with `max_to_keep` may delete the newest step, which
resuming needs. Evaluation restores only the parameters and BatchNorm statistics of a saved train state (a
partial restore): it needs no optimiser and no schedule.
"""

import logging as std_logging
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from absl import logging
import jax

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
CheckpointSpec = Union[str, int]  # "latest", "best" or a step number.


class Checkpoints:
  """The two Orbax managers of a workdir: "latest" (resuming) and "best" (by the first split's mIoU)."""

  def __init__(self, workdir: str, keep: int = 1, *, read_only: bool = False):
    """Opens (and, unless `read_only`, creates) the managers; `keep` is how many latest steps stay."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    self._ocp = ocp
    quiet_orbax_logging()
    self.workdir = workdir

    # Both managers save the same step numbers; with several processes their barriers are named after the step
    # directory, so each manager needs its own barrier prefix or the two saves of a step collide.
    def barriers(name: str):
      return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)

    # Read-only: create nothing and never delete (no max_to_keep). Orbax's own read_only option would do as
    # much but warns on every open; nothing here saves through a read-only instance.
    keep_latest, keep_best = (None, None) if read_only else (keep, 1)
    self.latest = ocp.CheckpointManager(
      os.path.join(workdir, LATEST_DIR),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep_latest, create=not read_only, multiprocessing_options=barriers("latest")
      ),
    )
    self.best = ocp.CheckpointManager(
      os.path.join(workdir, BEST_DIR),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep_best,
        best_fn=lambda m: m["mIoU"],
        best_mode="max",
        create=not read_only,
        keep_checkpoints_without_metrics=False,
        multiprocessing_options=barriers("best"),
      ),
    )

  def save_latest(self, step: int, state: Any):
    self.latest.save(step, args=self._ocp.args.StandardSave(state))

  def save_best(self, step: int, state: Any, eval_metrics: Mapping[str, float]):
    """Keeps `state` if its mIoU beats the kept best step (Orbax drops the worse of the two)."""
    # A run resumed from an older "latest" step re-evaluates steps whose best checkpoint is already kept; resuming
    # is exact, so that checkpoint holds this very state (and Orbax refuses to save a step twice).
    if step in self.best.all_steps():
      return
    self.best.save(step, args=self._ocp.args.StandardSave(state), metrics=dict(eval_metrics), force=True)

  def latest_step(self) -> Optional[int]:
    """The newest step of checkpoints/ (None in a fresh workdir)."""
    return self.latest.latest_step()

  def steps(self) -> Dict[str, List[int]]:
    return {LATEST_DIR: list(self.latest.all_steps()), BEST_DIR: list(self.best.all_steps())}

  def resolve(self, checkpoint: CheckpointSpec) -> Tuple[Any, int]:
    """(manager, step) of "latest", "best" or a step number (looked up in checkpoints/, then best/).

    Raises:
      FileNotFoundError: the workdir has no such checkpoint ("latest" / "best" in a run without any).
      ValueError: `checkpoint` is none of the three forms, or no checkpoint has that step (the message lists the
        steps there are).
    """
    spec = str(checkpoint).strip()
    if spec == "latest":
      manager, step = self.latest, self.latest.latest_step()
    elif spec == "best":
      manager, step = self.best, self.best.best_step()
    elif spec.isdigit():
      step = int(spec)
      manager = next((m for m in (self.latest, self.best) if step in m.all_steps()), None)
      if manager is None:
        raise ValueError(f"no checkpoint at step {step} in {self.workdir}: {self._describe()}")
    else:
      raise ValueError(f"checkpoint={checkpoint!r}: expected 'latest', 'best' or a step number")
    if step is None:
      raise FileNotFoundError(
        f"no {spec} checkpoint in {self.workdir} ({self._describe()}); train first, or point the workdir at a run"
      )
    return manager, step

  def restore(self, target: Any, checkpoint: CheckpointSpec = "latest", *, partial: bool = False) -> Any:
    """The saved values of `checkpoint` in the structure, shapes, dtypes and shardings of `target`.

    Args:
      target: a pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings) shaped like what was saved.
      checkpoint: "latest", "best" or a step number (see `resolve`).
      partial: `target` names only some of the saved subtrees (e.g. params and batch_stats of a train state,
        without the optimiser's); the others are not read.
    """
    manager, step = self.resolve(checkpoint)
    abstract = jax.tree.map(abstract_leaf, target)
    if partial:
      args = self._ocp.args.PyTreeRestore(
        item=abstract, partial_restore=True, restore_args=self._ocp.checkpoint_utils.construct_restore_args(abstract)
      )
    else:
      args = self._ocp.args.StandardRestore(abstract)
    return manager.restore(step, args=args)

  def _describe(self) -> str:
    if not os.path.isdir(self.workdir):
      return "the directory does not exist"
    return "; ".join(f"{name}/ has steps {steps or 'none'}" for name, steps in self.steps().items())

  def wait(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.latest.close()
    self.best.close()


def abstract_leaf(leaf: Any) -> Any:
  """A `jax.ShapeDtypeStruct` (with its sharding) for an array; other leaves as they are."""
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return leaf


class _DropOrbaxInfo(std_logging.Filter):
  """Drops the INFO/DEBUG records that Orbax logs through absl (dozens per save); its warnings stay."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax_logging():
  """Installs `_DropOrbaxInfo` on absl's logger once; other modules' INFO logs are untouched."""
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _DropOrbaxInfo) for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxInfo())
