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

Killed at any moment. Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete (on
gs://, where a rename is not atomic, a `commit_success.txt` marks it complete), and lists only complete steps: a
half-written step is never loaded, and opening the managers for training removes it. A complete step that does not
read back (a truncated or corrupted file) is moved to `checkpoints.corrupt-<step>` and the run resumes from the
step before (`restore_newest`). A save that fails (a full disk) raises `CheckpointSaveError` naming the step; the
earlier steps stay intact. The workdir may be local or remote (gs://…): every path goes through etils.epath.
"""

import logging as std_logging
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from absl import logging
import jax

from fcnet_jax import fileio

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
CORRUPT_PREFIX = "checkpoints.corrupt-"  # + step: a step that did not read back, set aside.
CheckpointSpec = Union[str, int]  # "latest", "best" or a step number.


class Checkpoints:
  """The two Orbax managers of a workdir: "latest" (resuming) and "best" (by the first split's mIoU)."""

  def __init__(self, workdir: str, keep: int = 1, *, read_only: bool = False):
    """Opens (and, unless `read_only`, creates) the managers; `keep` is how many latest steps stay."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    self._ocp = ocp
    quiet_orbax_logging()
    self.workdir = fileio.as_path(workdir)
    self._in_flight: Dict[int, int] = {}  # id(manager) → the step of its asynchronous save in flight.

    # Both managers save the same step numbers; with several processes their barriers are named after the step
    # directory, so each manager needs its own barrier prefix or the two saves of a step collide.
    def barriers(name: str):
      return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)

    # Read-only: create nothing and never delete (no max_to_keep). Orbax's own read_only option would do as
    # much but warns on every open; nothing here saves through a read-only instance.
    # Writers also remove the half-written steps of a killed run (cleanup_tmp_directories).
    keep_latest, keep_best = (None, None) if read_only else (keep, 1)
    self.latest = ocp.CheckpointManager(
      self.workdir / LATEST_DIR,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep_latest,
        create=not read_only,
        cleanup_tmp_directories=not read_only,
        multiprocessing_options=barriers("latest"),
      ),
    )
    self.best = ocp.CheckpointManager(
      self.workdir / BEST_DIR,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep_best,
        best_fn=lambda m: m["mIoU"],
        best_mode="max",
        create=not read_only,
        cleanup_tmp_directories=not read_only,
        keep_checkpoints_without_metrics=False,
        multiprocessing_options=barriers("best"),
      ),
    )

  def save_latest(self, step: int, state: Any):
    self._wait(self.latest)
    self._saving(step, self.latest, lambda: self.latest.save(step, args=self._ocp.args.StandardSave(state)))

  def save_best(self, step: int, state: Any, eval_metrics: Mapping[str, float]):
    """Keeps `state` if its mIoU beats the kept best step (Orbax drops the worse of the two)."""
    # A run resumed from an older "latest" step re-evaluates steps whose best checkpoint is already kept; resuming
    # is exact, so that checkpoint holds this very state (and Orbax refuses to save a step twice).
    if step in self.best.all_steps():
      return
    self._wait(self.best)
    args = self._ocp.args.StandardSave(state)
    self._saving(step, self.best, lambda: self.best.save(step, args=args, metrics=dict(eval_metrics), force=True))

  def _wait(self, manager: Any) -> None:
    """Waits for `manager`'s save in flight (Orbax would before the next save) so that its error names its step."""
    self._saving(self._in_flight.pop(id(manager), None), manager, manager.wait_until_finished, starts_save=False)

  def _saving(self, step: Optional[int], manager: Any, save: Callable[[], Any], *, starts_save: bool = True) -> None:
    """Runs `save` (of `step`, or a wait for it); a failure becomes a `CheckpointSaveError` naming the step."""
    try:
      save()
    except Exception as e:  # pylint: disable=broad-except
      what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
      full = " The file system is full." if "No space left on device" in str(e) else ""
      complete = [s for s in manager.all_steps() if s != step]
      raise CheckpointSaveError(
        f"saving {what} in {manager.directory} failed ({type(e).__name__}: {e}).{full} The complete checkpoints "
        f"there (steps {complete or 'none'}) are intact, and a rerun resumes from the newest."
      ) from e
    if starts_save:
      self._in_flight[id(manager)] = step

  def restore_newest(self, target: Any) -> Any:
    """The newest step of checkpoints/ that reads back, into `target`'s structure (see `restore`).

    A step that fails to read (truncated or corrupt files) is logged with its error, moved to
    `<workdir>/checkpoints.corrupt-<step>` (so that the step can be trained and saved again) and the step before it
    is tried. Raises a ValueError naming every step and its error when none reads back.
    """
    errors = []
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        return self.restore(target, step)
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f"step {step}: {type(e).__name__}: {e}")
        logging.error(
          "The checkpoint of step %d in %s does not read back (%s: %s); moving it to %s and trying the one before.",
          step, self.latest.directory, type(e).__name__, e, self.workdir / f"{CORRUPT_PREFIX}{step}",
        )  # fmt: skip
        self._set_aside(step)
    raise ValueError(f"no checkpoint in {self.workdir / LATEST_DIR} reads back: " + "; ".join(errors))

  def _set_aside(self, step: int) -> None:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    if jax.process_index() == 0:
      # Beside checkpoints/, in the workdir: on gs:// a rename needs an existing parent "directory".
      aside = self.workdir / f"{CORRUPT_PREFIX}{step}"
      if aside.exists():
        aside.rmtree()
      (self.workdir / LATEST_DIR / str(step)).rename(aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"fcnet_checkpoint_set_aside_{step}")
    self.latest.reload()

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
    if not self.workdir.is_dir():
      return "the directory does not exist"
    return "; ".join(f"{name}/ has steps {steps or 'none'}" for name, steps in self.steps().items())

  def wait(self):
    """Waits for the asynchronous saves in flight; a failed one raises `CheckpointSaveError`."""
    self._wait(self.latest)
    self._wait(self.best)

  def close(self):
    self.latest.close()
    self.best.close()


class CheckpointSaveError(OSError):
  """Writing a checkpoint failed (e.g. a full disk); the message names the step and the intact steps."""


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
