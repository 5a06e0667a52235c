"""Data-parallel training across devices and processes equals training on one device (fcnet_jax/train.py,
fcnet_jax/sharding.py).

Every run is a fresh interpreter (tests/train_worker.py): JAX fixes its devices when its backend starts.

* reference: one process, one CPU device, `train_and_evaluate` for 2 steps on explicit global batches of 8.
* 8 devices (`--xla_force_host_platform_device_count=8`): one `train_step` on the first global batch, one example
  per device.
* 2 processes on 127.0.0.1 (`jax.distributed.initialize`, gloo CPU collectives, one device each): the same
  `train_and_evaluate` where each process feeds only its 4 rows of every global batch and evaluates its own part
  of the split (the real evaluation pipeline splits the pairs by process_index / process_count).

Tolerances. Sharding changes the order of float32 reductions (gradient all-reduce, BatchNorm statistics), so the
runs agree to rounding, not bitwise: measured, the gradients differ by ≤ 3e-5 of each tensor's largest entry and
the BatchNorm statistics by ≤ 2e-6 relative; the tests allow 1e-3 and 1e-4. One exception: the attention key
biases have no gradient in exact arithmetic (softmax ignores a constant added to all of a query's logits); their
computed gradient is rounding noise (~1e-10), and Adam's first step turns its sign into ±lr. For those the test
asks only for Adam's bound |Δ| ≤ 2 lr. Adam's step is sign-like for every small gradient, so parameters are
compared where the gradient is ≥ 1% of its tensor's largest entry (measured ≤ 1.2e-7 apart; allowed 1e-6 =
lr / 1000), which a missing all-reduce or per-device BatchNorm would break by ~lr.
"""

import json
import math
import os
import subprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

import train_worker  # pylint: disable=g-import-not-at-top,wrong-import-position

# pycocotools (synthetic data / converter) warns once per decoded mask under NumPy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

STEPS = 2
LEARNING_RATE = 1e-3  # train_worker.make_config
ADAM_B1 = 0.9
TIMEOUT_S = 900


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
  """(shard dir, converter summary) of conftest's shared tiny dataset."""
  return tiny_dataset.tfrecord_dir, tiny_dataset.summary


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _run_worker(out: str, mode: str, num_devices: int = 1, **flags):
  os.makedirs(out, exist_ok=True)
  command = train_worker.worker_command(mode, out=out, steps=STEPS, **flags)
  train_worker.run_checked(
    command, os.path.join(out, "log.txt"), TIMEOUT_S, env=train_worker.subprocess_env(num_devices)
  )
  return _read_json(os.path.join(out, "result.json"))


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
  """One process, one device: the result, the state after step 1 and at the end, the logged losses."""
  shards, _ = dataset
  root = tmp_path_factory.mktemp("reference")
  workdir, out = str(root / "workdir"), str(root / "out")
  result = _run_worker(out, "train", tfrecord_dir=shards, workdir=workdir, dump_steps="1")
  assert result["device_count"] == 1 and result["process_count"] == 1
  return {
    "result": result,
    "state_1": train_worker.load_npz(os.path.join(out, "state_1.npz")),
    "losses": train_worker.read_scalars(workdir)["train/loss"],
  }


def assert_one_adam_step_close(state, reference):
  """Compares two TrainStates one Adam step after the same initial state (module docstring: tolerances)."""
  assert state.keys() == reference.keys()
  first_moments = {key.split(".mu", 1)[1]: key for key in reference if ".mu[" in key}
  params = [key for key in reference if key.startswith("['params']")]
  assert len(first_moments) == len(params)
  noise_only = []
  for key in params:
    moment = first_moments[key[len("['params']") :]]
    grad, grad_ref = state[moment] / (1 - ADAM_B1), reference[moment] / (1 - ADAM_B1)  # μ₁ = (1 − β₁) g.
    delta = np.abs(state[key].astype(np.float64) - reference[key])
    assert delta.max() <= 2 * LEARNING_RATE, key
    scale = np.abs(grad_ref).max()
    if scale < 1e-8:
      noise_only.append(key)
      continue
    np.testing.assert_allclose(grad, grad_ref, rtol=0, atol=1e-3 * scale, err_msg=key)
    strong = np.abs(grad_ref) >= 1e-2 * scale
    assert delta[strong].max() <= 1e-6, (key, delta[strong].max())
  # Only attention key biases may be noise-only; the rest of the model must have been compared.
  assert all(key.endswith("['key']['bias']") for key in noise_only), noise_only
  assert len(noise_only) < 0.05 * len(params)
  for key in reference:
    if key.startswith("['batch_stats']"):
      scale = max(np.abs(reference[key]).max(), 1e-6)
      np.testing.assert_allclose(state[key], reference[key], rtol=0, atol=1e-4 * scale, err_msg=key)
  assert int(state["['step']"]) == int(reference["['step']"]) == 1


def test_eight_devices_match_one_device(dataset, reference, tmp_path):
  shards, _ = dataset
  result = _run_worker(str(tmp_path), "sharded_step", num_devices=8, tfrecord_dir=shards)
  assert result["device_count"] == 8
  assert result["image_shards"] == [[1, 64, 64, 3]] * 8  # One example per device.
  assert result["params_replicated"]
  assert result["train"]["loss"] == pytest.approx(reference["losses"][1], rel=1e-5)
  state = train_worker.load_npz(os.path.join(str(tmp_path), "state.npz"))
  # BatchNorm statistics over the global batch (jit inserts the cross-device reduction) are among the checks.
  assert_one_adam_step_close(state, reference["state_1"])


def test_two_processes_match_one_process(dataset, reference, tmp_path):
  shards, summary = dataset
  workdir = str(tmp_path / "workdir")
  port = train_worker.free_port()
  processes, logs = [], []
  for process_id in range(2):
    out = str(tmp_path / f"process_{process_id}")
    os.makedirs(out)
    command = train_worker.worker_command(
      "train",
      out=out,
      steps=STEPS,
      tfrecord_dir=shards,
      workdir=workdir,
      dump_steps="1",
      num_processes=2,
      process_id=process_id,
      coordinator=f"127.0.0.1:{port}",
    )
    logs.append(os.path.join(out, "log.txt"))
    with open(logs[-1], "w") as log:
      processes.append(
        (
          command,
          subprocess.Popen(
            command, cwd=train_worker.REPO, env=train_worker.subprocess_env(), stdout=log, stderr=subprocess.STDOUT
          ),
        )
      )
  try:
    for (command, process), log in zip(processes, logs):
      train_worker.check_exit(process.wait(timeout=TIMEOUT_S), command, log)
  finally:
    for _, process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()

  results = [_read_json(str(tmp_path / f"process_{i}" / "result.json")) for i in range(2)]
  for i, result in enumerate(results):
    assert (result["process_index"], result["process_count"]) == (i, 2)
    assert (result["device_count"], result["local_device_count"]) == (2, 1)
  # Each process fed only its rows of every global batch; together they fed the reference's batches.
  assert results[0]["rows"] == [0, 4] and results[1]["rows"] == [4, 8]
  fed = [a + b for a, b in zip(results[0]["fed_ref_ids"], results[1]["fed_ref_ids"])]
  assert fed[:STEPS] == reference["result"]["fed_ref_ids"][:STEPS]

  # The replicated state is the same on both processes, bit for bit.
  final = [train_worker.load_npz(str(tmp_path / f"process_{i}" / "state.npz")) for i in range(2)]
  assert final[0].keys() == final[1].keys()
  assert [k for k in final[0] if not np.array_equal(final[0][k], final[1][k])] == []
  # Training equals the single-process run up to reduction order.
  assert_one_adam_step_close(train_worker.load_npz(str(tmp_path / "process_0" / "state_1.npz")), reference["state_1"])
  losses = train_worker.read_scalars(workdir)["train/loss"]  # Written by process 0.
  np.testing.assert_allclose(
    [losses[s] for s in range(1, STEPS + 1)], [reference["losses"][s] for s in range(1, STEPS + 1)], rtol=1e-5
  )

  # Evaluation: both processes report the merged metrics of the whole split...
  merged = results[0]["eval"]["val"]
  assert results[1]["eval"]["val"] == merged
  assert merged["count"] == summary["splits"]["val"]["sentences"]
  assert all(math.isfinite(v) for v in merged.values())
  # ...equal to one process evaluating the same checkpoint alone (all pairs, a batch of 8 on one device).
  alone = _run_worker(str(tmp_path / "alone"), "evaluate", tfrecord_dir=shards, workdir=workdir)["eval"]["val"]
  assert alone["count"] == merged["count"]
  for name, value in merged.items():
    assert alone[name] == pytest.approx(value, abs=1e-6), name
