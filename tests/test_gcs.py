"""gs:// paths against a local GCS emulator (fcnet_jax/checkpoints.py, fileio.py, run_config.py, pretrained.py).

A `gcp-storage-emulator` server (GCS JSON API, in memory, 127.0.0.1 only) is started by the module fixture and
stopped after it. Each client is pointed at it through its own endpoint setting (docs/cluster.md):

* etils.epath (fileio, run_config, Orbax's metadata and step directories): `EPATH_USE_TF=false` routes gs:// to
  fsspec/gcsfs, which honours `STORAGE_EMULATOR_HOST`. (With TensorFlow installed, epath would use tf.io.gfile,
  whose GCS client has no endpoint setting.)
* tensorstore (Orbax's array data): `TENSORSTORE_GCS_HTTP_URL`, with `GOOGLE_AUTH_TOKEN_FOR_TESTING` for auth.

Exercised here on gs://: the JSON writes (atomic), the saved config, the latest-K checkpoint manager (keep,
resume from the newest complete step, a half-written step ignored and removed, a corrupt one set aside) on small
trees. Not here: TFRecords and TensorBoard events (TensorFlow's GCS client has no endpoint setting), and a whole
FCNet train state: with ~700 arrays, tensorstore's OCDBT writer fails against this emulator ("Malformed
StorageGeneration" reading its manifest back), an emulator limitation that real GCS does not have.
"""

import os
import subprocess
import sys
import time
import urllib.request

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

import train_worker  # pylint: disable=g-import-not-at-top,wrong-import-position

BUCKET = "fcnet-test"


def emulator_env(url: str):
  """The environment variables that point epath/gcsfs and tensorstore at the emulator at `url`."""
  return {
    "EPATH_USE_TF": "false",
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
  }


@pytest.fixture(scope="module")
def copy_delete_renames():
  """gcsfs renames through GCS's moveTo API, which the emulator lacks (HTTP 501): gcsfs then retries for ~30 s
  before falling back to copy + delete. Go straight to copy + delete (what it ends up doing) while the module runs."""
  from fsspec import asyn  # pylint: disable=g-import-not-at-top
  import gcsfs  # pylint: disable=g-import-not-at-top

  async def copy_delete(self, path1, path2, **kwargs):
    return await asyn.AsyncFileSystem._mv_file(self, path1, path2, **kwargs)  # pylint: disable=protected-access

  saved = gcsfs.GCSFileSystem._mv_file, gcsfs.GCSFileSystem.mv_file  # pylint: disable=protected-access
  gcsfs.GCSFileSystem._mv_file, gcsfs.GCSFileSystem.mv_file = copy_delete, asyn.sync_wrapper(copy_delete)
  yield
  gcsfs.GCSFileSystem._mv_file, gcsfs.GCSFileSystem.mv_file = saved


def _epath_backend_choice():
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top

  return gpath._is_tf_installed  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def bucket(tmp_path_factory, copy_delete_renames):
  """gs://BUCKET on a fresh emulator; the endpoint variables are set in this process while the module runs."""
  del copy_delete_renames
  port = train_worker.free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")  # pylint: disable=consider-using-with
  server = subprocess.Popen(
    [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1", f"--port={port}", "--in-memory",
     f"--default-bucket={BUCKET}"],
    stdout=log, stderr=subprocess.STDOUT,
  )  # fmt: skip
  saved = {name: os.environ.get(name) for name in emulator_env(url)}
  try:
    deadline = time.time() + 60
    while True:
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=2).close()
        break
      except OSError:
        if time.time() > deadline or server.poll() is not None:
          raise
        time.sleep(0.2)
    os.environ.update(emulator_env(url))
    # epath decides once per process (functools.cache) whether TensorFlow's gfile serves gs://; an earlier test of
    # this process may already have decided with EPATH_USE_TF unset, so forget that decision now and afterwards.
    _epath_backend_choice().cache_clear()
    yield f"gs://{BUCKET}"
  finally:
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
    _epath_backend_choice().cache_clear()
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _tree(value: float):
  return {"w": np.arange(10, dtype=np.float32) + value, "step": np.asarray(int(value), np.int32)}


def test_json_and_config_round_trip(bucket):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from fcnet_jax import fileio  # pylint: disable=g-import-not-at-top
  from fcnet_jax import run_config  # pylint: disable=g-import-not-at-top

  fileio.write_json(f"{bucket}/json/eval_val.json", {"mIoU": 0.5})
  assert fileio.read_json(f"{bucket}/json/eval_val.json") == {"mIoU": 0.5}
  assert [p.name for p in fileio.as_path(f"{bucket}/json").iterdir()] == ["eval_val.json"]  # No temporary left.
  config = tiny.get_config()
  run_config.save(config, f"{bucket}/config_run")
  assert run_config.exists(f"{bucket}/config_run")
  assert run_config.differences(run_config.load(f"{bucket}/config_run"), config) == []


def test_checkpoints_keep_resume_clean_up_and_fall_back(bucket):
  from fcnet_jax import checkpoints as checkpoints_lib  # pylint: disable=g-import-not-at-top
  from fcnet_jax import fileio  # pylint: disable=g-import-not-at-top

  workdir = f"{bucket}/ckpt_run"
  checkpoints = checkpoints_lib.Checkpoints(workdir, keep=2)
  for step in (1, 2, 3):
    checkpoints.save_latest(step, _tree(step))
  checkpoints.wait()
  assert checkpoints.steps()["checkpoints"] == [2, 3]
  # A step killed mid-write (its temporary directory) is never listed, and the next writer removes it.
  latest = fileio.as_path(workdir) / checkpoints_lib.LATEST_DIR
  (latest / "4.orbax-checkpoint-tmp" / "default").mkdir(parents=True)
  (latest / "4.orbax-checkpoint-tmp" / "default" / "_METADATA").write_text("{")
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
