"""A fresh interpreter for the training-loop tests (tests/test_train.py, tests/test_distributed.py).

JAX fixes its devices when its backend starts, so a run on 8 simulated CPU devices or as one of two processes
needs its own interpreter; this script is that interpreter. It also holds the helpers both test files share.

  python tests/train_worker.py train --tfrecord_dir=D --workdir=W --out=O [--distributed=true] [--dump_steps=1,2]
      main.py's `main` with `make_config`'s settings as flags (and --config.distributed); the one substitution:
      `train.train_and_evaluate` trains on explicit global batches (the first `--steps` batches of the
      single-process training stream), every process feeding only the rows its devices hold; evaluation reads the
      real per-process evaluation pipeline. Run the processes of a multi-process run with `slurm_env`. Writes
      O/result.json (devices, process, which rows were fed; the last evaluation, or "preempted_at" when the run
      stopped on SIGTERM with status 143), and when it finished O/state.npz (final state) and O/state_<n>.npz (the
      checkpoints of --dump_steps).

Shared by the test files (no JAX import at module level): `main_command` (the `python main.py` command line of
every test that runs the entry point), `LoggedProcess` (a subprocess whose output goes to a log file, to wait for
log lines and kill it), the tiny dataset and the one trained tiny workdir that tests/conftest.py builds once per
test run (`build_once`, `build_trained_workdir`; see conftest's docstring).
"""

import argparse
import dataclasses
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA:CPU flags that compile the tiny model faster; the tests run a few steps, so the slower kernels do not matter.
# Back-end optimisation level 0: init 20 s instead of 70 s on 2 cores (the tiny model's init + forward + gradient
# in one process: 65 instead of 95 CPU seconds). The older elemental emitters for fusions instead of the MLIR fusion
# emitters: the tiny train step compiles in 8-10 s instead of 19-22 s, its evaluation step in 1 s instead of 3 s (the
# same losses; a step runs as fast). tests/conftest.py sets them for the test process too: every process of the tests
# compiles with the same flags, so they share persistent-cache entries and compute the same bits.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
TIMEOUT_S = 900  # Any one subprocess of the tests.


def make_config(tfrecord_dir: str, steps: int):
  """configs/tiny.py on the converted synthetic data: `steps` steps, one evaluation at the end, every step
  logged and checkpointed. The learning rate decays ×0.1 at epoch 0.6 (step 3 with 43 refs / batch 8)."""
  from configs import tiny  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()
  config.data.tfrecord_dir = tfrecord_dir
  config.data.eval_canvas = 160  # Synthetic images are at most 160 px a side.
  config.data.eval_splits = ("val",)
  config.data.shuffle_buffer = 16
  config.num_train_steps = steps
  config.eval_every_steps = steps
  config.checkpoint_every_steps = 1
  config.keep_checkpoints = max(steps, 1)
  config.log_every_steps = 1
  config.learning_rate = 1e-3
  config.lr_decay_epochs = (0.6,)
  return config


# The synthetic refer data of the tiny dataset (`make_dataset`); tests/test_distributed.py generates the same into a
# bucket and checks that the converter writes the same shards there.
TINY_SYNTHETIC = {"seed": 0, "num_train_images": 12, "num_eval_images": 4}


def make_dataset(root: str):
  """Synthetic refer data (12 training images, 4 per evaluation split) converted by the real converter.

  Returns (shard dir, converter summary): 43 training refs, val 32 (ref, sentence) pairs.
  """
  from input_pipeline import convert  # pylint: disable=g-import-not-at-top
  from input_pipeline import synthetic  # pylint: disable=g-import-not-at-top

  raw, shards = os.path.join(root, "raw"), os.path.join(root, "shards")
  synthetic.generate(raw, **TINY_SYNTHETIC)
  summary = convert.convert(raw, os.path.join(raw, "images"), "refcoco", "unc", shards, num_workers=1)
  return shards, summary


def main_command(workdir: str, tfrecord_dir: str, *args: str) -> List[str]:
  """`python main.py` with configs/tiny.py on the synthetic shards (canvas 160: synthetic images are at most 160 px
  a side; a 16-example shuffle buffer), then `args`. Run it with `run_checked` (from the repo root).

  Without the showcase after training (overlays.png, examples/: tests/test_demo.py tests it in-process); a test
  that wants it passes --showcase=true in `args`."""
  return [
    sys.executable,
    "main.py",
    "--config=configs/tiny.py",
    f"--workdir={workdir}",
    "--showcase=false",
    f"--config.data.tfrecord_dir={tfrecord_dir}",
    "--config.data.eval_canvas=160",
    "--config.data.shuffle_buffer=16",
    *args,
  ]


# The shared trained run (tests/conftest.py `trained_tiny_workdir`): TRAINED_STEPS steps of main.py with these
# flags. tests/test_train.py resumes a copy with the same flags (its bitwise comparison needs the same program).
TRAINED_STEPS = 4
TRAINED_SPLITS = ("val", "testA")
TRAINED_LEARNING_RATE = 1e-3
TRAINED_FLAGS = (
  f"--config.data.eval_splits={TRAINED_SPLITS!r}",
  "--config.eval_every_steps=2",
  "--config.checkpoint_every_steps=2",
  "--config.keep_checkpoints=3",
  "--config.log_every_steps=1",
  f"--config.learning_rate={TRAINED_LEARNING_RATE}",
  # ×0.1 at epoch 0.6: step 3 with 43 refs / batch 8, between the two halves of a run resumed at step 2.
  "--config.lr_decay_epochs=(0.6,)",
  "--config.eval_shuffled_control=true",
  "--config.profile_steps=1",
  "--config.model.freeze_backbone_bn=true",
)


@dataclasses.dataclass(frozen=True)
class TinyDataset:
  """`make_dataset`'s output: the shard directory and the converter's summary."""

  tfrecord_dir: str
  summary: Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """The shared trained workdir (read-only for tests: copy it with `copy_workdir` to write)."""

  workdir: str
  dataset: TinyDataset
  stdout: str  # main.py's output (absl log and the final table).
  steps: int = TRAINED_STEPS
  flags: Tuple[str, ...] = TRAINED_FLAGS

  def command(self, workdir: str, *args: str) -> List[str]:
    """main.py on `workdir` with this run's configuration (the step count first: `args` may override it)."""
    return main_command(
      workdir, self.dataset.tfrecord_dir, *self.flags, f"--config.num_train_steps={self.steps}", *args
    )


def build_once(directory: str, build: Callable[[str], Dict[str, Any]], timeout: float = 1800) -> Dict[str, Any]:
  """Builds `directory` once for every process that asks (pytest-xdist workers), under a file lock.

  `build(directory)` fills the directory and returns JSON metadata, written to `directory`.json when it is done:
  a process that waited on the lock finds that file and reuses the directory. A failed build is recorded and
  re-raised to later callers at once (instead of every worker repeating it). Returns the metadata.
  """
  import filelock  # pylint: disable=g-import-not-at-top

  done, failed = directory + ".json", directory + ".failed"
  with filelock.FileLock(directory + ".lock", timeout=timeout):
    if os.path.exists(failed):
      with open(failed) as f:
        raise AssertionError(f"building {directory} failed in another test process:\n{f.read()}")
    if not os.path.exists(done):
      shutil.rmtree(directory, ignore_errors=True)  # A build interrupted before it finished.
      try:
        metadata = build(directory)
      except BaseException as e:
        with open(failed, "w") as f:
          f.write(f"{type(e).__name__}: {e}"[-8000:])
        raise
      with open(done, "w") as f:
        json.dump(metadata, f)
  with open(done) as f:
    return json.load(f)


def build_dataset(root: str) -> TinyDataset:
  """`make_dataset` into `root`/tiny_data, once per `root` (see `build_once`)."""

  def build(directory: str) -> Dict[str, Any]:
    _, summary = make_dataset(directory)
    return {"summary": summary}

  directory = os.path.join(root, "tiny_data")
  metadata = build_once(directory, build)
  return TinyDataset(os.path.join(directory, "shards"), metadata["summary"])


def build_trained_workdir(root: str, dataset: TinyDataset) -> TrainedRun:
  """main.py for TRAINED_STEPS steps with TRAINED_FLAGS into `root`/trained_tiny, once per `root`."""
  directory = os.path.join(root, "trained_tiny")
  log_path = directory + ".log"

  def build(directory: str) -> Dict[str, Any]:
    run_checked(TrainedRun(directory, dataset, "").command(directory), log_path, TIMEOUT_S)
    return {}

  build_once(directory, build)
  with open(log_path) as f:
    return TrainedRun(directory, dataset, f.read())


def copy_workdir(run: TrainedRun, destination: str) -> str:
  """A writable copy of the shared trained workdir at `destination` (which must not exist); returns it."""
  shutil.copytree(run.workdir, destination)
  return destination


def tree_listing(directory: str) -> Dict[str, Tuple[int, int]]:
  """{relative path: (size, mtime_ns)} of every file under `directory`: taken twice, it shows writes."""
  listing = {}
  for parent, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(parent, name)
      stat = os.stat(path)
      listing[os.path.relpath(path, directory)] = (stat.st_size, stat.st_mtime_ns)
  return listing


def xla_flags(flags: str, num_devices: int = 1) -> str:
  """`flags` (an XLA_FLAGS value) with FAST_COMPILE_FLAGS, and `num_devices` simulated host devices when > 1."""
  kept = [flag for flag in flags.split() if not flag.startswith(DEVICE_COUNT_FLAG)]
  kept += [flag for flag in FAST_COMPILE_FLAGS if flag not in kept]
  if num_devices > 1:
    kept.append(f"{DEVICE_COUNT_FLAG}={num_devices}")
  return " ".join(kept)


def subprocess_env(num_devices: int = 1) -> Dict[str, str]:
  """The environment of a worker: CPU only, `num_devices` host devices, the test process's XLA flags (fast
  compiles), TF quiet."""
  env = dict(os.environ)
  env.update(
    {
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": xla_flags(os.environ.get("XLA_FLAGS", ""), num_devices),
      "TF_CPP_MIN_LOG_LEVEL": "3",
      "CUDA_VISIBLE_DEVICES": "",
      "PYTHONUNBUFFERED": "1",
    }
  )
  return env


def worker_command(mode: str, **flags: Any) -> List[str]:
  return [sys.executable, os.path.abspath(__file__), mode] + [f"--{k}={v}" for k, v in flags.items()]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class LoggedProcess:
  """A subprocess (from the repository root) whose output goes to `log_path`: wait for log lines, then for its exit.

  `timeout` bounds each wait (`wait_for`, `finish`) unless the call gives its own; env defaults to `subprocess_env()`.
  """

  def __init__(self, command: Sequence[str], log_path: str, env: Optional[Mapping[str, str]] = None, *,
               timeout: float = TIMEOUT_S):  # fmt: skip
    self.command, self.log_path, self.timeout = command, log_path, timeout
    with open(log_path, "w") as log:
      self.process = subprocess.Popen(
        command, cwd=REPO, env=env or subprocess_env(), stdout=log, stderr=subprocess.STDOUT
      )

  def text(self) -> str:
    with open(self.log_path) as f:
      return f.read()

  def wait_for(self, pattern: str, timeout: Optional[float] = None, poll: float = 0.05) -> re.Match:
    """Polls the log for `pattern`; fails if the process ends first or the time runs out."""
    timeout = self.timeout if timeout is None else timeout
    deadline = time.time() + timeout
    while time.time() < deadline:
      match = re.search(pattern, self.text())
      if match:
        return match
      if self.process.poll() is not None:
        raise AssertionError(f"exited ({self.process.returncode}) before {pattern!r}:\n{self.text()[-4000:]}")
      time.sleep(poll)
    raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.text()[-4000:]}")

  def finish(self, timeout: Optional[float] = None) -> int:
    """The exit status; a process still running after the timeout is killed (and the wait fails)."""
    try:
      return self.process.wait(timeout=self.timeout if timeout is None else timeout)
    finally:
      if self.process.poll() is None:
        self.process.kill()
        self.process.wait()


def run_checked(command: Sequence[str], log_path: str, timeout: float, env: Optional[Mapping[str, str]] = None):
  """Runs `command` from the repo root with its output in `log_path`; fails with the log's tail."""
  with open(log_path, "w") as log:
    process = subprocess.run(
      command, cwd=REPO, env=env or subprocess_env(), stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False
    )
  check_exit(process.returncode, command, log_path)


def check_exit(returncode: int, command: Sequence[str], log_path: str):
  if returncode:
    with open(log_path) as f:
      tail = f.read()[-6000:]
    raise AssertionError(f"{' '.join(command)} exited with {returncode}; log tail:\n{tail}")


def read_summaries(workdir: str) -> List[Tuple[int, Any]]:
  """(step, `Summary.Value` proto) of every summary in `workdir`'s TensorBoard events files (TensorFlow)."""
  from input_pipeline import import_tensorflow  # pylint: disable=g-import-not-at-top

  tf = import_tensorflow()
  values = []
  for name in sorted(tf.io.gfile.listdir(workdir)):  # Local or gs://.
    if name.startswith("events.out.tfevents"):
      for event in tf.compat.v1.train.summary_iterator(f"{workdir.rstrip('/')}/{name}"):
        values.extend((int(event.step), value) for value in event.summary.value)
  return values


def read_scalars(workdir: str) -> Dict[str, Dict[int, float]]:
  """{tag: {step: value}} of every scalar summary in `workdir` (TensorFlow; tests only)."""
  from input_pipeline import import_tensorflow  # pylint: disable=g-import-not-at-top

  tf = import_tensorflow()
  scalars: Dict[str, Dict[int, float]] = {}
  for step, value in read_summaries(workdir):
    if value.HasField("simple_value"):
      number = value.simple_value
    elif value.HasField("tensor") and not value.tensor.string_val:
      number = tf.make_ndarray(value.tensor)
      if number.size != 1:
        continue
      number = float(number.reshape(()))
    else:
      continue
    scalars.setdefault(value.tag, {})[step] = float(number)
  return scalars


def checkpoint_steps(workdir: str, manager: str) -> List[int]:
  """The steps of the Orbax checkpoints in `workdir`/`manager` ("checkpoints" or "best"); local or gs://."""
  from fcnet_jax import fileio  # pylint: disable=g-import-not-at-top

  return sorted(int(path.name) for path in fileio.as_path(workdir, manager).iterdir() if path.name.isdigit())


def load_npz(path: str) -> Dict[str, Any]:
  import numpy as np  # pylint: disable=g-import-not-at-top

  with np.load(path) as data:
    return dict(data)


# --------------------------------------------------------------------------------------------------------------
# Inside the worker (imports JAX).


def flat_state(state) -> Dict[str, Any]:
  """Every array of a TrainState as host NumPy, keyed by its pytree path ("params['neck'][…]['kernel']").

  Replicated arrays may span processes; each process reads its own copy (`addressable_data(0)`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  tree = {
    "params": state.params,
    "batch_stats": state.batch_stats,
    "opt_state": state.opt_state,
    "step": state.step,
    "dropout_key": jax.random.key_data(state.dropout_rng),
  }
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    value = leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf
    out[jax.tree_util.keystr(path)] = np.asarray(value)
  return out


def _global_batches(config, start_step: int) -> Iterator[Dict[str, Any]]:
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top

  return pipeline.train_iterator(
    config.data.tfrecord_dir,
    config.data.train_split,
    image_size=config.model.image_size,
    context_length=config.model.context_length,
    batch_size=config.batch_size,
    seed=config.seed,
    process_index=0,
    process_count=1,
    shuffle_buffer=config.data.shuffle_buffer,
    start_step=start_step,
  )


def _own_rows(mesh, global_size: int) -> slice:
  """The contiguous rows of a global batch that this process's devices hold under `batch_sharding`."""
  import jax  # pylint: disable=g-import-not-at-top

  from fcnet_jax import sharding  # pylint: disable=g-import-not-at-top

  index_map = sharding.batch_sharding(mesh).devices_indices_map((global_size,))
  starts = sorted(
    index[0].start or 0 for device, index in index_map.items() if device.process_index == jax.process_index()
  )
  per_device = global_size // len(index_map)
  first, last = starts[0], starts[-1] + per_device
  assert starts == list(range(first, last, per_device)), f"rows of this process are not contiguous: {starts}"
  return slice(first, last)


def _write_json(path: str, payload: Mapping[str, Any]):
  from fcnet_jax import fileio  # pylint: disable=g-import-not-at-top

  fileio.write_json(path, payload)


def config_overrides(steps: int) -> List[str]:
  """`make_config`'s changes to configs/tiny.py as main.py flags (on top of `main_command`'s)."""
  return [
    "--config.data.eval_splits=('val',)",
    f"--config.num_train_steps={steps}",
    f"--config.eval_every_steps={steps}",
    "--config.checkpoint_every_steps=1",
    f"--config.keep_checkpoints={max(steps, 1)}",
    "--config.log_every_steps=1",
    "--config.learning_rate=1e-3",
    "--config.lr_decay_epochs=(0.6,)",
  ]


def slurm_env(process_id: int, num_processes: int, port: int, num_devices: int = 1) -> Dict[str, str]:
  """`subprocess_env(num_devices)` as process `process_id` of a SLURM job step of `num_processes` tasks on this
  machine: what `jax.distributed.initialize()` (main.py with --config.distributed=True) detects by itself. The
  coordinator address is given because SLURM's default port is derived from the job id."""
  env = subprocess_env(num_devices)
  env.update(
    SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(num_processes),
    SLURM_PROCID=str(process_id), SLURM_LOCALID=str(process_id), SLURM_STEP_NUM_NODES="1",
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
  )  # fmt: skip
  return env


def _train(args, expected_config) -> None:
  """main.py's `main` (flags, `jax.distributed.initialize()` with --distributed, the loop, exit status 143 when
  preempted) with one substitution: `train.train_and_evaluate` gets the explicit global batches. main.py's flags
  must give `expected_config` (`make_config`)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from fcnet_jax import checkpoints as checkpoints_lib  # pylint: disable=g-import-not-at-top
  from fcnet_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from fcnet_jax import preemption  # pylint: disable=g-import-not-at-top
  from fcnet_jax import sharding  # pylint: disable=g-import-not-at-top
  from fcnet_jax import train  # pylint: disable=g-import-not-at-top
  import main as main_py  # pylint: disable=g-import-not-at-top

  train_and_evaluate = train.train_and_evaluate

  def with_explicit_batches(config, workdir, data=None):
    assert data is None and workdir == args.workdir
    expected_config.distributed = args.distributed == "true"
    assert config.to_dict() == expected_config.to_dict(), "main.py's flags do not give make_config's configuration"
    rows, fed = _own_rows(sharding.create_mesh(), config.batch_size), []

    def train_iter_fn(start_step: int):
      # Read up front: no tf.data pipeline left running beside the training (closing one took up to a minute).
      batches = list(itertools.islice(_global_batches(config, start_step), config.num_train_steps - start_step))
      for batch in batches:
        fed.append(batch["ref_id"][rows].tolist())
        yield {name: value[rows] for name, value in batch.items()}

    result = {
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "rows": [rows.start, rows.stop],
      "fed_ref_ids": fed,
    }
    try:
      state, eval_metrics = train_and_evaluate(
        config, workdir, data_lib.DataSource(config, train_iter_fn=train_iter_fn)
      )
    except preemption.Preempted as e:
      _write_json(os.path.join(args.out, "result.json"), {**result, "preempted_at": e.step})
      raise
    logging.info("worker: train_and_evaluate returned")
    np.savez(os.path.join(args.out, "state.npz"), **flat_state(state))
    checkpoints = checkpoints_lib.Checkpoints(workdir, read_only=True)
    for step in [int(s) for s in args.dump_steps.split(",") if s]:
      np.savez(os.path.join(args.out, f"state_{step}.npz"), **flat_state(checkpoints.restore(state, step)))
    checkpoints.close()
    _write_json(os.path.join(args.out, "result.json"), {**result, "eval": eval_metrics})
    return state, eval_metrics

  train.train_and_evaluate = with_explicit_batches
  # Orbax's replica-parallel saving (its default) splits every replicated array among the devices holding a copy,
  # slicing it with one small compiled program per array shape: on CPU devices that made a process's first save of
  # the tiny state 12 s instead of 3 s (4 devices), ~40 s in the two-process runs on 2 cores. The workers write each
  # array from its first copy instead, as Orbax does without the option; what a checkpoint holds is the same.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
  ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  flags = main_command(args.workdir, args.tfrecord_dir, *config_overrides(args.steps))[2:]
  sys.argv = ["main.py", *flags, f"--config.distributed={args.distributed == 'true'}"]
  main_py.run()


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["train"])
  parser.add_argument("--tfrecord_dir", required=True)
  parser.add_argument("--workdir", default="")
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--dump_steps", default="")
  parser.add_argument("--distributed", choices=["true", "false"], default="false", help="train: main.py's flag")
  args = parser.parse_args(argv)
  sys.path.insert(0, REPO)
  import faulthandler  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top

  faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every thread's stack to the log.
  from absl import logging  # pylint: disable=g-import-not-at-top

  logging.use_absl_handler()  # The loop's INFO logs (steps, evaluations) go to the worker's log file.
  logging.set_verbosity(logging.INFO)
  os.makedirs(args.out, exist_ok=True)
  config = make_config(args.tfrecord_dir, args.steps)
  _train(args, config)


if __name__ == "__main__":
  main()
