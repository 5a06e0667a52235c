"""Killed at any moment, nothing lost (fcnet_jax/preemption.py, fcnet_jax/checkpoints.py, the loop of train.py).

The real `main.py` trains configs/tiny.py in subprocesses, with the training settings of the suite's shared trained
run (tests/conftest.py `trained_tiny_workdir`: 4 steps, the learning rate ×0.1 at step 3, dropout on), which is
the uninterrupted reference: its checkpoint of step 4 is what every interrupted run must end with.

* the chain, one workdir, a checkpoint every step (evaluation only at the end), restarted until done:
  A. SIGTERM once step 1 is logged: exit status 143, "Preempted at step s", a checkpoint at s and none after;
  B. SIGKILL while an asynchronous checkpoint write is in flight (a `*.orbax-checkpoint-tmp-*` directory exists;
     which write is seeded);
  C. SIGKILL at a seeded random moment after it resumed;
  then the newest complete checkpoint's files are truncated (corruption), and
  D. runs to the end: it names the unreadable step, sets it aside, resumes from the one before, removes every
     half-written directory, and its step-4 checkpoint equals the reference's bit for bit (params, Adam moments
     and counts, BatchNorm statistics, step, dropout key), as do its final evaluations.
* non-finite: the reference continued to step 6 at learning rate NaN: a one-line error naming step 6 and the last
  good checkpoint (4), and no checkpoint after 4.

* several processes: tests/test_distributed.py (2 processes × 4 devices, SIGTERM to one, both stop at the same step,
  resume, and match a single-process run).

In-process (no model): a full disk while saving (a 1 MiB tmpfs mounted here; tests run as root) raises an error
naming the step and leaves the earlier checkpoint readable; a corrupt step falls back to the previous one.
"""

import contextlib
import functools
import os
import random
import re
import resource
import signal
import subprocess
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from fcnet_jax import checkpoints as checkpoints_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from fcnet_jax import fileio  # pylint: disable=g-import-not-at-top,wrong-import-position
from fcnet_jax import preemption  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_worker  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

STEPS = train_worker.TRAINED_STEPS  # 4
TIMEOUT_S = 900
SEED = 13  # Picks which checkpoint write B is killed in and when C is killed.
TMP_MARK = ".orbax-checkpoint-tmp"


# What the chain changes in the reference's flags (none of it changes the training): a checkpoint every step, one
# evaluation (at the end, without the shuffled-sentence control), no profile.
CHAIN_FLAGS = (
  "--config.checkpoint_every_steps=1",
  "--config.keep_checkpoints=3",
  f"--config.eval_every_steps={STEPS}",
  "--config.eval_shuffled_control=false",
  "--config.profile_steps=0",
)


# A main.py subprocess whose output goes to a log file (wait for log lines, kill it): Run(command, log_path[, env]).
Run = functools.partial(train_worker.LoggedProcess, timeout=TIMEOUT_S)


def entries(workdir: str, manager: str = checkpoints_lib.LATEST_DIR):
  path = os.path.join(workdir, manager)
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def complete_steps(workdir: str):
  return sorted(int(name) for name in entries(workdir) if name.isdigit())


def read_checkpoint(workdir: str, step: int):
  """Every array of checkpoints/<step> as NumPy, keyed by pytree path."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  tree = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, checkpoints_lib.LATEST_DIR, str(step), "default"))
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): np.asarray(jax.random.key_data(x) if _is_key(x) else x) for path, x in flat}


def _is_key(x) -> bool:
  import jax  # pylint: disable=g-import-not-at-top

  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def truncate_files(workdir: str, step: int) -> None:
  """Cuts every file of checkpoints/<step> (but its completion marker) to half its length."""
  for directory, _, files in os.walk(os.path.join(workdir, checkpoints_lib.LATEST_DIR, str(step), "default")):
    for name in files:
      if name != "commit_success.txt":
        with open(os.path.join(directory, name), "r+b") as f:
          f.truncate(os.path.getsize(f.name) // 2)


@pytest.fixture(scope="module")
def reference(trained_tiny_workdir):
  assert trained_tiny_workdir.steps == STEPS
  return trained_tiny_workdir.workdir  # Read-only.


@pytest.fixture(scope="module")
def chain(trained_tiny_workdir, tmp_path_factory):
  """The killed-and-restarted workdir; {"workdir", "A": …, "B": …, "C": …, "D": …} with what each run showed."""
  root = tmp_path_factory.mktemp("chain")
  workdir, rng, seen = str(root / "workdir"), random.Random(SEED), {}
  command = trained_tiny_workdir.command(workdir, *CHAIN_FLAGS)

  # A: SIGTERM once training runs.
  run = Run(command, str(root / "A.log"))
  run.wait_for(r"\[1\] train/")
  run.process.send_signal(signal.SIGTERM)
  seen["A"] = {"returncode": run.finish(), "log": run.text(), "steps": complete_steps(workdir)}

  # B: SIGKILL in the middle of the n-th checkpoint write of this run (of the STEPS - s left after A's stop at s).
  left = STEPS - (seen["A"]["steps"] or [0])[-1]
  run, nth, writes, was_writing = Run(command, str(root / "B.log")), min(rng.choice([1, 2]), max(left, 1)), 0, False
  while run.process.poll() is None:
    writing = any(TMP_MARK in name for name in entries(workdir))
    writes += writing and not was_writing
    was_writing = writing
    if writing and writes == nth:
      run.process.kill()
      seen["B"] = {"in_flight": [name for name in entries(workdir) if TMP_MARK in name]}
      break
    time.sleep(0.005)  # An asynchronous write takes seconds; a tighter loop would take CPU from the run it watches.
  seen["B"].update(returncode=run.finish(), log=run.text(), steps=complete_steps(workdir), all=entries(workdir))

  # C: SIGKILL at a random moment once it resumed.
  run = Run(command, str(root / "C.log"))
  run.wait_for(r"Resumed from step")
  time.sleep(rng.uniform(0.0, 2.0))
  run.process.kill()
  seen["C"] = {"returncode": run.finish(), "log": run.text(), "steps": complete_steps(workdir), "all": entries(workdir)}

  # Corrupt the newest complete checkpoint, then D runs to the end.
  newest = complete_steps(workdir)[-1]
  truncate_files(workdir, newest)
  run = Run(command, str(root / "D.log"))
  seen["D"] = {"returncode": run.finish(), "log": run.text(), "corrupted": newest}
  seen["workdir"] = workdir
  return seen


def test_sigterm_saves_the_step_and_exits_143(chain):
  a = chain["A"]
  assert a["returncode"] == preemption.PREEMPTED_EXIT_CODE == 143, a["log"][-4000:]
  stopped = int(re.search(r"Preempted at step (\d+) \(SIGTERM\)", a["log"]).group(1))
  assert 1 <= stopped < STEPS
  assert a["steps"][-1] == stopped  # The checkpoint of the stop step, none after it.


def test_sigkill_resumes_from_newest_complete_checkpoint(chain):
  b, c, d = chain["B"], chain["C"], chain["D"]
  assert b["returncode"] == -signal.SIGKILL and b["in_flight"], b["log"][-4000:]
  assert any(TMP_MARK in name for name in b["all"])  # B left a half-written step behind...
  resumed_c = int(re.search(r"Resumed from step (\d+)", c["log"]).group(1))
  assert resumed_c == b["steps"][-1]  # ...which C ignored: it resumed from the newest complete one.
  assert not any(TMP_MARK in name for name in c["all"] if name.split(".")[0] in {n.split(".")[0] for n in b["all"]})
  assert c["returncode"] in (-signal.SIGKILL, 0), c["log"][-4000:]
  assert d["returncode"] == 0, d["log"][-4000:]
  workdir = chain["workdir"]
  assert complete_steps(workdir)[-1] == STEPS
  for manager in (checkpoints_lib.LATEST_DIR, checkpoints_lib.BEST_DIR):
    assert not [name for name in entries(workdir, manager) if TMP_MARK in name], manager  # Cleaned up.


def test_corrupt_checkpoint_falls_back_to_the_previous_one(chain):
  d, corrupted = chain["D"], chain["D"]["corrupted"]
  assert re.search(rf"checkpoint of step {corrupted} in \S+ does not read back", d["log"]), d["log"][-4000:]
  resumed = int(re.search(r"Resumed from step (\d+)", d["log"]).group(1))
  assert resumed < corrupted
  assert os.path.isdir(os.path.join(chain["workdir"], f"{checkpoints_lib.CORRUPT_PREFIX}{corrupted}"))


def test_interrupted_chain_equals_uninterrupted_run_bitwise(chain, reference):
  """Every array of the step-STEPS checkpoints (params, Adam moments and counts, BatchNorm statistics, step, dropout
  key): CPU XLA is deterministic for a fixed program. The model uses dropout (tiny config: 0.1) and the learning rate
  drops ×0.1 at step 3, so the dropout key folding, the data position and the schedule all matter."""
  got, want = read_checkpoint(chain["workdir"], STEPS), read_checkpoint(reference, STEPS)
  assert got.keys() == want.keys() and len(want) > 100
  assert [key for key in want if not np.array_equal(got[key], want[key])] == []
  assert int(want["['step']"]) == STEPS
  # The training really moved the parameters (the comparison is not between two initial states).
  start = read_checkpoint(reference, 2)
  params = [key for key in start if key.startswith("['params']")]
  assert sum(not np.array_equal(start[key], got[key]) for key in params) > 0.9 * len(params)
  # The final evaluation scored the same state: the same numbers.
  for split in train_worker.TRAINED_SPLITS:
    ours, theirs = (fileio.read_json(os.path.join(w, f"eval_{split}.json")) for w in (chain["workdir"], reference))
    assert ours == theirs and ours["step"] == STEPS and ours["count"] > 0, split


def test_non_finite_loss_stops_with_the_step_and_last_good_checkpoint(trained_tiny_workdir, tmp_path):
  workdir = train_worker.copy_workdir(trained_tiny_workdir, str(tmp_path / "workdir"))
  # Its checkpoints come every 2 steps: step 5's (NaN) state is not due; step 6's loss is NaN.
  command = trained_tiny_workdir.command(
    workdir, f"--config.num_train_steps={STEPS + 2}", "--config.learning_rate=nan", "--config.profile_steps=0"
  )
  run = Run(command, str(tmp_path / "E.log"))
  assert run.finish() == 1
  error = run.text().strip().splitlines()[-1]
  assert error.startswith(f"error: NonFiniteError: the training loss is not finite at step {STEPS + 2}"), error
  assert f"the last good checkpoint is step {STEPS} in " in error
  assert complete_steps(workdir)[-1] == STEPS


# ------------------------------------------------------------------------------------------------------------
# In-process: the checkpoint layer alone, on small NumPy trees.


def _tree(size: int, value: float):
  """Random (incompressible: Orbax compresses) weights, except the first, `value`."""
  w = np.random.default_rng(size).standard_normal(size).astype(np.float32)
  w[0] = value
  return {"w": w, "step": np.asarray(3, np.int32)}


@contextlib.contextmanager
def small_disk(path):
  """A 1 MiB file system at `path`: a tmpfs mount (root), else a 1 MiB limit on the size of any file this process
  writes (RLIMIT_FSIZE: writes past it fail with EFBIG, SIGXFSZ ignored). Yields "full" or "too large", the
  words of the error each gives."""
  path.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True)
  if mounted.returncode == 0:
    try:
      yield "full"
    finally:
      subprocess.run(["umount", "-l", str(path)], check=False)
    return
  limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))
  try:
    yield "too large"
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, handler)


def test_full_disk_error_names_the_step_and_keeps_earlier_checkpoints(tmp_path):
  workdir = str(tmp_path / "small_disk" / "workdir")
  with small_disk(tmp_path / "small_disk") as words:
    checkpoints = checkpoints_lib.Checkpoints(workdir, keep=3)
    checkpoints.save_latest(1, _tree(1000, 1.0))
    checkpoints.wait()
    with pytest.raises(checkpoints_lib.CheckpointSaveError, match=rf"step 2 .*failed.*{words}.*steps \[1\]\) are"):
      checkpoints.save_latest(2, _tree(1_000_000, 2.0))  # 4 MB of random floats on a 1 MiB disk.
      checkpoints.wait()
    reread = checkpoints_lib.Checkpoints(workdir, keep=3)
    assert reread.latest_step() == 1
    np.testing.assert_array_equal(reread.restore_newest(_tree(1000, 0.0))["w"], _tree(1000, 1.0)["w"])


def test_restore_newest_skips_a_corrupt_step(tmp_path):
  workdir = str(tmp_path / "workdir")
  checkpoints = checkpoints_lib.Checkpoints(workdir, keep=3)
  for step in (1, 2):
    checkpoints.save_latest(step, _tree(100, float(step)))
  checkpoints.wait()
  truncate_files(workdir, 2)
  restored = checkpoints_lib.Checkpoints(workdir, keep=3).restore_newest(_tree(100, 0.0))
  np.testing.assert_array_equal(restored["w"], _tree(100, 1.0)["w"])
  assert os.path.isdir(os.path.join(workdir, f"{checkpoints_lib.CORRUPT_PREFIX}2", "default"))
  # With no readable step left, the error names each one.
  truncate_files(workdir, 1)
  with pytest.raises(ValueError, match=r"no checkpoint in .* reads back: step 1: "):
    checkpoints_lib.Checkpoints(workdir, keep=3).restore_newest(_tree(100, 0.0))
