"""gs:// on every user path, against a local GCS emulator that every client reaches (tests/gcs_emulator.py).

The module fixture starts the emulator (in memory, 127.0.0.1) with its TLS proxy and points all three clients at it
as users run them: TensorFlow's GCS client (tf.io.gfile: TFRecords, TensorBoard events, and etils.epath, which uses
tf.io.gfile because TensorFlow is installed) through `HTTPS_PROXY` + `CURL_CA_BUNDLE`, tensorstore (Orbax's array
data) through `TENSORSTORE_GCS_HTTP_URL`. Every test asserts that its requests did reach the emulator.

* tf.io.gfile: write, ranged read, stat, listdir, glob, rename, delete, makedirs, exists; a TFRecord file written
  and read by tf.data; TensorBoard events written by tf.summary and read back.
* The JSON writes (atomic), the saved config, and the latest-K checkpoint manager (keep, resume from the newest
  complete step, a half-written step ignored and removed, a corrupt one set aside) on small trees.
* The compilation cache in <workdir>/xla_cache: one process writes it, the next reads it and compiles nothing.
* End to end (tests/test_distributed.py, with its own emulator): the converter reading refer data in the bucket and
  writing its shards there; two main.py processes training from them with the workdir in the bucket, SIGTERMed,
  resumed and evaluated; then evaluation, `pretrained.load`, `Predictor.from_checkpoint`, `config.init_from` and the
  showcase on that workdir.

Local only (tested elsewhere): exports, the converter's multi-process writing, and the killed-mid-write cases of
tests/test_preemption.py.
"""

import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

import gcs_emulator  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_worker  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

TIMEOUT_S = 600


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  with gcs_emulator.running(str(tmp_path_factory.mktemp("gcs"))) as emulator:
    yield emulator


def test_tensorflow_gfile_tfrecords_and_summaries(gcs):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  root = f"{gcs.bucket}/tf"
  tf.io.gfile.makedirs(f"{root}/sub")
  with tf.io.gfile.GFile(f"{root}/a.txt", "w") as f:
    f.write("hello world")
  with tf.io.gfile.GFile(f"{root}/a.txt", "rb") as f:
    f.seek(6)
    assert f.read(3) == b"wor"
  assert tf.io.gfile.stat(f"{root}/a.txt").length == 11
  assert tf.io.gfile.isdir(f"{root}/sub") and not tf.io.gfile.isdir(f"{root}/a.txt")
  assert sorted(tf.io.gfile.listdir(root)) == ["a.txt", "sub/"]
  assert tf.io.gfile.glob(f"{root}/*.txt") == [f"{root}/a.txt"]
  tf.io.gfile.rename(f"{root}/a.txt", f"{root}/b.txt")
  assert not tf.io.gfile.exists(f"{root}/a.txt")
  tf.io.gfile.remove(f"{root}/b.txt")
  assert tf.io.gfile.listdir(root) == ["sub/"]

  records = [bytes([i]) * (1000 + i) for i in range(50)]
  with tf.io.TFRecordWriter(f"{root}/r.tfrecord") as writer:
    for record in records:
      writer.write(record)
  assert [r.numpy() for r in tf.data.TFRecordDataset(f"{root}/r.tfrecord")] == records

  writer = tf.summary.create_file_writer(f"{root}/events")
  with writer.as_default():
    for step in range(3):
      tf.summary.scalar("loss", 1.0 / (step + 1), step=step)
  writer.close()
  (events,) = tf.io.gfile.glob(f"{root}/events/events.out.tfevents.*")
  values = [
    (event.step, float(tf.make_ndarray(value.tensor)))
    for event in tf.compat.v1.train.summary_iterator(events)
    for value in event.summary.value
  ]
  assert values == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
  gcs.reached(r"^GET storage\.googleapis\.com /fcnet-test/tf%2Fr\.tfrecord -> 20[06]")
  gcs.reached(r"^POST www\.googleapis\.com /storage/v1/b/fcnet-test/o/tf%2Fa\.txt/rewriteTo/")


def _tree(value: float):
  return {"w": np.arange(10, dtype=np.float32) + value, "step": np.asarray(int(value), np.int32)}


def test_json_and_config_round_trip(gcs):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from fcnet_jax import fileio  # pylint: disable=g-import-not-at-top
  from fcnet_jax import run_config  # pylint: disable=g-import-not-at-top

  bucket = gcs.bucket
  fileio.write_json(f"{bucket}/json/eval_val.json", {"mIoU": 0.5})
  assert fileio.read_json(f"{bucket}/json/eval_val.json") == {"mIoU": 0.5}
  assert [p.name for p in fileio.as_path(f"{bucket}/json").iterdir()] == ["eval_val.json"]  # No temporary left.
  config = tiny.get_config()
  run_config.save(config, f"{bucket}/config_run")
  assert run_config.exists(f"{bucket}/config_run")
  assert run_config.differences(run_config.load(f"{bucket}/config_run"), config) == []
  gcs.reached(r"^GET storage\.googleapis\.com /fcnet-test/json%2Feval_val\.json")


def test_checkpoints_keep_resume_clean_up_and_fall_back(gcs):
  from fcnet_jax import checkpoints as checkpoints_lib  # pylint: disable=g-import-not-at-top
  from fcnet_jax import fileio  # pylint: disable=g-import-not-at-top

  workdir = f"{gcs.bucket}/ckpt_run"
  checkpoints = checkpoints_lib.Checkpoints(workdir, keep=2)
  for step in (1, 2, 3):
    checkpoints.save_latest(step, _tree(step))
  checkpoints.wait()
  assert checkpoints.steps()["checkpoints"] == [2, 3]
  latest = fileio.as_path(workdir) / checkpoints_lib.LATEST_DIR
  # On gs:// (no atomic rename) Orbax writes a step under its final name and marks it complete last.
  assert sorted(p.name for p in (latest / "3").iterdir()) == ["_CHECKPOINT_METADATA", "commit_success.txt", "default"]
  # A step killed mid-write is never listed, and the next writer removes it: on gs:// one without its
  # commit_success.txt, and (as a local disk leaves it) a temporary directory.
  for half_written in ("4", "5.orbax-checkpoint-tmp"):
    (latest / half_written / "default").mkdir(parents=True)
    (latest / half_written / "default" / "_METADATA").write_text("{")
  reopened = checkpoints_lib.Checkpoints(workdir, keep=2)
  assert reopened.latest_step() == 3
  assert sorted(p.name for p in latest.iterdir()) == ["2", "3"]
  np.testing.assert_array_equal(reopened.restore_newest(_tree(0))["w"], _tree(3)["w"])
  # A corrupt newest step: set aside, the one before is restored.
  (latest / "3" / "default" / "_METADATA").write_text("{")
  (latest / "3" / "_CHECKPOINT_METADATA").write_text("{")
  restored = checkpoints_lib.Checkpoints(workdir, keep=2).restore_newest(_tree(0))
  np.testing.assert_array_equal(restored["w"], _tree(2)["w"])
  assert (fileio.as_path(workdir) / f"{checkpoints_lib.CORRUPT_PREFIX}3" / "default").is_dir()


_COMPILE = """
import sys
import jax, jax.numpy as jnp, ml_collections
from fcnet_jax import compile_cache
print("cache", compile_cache.enable(ml_collections.ConfigDict({"compile_cache_dir": ""}), sys.argv[1]))
print("value", float(jax.jit(lambda x: jnp.sin(x) @ x.T + 1)(jnp.ones((64, 64))).sum()))
"""


def test_compile_cache_in_a_gs_workdir(gcs, tmp_path):
  """config.compile_cache_dir's default, <workdir>/xla_cache, on gs://: the second process only reads entries."""
  env = train_worker.subprocess_env()
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # The test suite's shared cache would win over the workdir's.
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  workdir = f"{gcs.bucket}/cc_run"
  uploads = []
  for run in range(2):
    before = len(gcs.requests())
    train_worker.run_checked(
      [sys.executable, "-c", _COMPILE, workdir], str(tmp_path / f"{run}.log"), TIMEOUT_S, env=env
    )
    with open(tmp_path / f"{run}.log") as f:
      assert f"cache {workdir}/xla_cache" in f.read()
    new = gcs.requests()[before:]
    uploads.append([r for r in new if r.startswith("POST") and "xla_cache" in r and "uploadType=resumable" in r])
    reads = [
      r for r in new if re.match(r"GET storage\.googleapis\.com /fcnet-test/cc_run%2Fxla_cache%2Fjit__lambda", r)
    ]
  assert uploads[0] and not uploads[1], uploads
  assert reads, "the second process did not read the cache entry of its jitted function"
