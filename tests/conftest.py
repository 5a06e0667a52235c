"""Shared pytest set-up: run from any directory, keep TensorFlow quiet and off the GPU, reuse XLA compilations, and
train the tiny model once per test run for every test that needs a trained workdir.

The tests are dominated by XLA compile time on a 2-core CI machine. Many tests compile the same computation (the
tiny model's init, forward and gradient) through different Python callables; the persistent compilation cache
turns every repeat into a cache hit, within a run and across pytest-xdist workers and subprocesses.

Session fixtures (built once per `pytest` run, shared by its pytest-xdist workers through a file lock in the run's
base temporary directory; see tests/train_worker.py `build_once`):

  tiny_dataset -> train_worker.TinyDataset
      The synthetic refer data converted by the real converter (`train_worker.make_dataset`): `.tfrecord_dir`
      (shards: train 43 refs, val 32 (ref, sentence) pairs, testA, testB) and `.summary` (the converter's
      summary.json as a dict). Read-only.

  trained_tiny_workdir -> train_worker.TrainedRun
      `python main.py --config=configs/tiny.py` on tiny_dataset for 4 steps (`train_worker.TRAINED_FLAGS`:
      evaluation splits val and testA every 2 steps, checkpoints every 2, lr 1e-3 ×0.1 from step 3, the
      shuffled-sentence control at the final evaluation, one profiled step, frozen backbone BatchNorm). `.workdir`
      holds checkpoints/2, checkpoints/4, best/<the better of 2 and 4 by val mIoU>, eval_<split>.json and
      eval_<split>_shuffled_sentences.json of step 4 for both splits, TensorBoard events and a profiler trace.
      `.stdout` is main.py's output, `.dataset` the tiny_dataset, `.command(workdir, *flags)` main.py's command
      line with the same configuration (run it with `train_worker.run_checked`).
      The workdir is shared: never write to it (`--mode=eval` writes eval_*.json into its workdir). Copy it first:
      `train_worker.copy_workdir(run, str(tmp_path / "w"))`. A test that writes to it anyway fails this fixture's
      teardown, which compares the files before and after.
"""

import os
import sys
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fcnet_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The "rbg" PRNG compiles the model's ~700 parameter initialisers about 4× faster than threefry on the CPU (a jitted
# tiny-FCNet init: 13 s vs 50 s); the tests compare against references, never against particular random draws.
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_worker  # pylint: disable=g-import-not-at-top,wrong-import-position

# Byte-compiled modules are kept (__pycache__) even where the environment says not to (PYTHONDONTWRITEBYTECODE, set
# on some CI images): the tests start dozens of Python processes (main.py, converters, workers), each importing JAX,
# TensorFlow, Flax and Orbax; compiling their sources anew costs each ~15 CPU-seconds on the CI machine.
# .ci/run installs with `pip --no-compile`, so the first import of a module writes its .pyc for the rest.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

# Before anything starts jax's backend: the workers' fast-compiling XLA flags (train_worker.FAST_COMPILE_FLAGS) in
# this process too, so that in-process compilations are cheaper and share cache entries with the workers.
os.environ["XLA_FLAGS"] = train_worker.xla_flags(os.environ.get("XLA_FLAGS", ""))


# Test files by their time in the last full run on the 2-core machine, heaviest first: the ones whose
# module fixtures run main.py or other workers for minutes (two-process training, the preemption chain, which also
# builds the shared trained workdir), then the ones that compile model variants or start CLI processes. With
# `pytest -n 2 --dist loadfile --no-loadscope-reorder` (.ci/run) pytest-xdist hands out files in collection order;
# starting the longest ones first lets both workers finish together (its default order, by number of tests, put
# these few-test files last). Files not listed keep their order, after these.
HEAVY_FILES_FIRST = (
  "test_distributed.py",
  "test_preemption.py",
  "test_export.py",
  "test_eval_paths.py",
  "test_init_from.py",
  "test_benchmark.py",
  "test_models.py",
  "test_convert.py",
  "test_gcs.py",
  "test_swin.py",
  "test_pipeline.py",
  "test_demo.py",
  "test_metrics.py",
  "test_predict.py",
  "test_convert_kill.py",
)


def pytest_collection_modifyitems(items):
  """Orders the collected tests: HEAVY_FILES_FIRST's files first, in that order; the rest as collected."""
  rank = {name: i for i, name in enumerate(HEAVY_FILES_FIRST)}
  order = {id(item): i for i, item in enumerate(items)}
  items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), order[id(item)]))


def _shared_root(tmp_path_factory) -> str:
  """The directory every process of this pytest run sees: the base temporary directory, or with pytest-xdist its
  parent (each worker's base is a child of it)."""
  base = tmp_path_factory.getbasetemp()
  return str(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> train_worker.TinyDataset:
  return train_worker.build_dataset(_shared_root(tmp_path_factory))


@pytest.fixture(scope="session")
def trained_tiny_workdir(tmp_path_factory, tiny_dataset):
  run = train_worker.build_trained_workdir(_shared_root(tmp_path_factory), tiny_dataset)
  before = train_worker.tree_listing(run.workdir)
  yield run
  changed = sorted(set(before.items()) ^ set(train_worker.tree_listing(run.workdir).items()))
  assert not changed, f"a test wrote to the shared trained workdir {run.workdir} (copy it first): {changed[:10]}"
