"""Stopping a run cleanly when the machine is taken away (SIGTERM), and refusing to keep a broken state.

Schedulers announce a preemption with SIGTERM: TPU maintenance events and Spot/preemptible VM reclaims, SLURM
preemption and `scancel`, Kubernetes pod deletion, each followed by SIGKILL after a grace period (30 s on GCE
Spot VMs, the `terminationGracePeriodSeconds` of a pod, SLURM's `KillWait`). On SIGTERM the training loop
finishes the step in flight, writes a checkpoint at that step, logs why and exits with `PREEMPTED_EXIT_CODE`;
the restart resumes there exactly (fcnet_jax/checkpoints.py).

Several processes must stop at the same step, or the ones still training would wait forever in the next
collective. `jax.distributed.initialize` starts JAX's preemption sync service, which catches SIGTERM in any
process, tells the others through the coordination service and agrees on a step (the highest step any process
has reached, plus one); `multihost_utils.reached_preemption_sync_point(step)` is true at that step everywhere.
So in a multi-process run this module installs no handler of its own (a Python handler would replace the
service's and keep the notice local); a single process sets a flag from a Python SIGTERM handler.

Exit code 143 (= 128 + SIGTERM) is what the process would have reported had the signal killed it, so every
scheduler rule written for "terminated by SIGTERM" still applies, and it is non-zero: a Kubernetes Job, JobSet or
`restartPolicy: OnFailure` pod restarts it (exit 0 would mark the job complete and the training would never
resume), a shell retry loop (`until python main.py ...; do :; done`) reruns it, SLURM's preemption requeue
ignores the code anyway. The log line "Preempted at step N" tells it apart from a hard kill.
"""

import signal
import threading
from typing import Any, Optional

from absl import logging
import jax

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM; see the module docstring.


class Preempted(SystemExit):
  """The run stopped early on a preemption notice after saving the checkpoint of `step`; restart to resume.

  A `SystemExit` with `PREEMPTED_EXIT_CODE`, so that `main.py` (and any script calling `train_and_evaluate`)
  ends with that status without catching it, while a caller that wants to can.
  """

  def __init__(self, step: int, checkpoint_dir: str):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.step, self.checkpoint_dir = step, checkpoint_dir

  def __str__(self) -> str:
    return f"preempted: stopped at step {self.step}, checkpoint saved in {self.checkpoint_dir}"


class NonFiniteError(FloatingPointError):
  """The loss (or the state about to be saved) is NaN or infinite; names the step and the checkpoint to use."""


class StopSignal:
  """Whether the loop should stop after a step: SIGTERM seen by this process, or (multi-process) by any.

  Call `reached(step)` once per step, with the same steps in every process, from the step the run resumed at;
  `close()` restores the previous SIGTERM handler (single process).
  """

  def __init__(self):
    self._received = threading.Event()
    self._previous: Any = None
    self._multiprocess = jax.process_count() > 1
    self._sync_unavailable = False
    if not self._multiprocess and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum: int, frame: Optional[Any]) -> None:
    del signum, frame
    self._received.set()

  def reached(self, step: int) -> bool:
    """True at the step to stop after (the same step in every process)."""
    if not self._multiprocess:
      return self._received.is_set()
    if self._sync_unavailable:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as e:  # jax_enable_preemption_service turned off: a SIGTERM then kills the process.
      logging.warning("No preemption sync across processes (%s); a SIGTERM ends the run unsaved.", e)
      self._sync_unavailable = True
      return False

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class FiniteCheck:
  """The first step whose loss was not finite, tracked on the device; checked on the host before every save.

  `update` is one tiny jitted call per step that does not wait for the step (no host round trip); `check` fetches
  the result (at the log, evaluation and checkpoint steps, where the loop waits anyway) and also checks every
  floating-point array of the state about to be saved, so that no checkpoint ever holds NaN or infinity.
  `problem` says what is wrong; `non_finite_error` is the error to raise.
  """

  def __init__(self, mesh: jax.sharding.Mesh):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    from fcnet_jax import sharding  # pylint: disable=g-import-not-at-top

    def track(first_bad, loss_total, step):
      return jnp.where((first_bad == 0) & ~jnp.isfinite(loss_total), step.astype(first_bad.dtype), first_bad)

    def all_finite(tree):
      leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
      return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))

    self._first_bad = sharding.replicate(np.zeros((), np.int32), mesh)
    self._track, self._all_finite = jax.jit(track), jax.jit(all_finite)

  def update(self, loss_total: jax.Array, step: jax.Array) -> None:
    """Records `step` (the state's step after the update) if `loss_total` is NaN or infinite."""
    self._first_bad = self._track(self._first_bad, loss_total, step)

  def problem(self, step: int, state: Any = None) -> Optional[str]:
    """What is not finite: a loss so far, or a floating-point array of `state` (after `step`); None if all is."""
    first_bad = int(self._first_bad)
    if first_bad:
      return f"the training loss is not finite at step {first_bad}"
    if state is not None and not bool(self._all_finite(state)):
      return f"the train state after step {step} holds NaN or infinite values (the losses were finite)"
    return None


def non_finite_error(problem: str, last_good: Optional[int], checkpoint_dir: Any) -> NonFiniteError:
  """The error for `FiniteCheck.problem`, naming the checkpoint a rerun would resume from."""
  if last_good is None:
    good = f"there is no checkpoint in {checkpoint_dir} yet"
  else:
    good = f"the last good checkpoint is step {last_good} in {checkpoint_dir}"
  return NonFiniteError(
    f"{problem}; nothing after it was saved and {good}. Lower config.learning_rate, set config.grad_clip_norm or "
    "check the data, then rerun (it resumes from that checkpoint)."
  )
