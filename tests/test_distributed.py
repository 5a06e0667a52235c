"""End to end in a bucket, with two processes: converted there, trained there by 2 processes × 4 CPU devices,
preempted, resumed, evaluated, and then read back by every loader; the training equals a single-process run
(fcnet_jax/train.py, fcnet_jax/sharding.py, fcnet_jax/preemption.py, input_pipeline/convert.py, main.py).

Every run is a fresh interpreter (tests/train_worker.py): JAX fixes its devices when its backend starts. The bucket
is a local GCS emulator (tests/gcs_emulator.py) that TensorFlow's, tensorstore's and google-cloud-storage's clients
all reach; tests/test_gcs.py tests the clients one by one.

* converted: synthetic refer data generated into the bucket; `python -m input_pipeline.convert` reads it there and
  writes its shards there. They equal, byte for byte, the suite's local shards (tests/conftest.py `tiny_dataset`,
  converted from the same data).
* reference: main.py's `main` (train_worker `train`: only the training stream replaced by explicit global batches of
  8), one process, one CPU device, STEPS steps and an evaluation at the end, on the local shards.
* 2 processes × 4 CPU devices, the workdir and the shards in the bucket, as the two tasks of a faked SLURM job step
  (main.py --config.distributed=True: `jax.distributed.initialize()` finds the coordinator and its process id in
  the SLURM variables; Gloo CPU collectives), each process feeding only its 4 rows of every global batch. Process 1
  alone gets SIGTERM once step 1 is logged: both stop at the same step (JAX's preemption sync), save it and exit
  143. The restart (2 × 4 again) resumes there and finishes; it evaluates its own part of the split (the real
  evaluation pipeline reads the bucket's shards and splits the pairs by process) and both report the merged
  metrics. The two runs fed exactly the reference's global batches, and the two processes hold bit-identical
  states.
* the bucket's workdir read back in this process: `evaluate.evaluate` (what `main.py --mode=eval` runs; one
  process, one device) scores what the two processes scored together; `pretrained.load`, `Predictor.from_checkpoint`
  (the loaders of prediction and export), `config.init_from` (train.read_init_from) and the showcase after training
  (overlays.png, examples/, the printed commands, written into the bucket).

Tolerances. Sharding changes the order of float32 reductions (gradient all-reduce, BatchNorm statistics), so the
runs agree to rounding, not bitwise: measured, the gradients differ by ≤ 3e-5 of each tensor's largest entry and
the BatchNorm statistics by ≤ 2e-6 relative; the tests allow 1e-3 and 1e-4. One exception: the attention key
biases have no gradient in exact arithmetic (softmax ignores a constant added to all of a query's logits); their
computed gradient is rounding noise (~1e-10), and Adam's first step turns its sign into ±lr. For those the test
asks only for Adam's bound |Δ| ≤ 2 lr. Adam's step is sign-like for every small gradient, so parameters are
compared where the gradient is ≥ 1% of its tensor's largest entry (measured ≤ 1.2e-7 apart; allowed 1e-6 =
lr / 1000), which a missing all-reduce or per-device BatchNorm would break by ~lr.

Over STEPS steps the rounding differences compound: the losses of the two-process run are within 4.4e-5 relative of
the reference's (step 5; steps 1-2 ≤ 1e-6), allowed LOSS_RTOL = 2e-4. Final parameters: no entry may differ by more
than Adam can move it in STEPS updates (2 Σ lr_t · `adam_ratio_bound(t)` ≈ 6.4e-3; measured max 1.0e-3, the
sign-flipped near-zero gradients), and over the whole model the difference is 1.8% of how far the reference moved
from step 1 to STEPS (allowed FINAL_GAP_FRACTION = 5%, about 3× the rounding-only gap; the scale is the reference's
own movement, which another trajectory would not follow to a few percent).
"""

import json
import math
import os
import re
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from fcnet_jax import preemption  # pylint: disable=g-import-not-at-top,wrong-import-position
import gcs_emulator  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_worker  # pylint: disable=g-import-not-at-top,wrong-import-position

# pycocotools (synthetic data / converter) warns once per decoded mask under NumPy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

STEPS = 5
LOSS_RTOL = 2e-4
FINAL_GAP_FRACTION = 0.05
LEARNING_RATE = 1e-3  # train_worker.make_config
ADAM_B1, ADAM_B2 = 0.9, 0.999
TIMEOUT_S = 900


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
def reference(tiny_dataset, tmp_path_factory):
  """One process, one device, on the local shards: the result, the state after step 1 and at the end, the logged
  losses."""
  shards = tiny_dataset.tfrecord_dir
  root = tmp_path_factory.mktemp("reference")
  workdir, out = str(root / "workdir"), str(root / "out")
  result = _run_worker(out, "train", tfrecord_dir=shards, workdir=workdir, dump_steps="1")
  assert result["device_count"] == 1 and result["process_count"] == 1
  return {
    "result": result,
    "state_1": train_worker.load_npz(os.path.join(out, "state_1.npz")),
    "state": train_worker.load_npz(os.path.join(out, "state.npz")),
    "losses": train_worker.read_scalars(workdir)["train/loss"],
    "learning_rates": train_worker.read_scalars(workdir)["train/learning_rate"],  # Of the update to each step.
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


def adam_ratio_bound(t: int) -> float:
  """The largest |m̂/√v̂| Adam can take at its t-th update, over all gradient sequences (Cauchy–Schwarz on the
  moment sums; ε only lowers it): 1 at t = 1, ≈ 1.00x after."""
  terms = [((1 - ADAM_B1) * ADAM_B1 ** (t - k)) ** 2 / ((1 - ADAM_B2) * ADAM_B2 ** (t - k)) for k in range(1, t + 1)]
  return math.sqrt(1 - ADAM_B2**t) / (1 - ADAM_B1**t) * math.sqrt(sum(terms))


class Worker(train_worker.LoggedProcess):
  """A train_worker subprocess with its output in `out`/log.txt."""

  def __init__(self, command, out: str, env):
    os.makedirs(out, exist_ok=True)
    self.out = out
    super().__init__(command, os.path.join(out, "log.txt"), env, timeout=TIMEOUT_S)

  def result(self) -> dict:
    return _read_json(os.path.join(self.out, "result.json"))


def _start_two(root: str, **flags):
  """Two train workers as the processes of a faked 2-task SLURM step (main.py --config.distributed=True), with 4 CPU
  devices each (8 in all); each writes to `root`/process_<i>."""
  port, workers = train_worker.free_port(), []
  for i in (0, 1):
    out = os.path.join(root, f"process_{i}")
    command = train_worker.worker_command("train", out=out, distributed="true", **flags)
    workers.append(Worker(command, out, train_worker.slurm_env(i, 2, port, num_devices=4)))
  return workers


def _finish(workers, timeout: float = TIMEOUT_S):
  """Waits for every worker (killing the rest if one hangs); returns their exit statuses."""
  try:
    return [worker.process.wait(timeout=timeout) for worker in workers]
  finally:
    for worker in workers:
      if worker.process.poll() is None:
        worker.process.kill()
        worker.process.wait()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  with gcs_emulator.running(str(tmp_path_factory.mktemp("gcs"))) as emulator:
    yield emulator


@pytest.fixture(scope="module")
def converted(gcs, tmp_path_factory):
  """Synthetic refer data generated into the bucket and converted there by the real command: the shard dir."""
  from input_pipeline import synthetic  # pylint: disable=g-import-not-at-top

  raw, shards = f"{gcs.bucket}/raw", f"{gcs.bucket}/shards"
  synthetic.generate(raw, **train_worker.TINY_SYNTHETIC)  # The data of the suite's local tiny dataset.
  command = [sys.executable, "-m", "input_pipeline.convert", f"--refer_root={raw}", f"--coco_images={raw}/images",
             "--dataset=refcoco", "--split_by=unc", f"--out={shards}", "--num_workers=1"]  # fmt: skip
  train_worker.run_checked(command, str(tmp_path_factory.mktemp("convert") / "convert.log"), TIMEOUT_S)
  return shards


@pytest.fixture(scope="module")
def runs(gcs, converted, tmp_path_factory):
  """The two-process run (SIGTERM to process 1) and its restart, in the bucket: {"workdir", "first", "resumed"}
  ((exit statuses, workers) of each) and "steps_after_first" (the checkpoint steps the first run left)."""
  root, workdir = tmp_path_factory.mktemp("two_processes"), f"{gcs.bucket}/dist"
  flags = {"steps": STEPS, "tfrecord_dir": converted, "workdir": workdir, "dump_steps": "1"}
  # 1. Two processes train; process 1 alone gets SIGTERM once step 1 is logged.
  first = _start_two(str(root / "first"), **flags)
  try:
    first[1].wait_for(r"\[1\] train/")
    first[1].process.send_signal(signal.SIGTERM)
  finally:
    codes = _finish(first)
  steps_after_first = train_worker.checkpoint_steps(workdir, "checkpoints")
  # 2. The restart (2 × 4 devices again) resumes there and finishes.
  resumed = _start_two(str(root / "resumed"), **flags) if codes == [preemption.PREEMPTED_EXIT_CODE] * 2 else []
  return {
    "workdir": workdir,
    "first": (codes, first),
    "steps_after_first": steps_after_first,
    "resumed": (_finish(resumed), resumed),
  }


def test_converter_reads_and_writes_the_bucket(gcs, converted, tiny_dataset):
  from fcnet_jax import fileio  # pylint: disable=g-import-not-at-top
  from input_pipeline import import_tensorflow  # pylint: disable=g-import-not-at-top

  tf = import_tensorflow()
  assert fileio.read_json(f"{converted}/summary.json") == tiny_dataset.summary
  local = tiny_dataset.tfrecord_dir
  names = sorted(os.path.relpath(p, local) for p in tf.io.gfile.glob(f"{local}/*/*.tfrecord"))
  assert len(names) == 4 and names == sorted(
    p[len(converted) + 1 :] for p in tf.io.gfile.glob(f"{converted}/*/*.tfrecord")
  )
  for name in names:  # The shards the two processes read equal the local ones the reference read.
    with tf.io.gfile.GFile(f"{converted}/{name}", "rb") as ours, open(os.path.join(local, name), "rb") as theirs:
      assert ours.read() == theirs.read(), name
  gcs.reached(r"^GET storage\.googleapis\.com /fcnet-test/raw%2Frefcoco%2Frefs%28unc%29\.p")
  gcs.reached(r"^POST www\.googleapis\.com /upload/storage/v1/b/fcnet-test/o\?uploadType=resumable&name=shards%2F")


def test_two_processes_preempted_resume_and_match_one_process(gcs, runs, reference, tiny_dataset):
  """Both processes save every checkpoint into the bucket together (Orbax's multi-process save), process 0 writes
  the TensorBoard events, and the restart resumes from the checkpoint of the stop."""
  workdir, (codes, first) = runs["workdir"], runs["first"]
  assert codes == [preemption.PREEMPTED_EXIT_CODE] * 2 == [143] * 2, [w.text()[-3000:] for w in first]
  for i, worker in enumerate(first):  # main.py found the other process from the SLURM variables.
    assert f"JAX process {i} / 2" in worker.text()
  stops = [int(re.search(r"Preempted at step (\d+) \(SIGTERM\)", w.text()).group(1)) for w in first]
  stop = stops[0]
  assert stops == [stop, stop] and 1 <= stop < STEPS, stops  # The same step in both: JAX's preemption sync.
  assert runs["steps_after_first"][-1] == stop  # Its checkpoint, none after it.
  first_results = [w.result() for w in first]
  assert [r["preempted_at"] for r in first_results] == [stop, stop]

  codes, resumed = runs["resumed"]
  assert codes == [0, 0], [w.text()[-3000:] for w in resumed]
  assert all(f"Resumed from step {stop}" in w.text() for w in resumed)
  results = [w.result() for w in resumed]
  for i, result in enumerate(results):
    assert (result["process_index"], result["process_count"]) == (i, 2)
    assert (result["device_count"], result["local_device_count"]) == (8, 4)
  # Each process fed only its rows of every global batch; together, the reference's batches, in both runs.
  assert results[0]["rows"] == [0, 4] and results[1]["rows"] == [4, 8]
  fed = [a + b for a, b in zip(first_results[0]["fed_ref_ids"], first_results[1]["fed_ref_ids"])]
  fed += [a + b for a, b in zip(results[0]["fed_ref_ids"], results[1]["fed_ref_ids"])]
  assert fed == reference["result"]["fed_ref_ids"] and len(fed) == STEPS

  # The replicated state is the same on both processes, bit for bit.
  for name in ("state.npz", "state_1.npz"):
    states = [train_worker.load_npz(os.path.join(w.out, name)) for w in resumed]
    assert states[0].keys() == states[1].keys()
    assert [k for k in states[0] if not np.array_equal(states[0][k], states[1][k])] == [], name
  # Training equals the single-process run up to reduction order (module docstring).
  assert_one_adam_step_close(train_worker.load_npz(os.path.join(resumed[0].out, "state_1.npz")), reference["state_1"])
  losses = train_worker.read_scalars(workdir)["train/loss"]  # Written into the bucket by process 0 of both runs.
  assert sorted(losses) == list(range(1, STEPS + 1))
  got, want = [losses[s] for s in sorted(losses)], [reference["losses"][s] for s in sorted(losses)]
  np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)
  final, final_ref = train_worker.load_npz(os.path.join(resumed[0].out, "state.npz")), reference["state"]
  assert int(final["['step']"]) == STEPS
  # Final parameters. A hard bound: Adam moves an entry by at most lr_t · adam_ratio_bound(t) at update t, whatever
  # the gradients, so two runs differ by at most twice the sum. The meaningful check: over the whole model, the two
  # runs differ by a small fraction of how far the reference moved from step 1 to STEPS (a wrong resume, batch or
  # learning rate would differ by about as much as it moved).
  keys = [k for k in final_ref if k.startswith("['params']")]
  gap = np.concatenate([(final[k].astype(np.float64) - final_ref[k]).ravel() for k in keys])
  moved = np.concatenate([(final_ref[k].astype(np.float64) - reference["state_1"][k]).ravel() for k in keys])
  bound = 2 * sum(reference["learning_rates"][t] * adam_ratio_bound(t) for t in range(1, STEPS + 1))
  assert np.abs(gap).max() <= bound, (np.abs(gap).max(), bound)
  assert np.linalg.norm(gap) <= FINAL_GAP_FRACTION * np.linalg.norm(moved), np.linalg.norm(gap) / np.linalg.norm(moved)

  # Evaluation: both processes report the merged metrics of the whole split.
  merged = results[0]["eval"]["val"]
  assert results[1]["eval"]["val"] == merged
  assert merged["count"] == tiny_dataset.summary["splits"]["val"]["sentences"]
  assert all(math.isfinite(v) for v in merged.values())
  assert train_worker.checkpoint_steps(workdir, "checkpoints")[-1] == STEPS
  gcs.reached(r"^GET storage\.googleapis\.com /fcnet-test/shards%2Ftrain%2Ftrain-")  # tf.data read the bucket.
  gcs.reached(
    r"^POST www\.googleapis\.com /upload/storage/v1/b/fcnet-test/o\?uploadType=resumable&name=dist%2F.*tfevents"
  )


def test_the_bucket_workdir_evaluates_predicts_and_initialises(runs):
  """Read in this process (one device) from the bucket: the checkpoints the two processes wrote there."""
  import jax  # pylint: disable=g-import-not-at-top

  from fcnet_jax import evaluate  # pylint: disable=g-import-not-at-top
  from fcnet_jax import fileio  # pylint: disable=g-import-not-at-top
  from fcnet_jax import predict  # pylint: disable=g-import-not-at-top
  from fcnet_jax import pretrained  # pylint: disable=g-import-not-at-top
  from fcnet_jax import run_config  # pylint: disable=g-import-not-at-top
  from fcnet_jax import showcase  # pylint: disable=g-import-not-at-top
  from fcnet_jax import train  # pylint: disable=g-import-not-at-top

  workdir, (codes, resumed) = runs["workdir"], runs["resumed"]
  assert codes == [0, 0], "the two-process run did not finish (see the test above)"
  merged = resumed[0].result()["eval"]["val"]
  assert fileio.read_json(f"{workdir}/eval_val.json")["step"] == STEPS
  # What `main.py --mode=eval --checkpoint=latest` runs, with the config saved in the bucket: one process evaluating
  # all pairs (a batch of 8 on one device) scores what the two processes scored together.
  alone = evaluate.evaluate(run_config.load(workdir), workdir, checkpoint="latest")["val"]
  assert alone["count"] == merged["count"]
  for name, value in merged.items():
    assert alone[name] == pytest.approx(value, abs=1e-6), name
  loaded = pretrained.load(workdir, "latest")
  assert loaded.step == STEPS and loaded.source.startswith(workdir)
  predictor = predict.Predictor.from_checkpoint(workdir, "latest")
  # main.py's showcase after training: overlays.png, examples/ and the printed commands, in the bucket.
  text = showcase.after_training(workdir, count=2, predictor=predictor)
  entries = showcase.read_examples(workdir)
  assert len(entries) == 2 and all(e["image"].startswith(f"{workdir}/examples/") for e in entries), entries
  assert fileio.as_path(entries[0]["mask"]).is_file() and fileio.as_path(workdir, "overlays.png").is_file()
  assert f"--checkpoint={workdir} --image={entries[0]['image']}" in text and f"{workdir}/overlays.png" in text
  variables = train.read_init_from(workdir)  # config.init_from=<workdir>: its best checkpoint.
  best = pretrained.load(workdir, "best")
  # pylint: disable-next=protected-access
  for ours, theirs in ((predictor._state.params, loaded.state.params), (variables["params"], best.state.params)):
    flat = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), ours, theirs))
    assert len(flat) > 100 and all(flat)
