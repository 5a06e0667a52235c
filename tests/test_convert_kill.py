"""The converter killed with SIGKILL mid-way, then rerun: nothing lost, nothing duplicated, summary.json correct.

The real command line runs in a subprocess (its own process group, killed whole, as a preempted node is) on the
synthetic refer data; the kill points are found by watching the output folder: while a shard is being written (its
temporary file exists) after about half of the shards are finished, and at the end (all shards finished,
summary.json not yet written). Each rerun resumes the previous one's output; the last runs to completion and must
equal an uninterrupted conversion: the same ref ids in the same order, the same bytes, the same summary and TFDS
metadata, and no temporary file left behind. Three command lines; most of the test's cost is their imports.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fixtures_refer import read_records
from fixtures_refer import REPO
from fixtures_refer import shard_paths
from fixtures_refer import synthetic_root  # noqa: F401  (a pytest fixture, used by its name)
from input_pipeline import convert
from input_pipeline import records

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SHARD_SIZE = 4
SPLITS = ("val",)  # 33 refs in 9 shards: the cost is mostly the 4 command lines' imports.


def _command(root: str, out: str):
  return [
    sys.executable,
    "-m",
    "input_pipeline.convert",
    f"--refer_root={root}",
    f"--coco_images={root}/images",
    "--dataset=refcoco",
    "--split_by=unc",
    f"--out={out}",
    f"--splits={','.join(SPLITS)}",
    "--num_workers=1",
    f"--shard_size={SHARD_SIZE}",
  ]


def _listing(out: str):
  """(finished shards, temporary files) under the split folders of `out`."""
  finished, temporary = [], []
  for split in SPLITS:
    folder = os.path.join(out, split)
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
      (temporary if ".tmp-" in name else finished).append(name)
  return finished, temporary


def _run_until(root: str, out: str, should_kill) -> bool:
  """Runs the converter until `should_kill(out)` holds, then SIGKILLs its process group; True if it was killed."""
  env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
  process = subprocess.Popen(
    _command(root, out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
  )
  deadline = time.monotonic() + 300
  while process.poll() is None and time.monotonic() < deadline:
    if should_kill(out):
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
      return True
    time.sleep(0.002)
  assert process.wait(timeout=10) == 0, process.stderr.read().decode()
  return False


def test_killed_conversions_resume_to_the_uninterrupted_result(synthetic_root, tmp_path):  # noqa: F811
  reference = str(tmp_path / "reference")
  expected = convert.convert(
    synthetic_root,
    os.path.join(synthetic_root, "images"),
    "refcoco",
    "unc",
    reference,
    splits=list(SPLITS),
    num_workers=1,
    shard_size=SHARD_SIZE,
  )
  total = sum(expected["splits"][s]["shards"] for s in SPLITS)
  assert total >= 8, expected

  out = str(tmp_path / "out")
  summary_path = os.path.join(out, records.SUMMARY_FILE)
  # While a shard is half-written, with about half of them finished; then with every shard finished but
  # summary.json not yet written (the TFDS metadata is written in between, which takes a few seconds).
  half_way = lambda o: len(_listing(o)[0]) >= total // 2 and _listing(o)[1]
  at_the_end = lambda o: len(_listing(o)[0]) == total and not os.path.exists(summary_path)
  assert _run_until(synthetic_root, out, half_way), "the conversion finished before the first kill point"
  assert total // 2 <= len(_listing(out)[0]) < total  # Killed mid-way (usually leaving a partial shard behind).
  if _run_until(synthetic_root, out, at_the_end):
    assert not os.path.exists(summary_path) and len(_listing(out)[0]) == total
  assert _run_until(synthetic_root, out, lambda o: False) is False  # The last rerun finishes.

  with open(summary_path) as f:
    assert json.load(f) == expected
  for split in SPLITS:
    got, want = shard_paths(os.path.join(out, split)), shard_paths(os.path.join(reference, split))
    assert [os.path.basename(p) for p in got] == [os.path.basename(p) for p in want]
    ids = [int(r["ref_id"]) for r in read_records(got)]
    assert ids == [int(r["ref_id"]) for r in read_records(want)] and len(ids) == len(set(ids))
    assert len(ids) == expected["splits"][split]["refs"]
    for mine, theirs in zip(got, want):
      with open(mine, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read(), mine
  assert _listing(out)[1] == []  # No temporary file survives the reruns.
  with open(os.path.join(out, "dataset_info.json")) as f, open(os.path.join(reference, "dataset_info.json")) as g:
    mine, theirs = json.load(f), json.load(g)
  for info in (mine, theirs):
    for split in info["splits"]:
      split.pop("filepathTemplate", None)
    info.pop("releaseNotes", None)
  assert mine == theirs
