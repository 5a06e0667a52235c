"""Paths users take through main.py beyond the loop tests: evaluating a chosen checkpoint, bad checkpoints, the
shuffled-sentence control in both modes, two evaluation splits, frozen backbone BatchNorm, and what a run leaves
for TensorBoard and the profiler (main.py, fcnet_jax/evaluate.py, fcnet_jax/checkpoints.py, fcnet_jax/train.py).

The small training run is conftest.py's `trained_tiny_workdir` (main.py with configs/tiny.py on the synthetic
shards, 4 steps, evaluation splits val and testA every 2 steps, checkpoints at 2 and 4, the control on, one
profiled step and `freeze_backbone_bn`). Then `--mode=eval` with --checkpoint=2 and --checkpoint=latest on a copy.
The error paths fail before anything is compiled; checkpoint resolution and the restore for evaluation are checked
in-process on the same workdir. Best-checkpoint selection is checked on the loop with scripted scores (and a
stand-in model), so that the two splits prefer different steps.
"""

import glob
import json
import os
import subprocess

import jax
import numpy as np
import pytest

import train_worker

# pycocotools (synthetic data / converter) warns once per decoded mask under NumPy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SPLITS = train_worker.TRAINED_SPLITS
SHUFFLED = "_shuffled_sentences"


def _default_cache_env() -> dict:
  """A worker's environment without the tests' shared compilation cache (so main.py's default applies), with
  jax's compiler log (cache hits and misses) on."""
  env = {k: v for k, v in train_worker.subprocess_env().items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["JAX_DEBUG_LOG_MODULES"] = "jax._src.compiler"
  return env


def _eval_jsons(workdir: str) -> dict:
  names = [split + suffix for split in SPLITS for suffix in ("", SHUFFLED)]
  out = {}
  for name in names:
    with open(os.path.join(workdir, f"eval_{name}.json")) as f:
      out[name] = json.load(f)
  return out


@pytest.fixture(scope="module")
def run(trained_tiny_workdir, tmp_path_factory):
  """The shared training run, then checkpoint 2 and the latest evaluated on a copy; returns what each left behind."""
  trained = trained_tiny_workdir
  root = tmp_path_factory.mktemp("eval_paths")
  workdir = train_worker.copy_workdir(trained, str(root / "run"))
  out = {"workdir": workdir, "summary": trained.dataset.summary, "command": trained.command}
  out["train_stdout"] = trained.stdout
  out["train"] = _eval_jsons(workdir)
  out["steps"] = (train_worker.checkpoint_steps(workdir, "checkpoints"), train_worker.checkpoint_steps(workdir, "best"))
  # The two evaluations use the default compilation cache, <workdir>/xla_cache (the tests' shared cache is off for
  # them), and log jax's cache hits: the second finds the evaluation program the first compiled.
  env = _default_cache_env()
  for checkpoint in ("2", "latest"):
    log = root / f"eval_{checkpoint}.log"
    command = trained.command(workdir, "--mode=eval", f"--checkpoint={checkpoint}")
    train_worker.run_checked(command, str(log), train_worker.TIMEOUT_S, env=env)
    out[f"eval_{checkpoint}"] = _eval_jsons(workdir)
    out[f"eval_{checkpoint}_stdout"] = log.read_text()
  return out


def _table_rows(stdout: str) -> dict:
  """{row name: the row's last column (count)} of the table main.py prints."""
  names = {split + suffix for split in SPLITS for suffix in ("", SHUFFLED)}
  return {
    line.split()[0]: line.split()[-1] for line in stdout.splitlines() if line.split()[:1] and line.split()[0] in names
  }


# ------------------------------------------------------------------------------------------------------------
# Evaluation of a chosen checkpoint, and the control.


def test_training_scores_both_splits_and_the_control_at_the_end(run):
  counts = {split: run["summary"]["splits"][split]["sentences"] for split in SPLITS}
  for split in SPLITS:
    for name in (split, split + SHUFFLED):
      assert run["train"][name]["step"] == 4 and run["train"][name]["split"] == name
      assert run["train"][name]["count"] == counts[split], name
  assert _table_rows(run["train_stdout"]) == {
    split + suffix: str(counts[split]) for split in SPLITS for suffix in ("", SHUFFLED)
  }
  # The control runs at the final evaluation only; every evaluation scores both splits.
  scalars = train_worker.read_scalars(run["workdir"])
  for split in SPLITS:
    assert sorted(scalars[f"eval/{split}/mIoU"]) == [2, 4]
    assert sorted(scalars[f"eval/{split}{SHUFFLED}/mIoU"]) == [4]
  # The control really scored other sentences: the same images and model give other numbers.
  assert any(run["train"][split][k] != run["train"][split + SHUFFLED][k] for split in SPLITS for k in ("mIoU", "oIoU"))


def test_eval_mode_latest_equals_the_final_training_evaluation_with_the_control(run):
  """--mode=eval scores the control exactly as the final evaluation of training does (same files, numbers)."""
  assert run["eval_latest"] == run["train"]
  assert _table_rows(run["eval_latest_stdout"]) == _table_rows(run["train_stdout"])


def test_eval_mode_at_a_step_restores_that_step(run):
  scalars = train_worker.read_scalars(run["workdir"])
  evaluated = run["eval_2"]
  for split in SPLITS:
    assert evaluated[split]["step"] == 2 and evaluated[split + SHUFFLED]["step"] == 2
    for name in ("mIoU", "oIoU", "prec@0.5", "count"):
      # TensorBoard holds the training evaluation at step 2 (float32).
      assert evaluated[split][name] == pytest.approx(scalars[f"eval/{split}/{name}"][2], rel=1e-6, abs=1e-7)
  # Step 2 is not step 4: the parameters (and so some metric) differ.
  assert any(evaluated[split][k] != run["eval_latest"][split][k] for split in SPLITS for k in ("mIoU", "oIoU"))


def _cache_log(stdout: str, event: str) -> list:
  """The names of the programs jax reports as `event` ("hit" or "MISS") in a main.py log with compiler logging."""
  pattern = {"hit": "Persistent compilation cache hit for '", "MISS": "PERSISTENT COMPILATION CACHE MISS for '"}[event]
  return [line.split(pattern, 1)[1].split("'")[0] for line in stdout.splitlines() if pattern in line]


def test_second_evaluation_hits_the_workdir_compile_cache(run):
  """config.compile_cache_dir's default: the cache lives in <workdir>/xla_cache; the first --mode=eval compiles
  and stores the evaluation step there, the second (another process, another checkpoint) loads it."""
  cache = os.path.join(run["workdir"], "xla_cache")
  stored = sorted(name.split("-")[0] for name in os.listdir(cache) if name.endswith("-cache"))
  assert "jit_eval_step" in stored, stored
  first, second = run["eval_2_stdout"], run["eval_latest_stdout"]
  assert "jit_eval_step" in _cache_log(first, "MISS") and "jit_eval_step" not in _cache_log(first, "hit")
  assert "jit_eval_step" in _cache_log(second, "hit") and "jit_eval_step" not in _cache_log(second, "MISS")
  # Every program the first run stored, the second loaded: nothing of size was compiled twice.
  assert set(stored) <= set(_cache_log(second, "hit")), (stored, _cache_log(second, "hit"))


def _main_fails(run: dict, workdir: str, checkpoint: str) -> str:
  """Runs --mode=eval expecting exit status 1 and one error line; returns that line."""
  process = subprocess.run(
    run["command"](workdir, "--mode=eval", f"--checkpoint={checkpoint}"),
    cwd=train_worker.REPO,
    env=_default_cache_env(),  # The default cache lives in the workdir: a missing one must stay missing.
    capture_output=True,
    text=True,
    timeout=train_worker.TIMEOUT_S,
    check=False,
  )
  assert process.returncode == 1, process.stderr[-3000:]
  assert "Traceback" not in process.stderr
  errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, process.stderr[-3000:]
  return errors[0]


def test_eval_mode_names_what_is_missing(run, tmp_path):
  line = _main_fails(run, run["workdir"], "7")
  assert "step 7" in line and run["workdir"] in line
  assert "checkpoints/ has steps [2, 4]" in line and f"best/ has steps {run['steps'][1]}" in line
  missing = tmp_path / "missing"
  line = _main_fails(run, str(missing), "latest")
  assert "FileNotFoundError" in line and "no latest checkpoint" in line and str(missing) in line
  assert "does not exist" in line
  assert not missing.exists()  # Evaluation creates nothing.


def _model_and_mesh():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from fcnet_jax import sharding  # pylint: disable=g-import-not-at-top
  from fcnet_jax.models import fcnet  # pylint: disable=g-import-not-at-top

  return fcnet.build_model(tiny.get_config().model), sharding.create_mesh()


def _raw_checkpoint(workdir: str, manager: str, step: int) -> dict:
  """Every array of a saved train state, keyed "params/…" / "batch_stats/…" / "opt_state/…"."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, manager, str(step), "default"))
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    flat["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf
  return flat


def test_checkpoints_resolve_latest_best_and_steps(run, tmp_path):
  from fcnet_jax import checkpoints as checkpoints_lib  # pylint: disable=g-import-not-at-top

  checkpoints = checkpoints_lib.Checkpoints(run["workdir"], read_only=True)
  best = run["steps"][1][0]
  resolved = {spec: checkpoints.resolve(spec) for spec in ("latest", "best", "2", 4, str(best))}
  assert {spec: step for spec, (_, step) in resolved.items()} == {
    "latest": 4,
    "best": best,
    "2": 2,
    4: 4,
    str(best): best,
  }
  assert resolved["best"][0] is checkpoints.best and resolved["latest"][0] is checkpoints.latest
  with pytest.raises(ValueError, match=r"'newest': expected 'latest', 'best' or a step number"):
    checkpoints.resolve("newest")
  checkpoints.close()
  empty = checkpoints_lib.Checkpoints(str(tmp_path), read_only=True)
  with pytest.raises(FileNotFoundError, match=r"no best checkpoint in .*checkpoints/ has steps none; best/ has"):
    empty.resolve("best")
  assert sorted(os.listdir(tmp_path)) == []  # Opening read-only created nothing.


def test_restore_for_inference_reads_params_and_batch_stats_of_the_chosen_step(run):
  """Evaluation restores a saved train state without its optimiser: params and BatchNorm statistics only."""
  from fcnet_jax import evaluate  # pylint: disable=g-import-not-at-top

  model, mesh = _model_and_mesh()
  best = run["steps"][1][0]
  for spec, manager, step in (("2", "checkpoints", 2), ("latest", "checkpoints", 4), ("best", "best", best)):
    state = evaluate.restore_for_inference(model, mesh, run["workdir"], spec)
    assert isinstance(state, evaluate.InferenceState) and int(state.step) == step
    saved = _raw_checkpoint(run["workdir"], manager, step)
    restored = {
      "/".join(str(k.key) for k in path): leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(
        {"params": state.params, "batch_stats": state.batch_stats}
      )[0]
    }
    assert set(restored) == {k for k in saved if k.split("/")[0] in ("params", "batch_stats")}
    for key, value in restored.items():
      assert value.sharding.is_fully_replicated
      np.testing.assert_array_equal(np.asarray(value), np.asarray(saved[key]), err_msg=key)
  # The two steps hold different parameters (so the comparison above tells them apart).
  two, four = _raw_checkpoint(run["workdir"], "checkpoints", 2), _raw_checkpoint(run["workdir"], "checkpoints", 4)
  assert any(not np.array_equal(two[k], four[k]) for k in two if k.startswith("params/"))


def _scores(miou: float) -> dict:
  return {"mIoU": miou, "oIoU": miou, **{f"prec@{t}": miou for t in ("0.5", "0.6", "0.7", "0.8", "0.9")}, "count": 1.0}


def test_best_checkpoint_is_chosen_by_the_first_split(tmp_path, monkeypatch):
  """The loop with two evaluation splits scored after every step; the scores are scripted so that val prefers
  step 1 and testA step 2: best/ must hold step 1. The model and its step are stand-ins (the loop's choices are
  under test): a 3-parameter state and a step that only counts."""

  from configs import tiny  # pylint: disable=g-import-not-at-top
  from fcnet_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from fcnet_jax import evaluate  # pylint: disable=g-import-not-at-top
  from fcnet_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from fcnet_jax import sharding  # pylint: disable=g-import-not-at-top
  from fcnet_jax import train  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()
  config.data.eval_splits = SPLITS
  config.num_train_steps, config.eval_every_steps, config.log_every_steps, config.checkpoint_every_steps = 2, 1, 1, 1
  scripted = {(1, "val"): 0.6, (1, "testA"): 0.1, (2, "val"): 0.3, (2, "testA"): 0.9}
  calls = iter([(step, split) for step in (1, 2) for split in SPLITS])  # The order the loop scores them in.

  def initial_state(config, model, tx, mesh):
    del config, model
    state = train.TrainState.create(
      apply_fn=None, params={"w": np.zeros(3, np.float32)}, tx=tx, batch_stats={}, dropout_rng=jax.random.key(0)
    )
    return sharding.replicate(state, mesh)

  def jit_train_step(config, model, mesh):
    del config, model, mesh
    metrics = metrics_lib.TrainMetrics.single_from_model_output(loss=np.float32(0.5), iou=np.ones(1, np.float32))
    return lambda state, batch: (state.replace(step=state.step + 1), metrics)

  def score(self, state, batches, **unused_kwargs):
    del self, state, batches
    step, split = next(calls)
    return _scores(scripted[(step, split)]), None

  monkeypatch.setattr(train, "initial_state", initial_state)
  monkeypatch.setattr(train, "jit_train_step", jit_train_step)
  monkeypatch.setattr(evaluate.Evaluator, "score", score)
  monkeypatch.setattr(data_lib.DataSource, "eval", lambda self, split: [])
  batch = {"image": np.zeros((config.batch_size, 1, 1, 3), np.uint8)}
  data = data_lib.DataSource(
    config, train_iter_fn=lambda start_step: iter([batch] * 2), split_sizes={"train": {"refs": 80}}
  )
  state, returned = train.train_and_evaluate(config, str(tmp_path), data=data)
  assert int(state.step) == 2 and returned == {split: _scores(scripted[(2, split)]) for split in SPLITS}
  assert train_worker.checkpoint_steps(str(tmp_path), "best") == [1]
  assert train_worker.checkpoint_steps(str(tmp_path), "checkpoints") == [1, 2]


# ------------------------------------------------------------------------------------------------------------
# What the run leaves behind.


def test_tensorboard_has_overlays_and_hparams(run):
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=g-import-not-at-top

  from input_pipeline import import_tensorflow  # pylint: disable=g-import-not-at-top

  tf = import_tensorflow()
  summaries = train_worker.read_summaries(run["workdir"])
  plugins = {value.tag: value.metadata.plugin_data.plugin_name for _, value in summaries}
  # Hyper-parameters: the flattened config, as the hparams plugin's session start.
  hparams = [
    value for _, value in summaries if plugins[value.tag] == "hparams" and value.tag == "_hparams_/session_start_info"
  ]
  assert len(hparams) == 1
  data = plugin_data_pb2.HParamsPluginData.FromString(hparams[0].metadata.plugin_data.content)
  logged = data.session_start_info.hparams
  assert logged["num_train_steps"].number_value == 4
  assert logged["model.hidden_dim"].number_value == 32
  assert logged["model.freeze_backbone_bn"].bool_value is True
  assert logged["lr_schedule"].string_value == "piecewise"
  # Overlays: per split and evaluation, 4 images of input | ground truth | prediction (64×192 RGB).
  for split in SPLITS:
    tag = f"eval/{split}/image|ground_truth|prediction"
    assert plugins.get(tag) == "images"
    images = {step: value for step, value in summaries if value.tag == tag}
    assert sorted(images) == [2, 4]
    encoded = images[4].tensor.string_val
    assert [int(encoded[0]), int(encoded[1])] == [192, 64] and len(encoded) == 2 + 4  # width, height, 4 PNGs
    for png in encoded[2:]:
      image = tf.io.decode_png(png).numpy().astype(int)
      assert image.shape == (64, 192, 3)
      left, truth = image[:, :64], image[:, 64:128]
      # Ground truth tints the object green: G rises, R and B fall on some pixels, and nowhere else changes.
      changed = np.any(np.abs(truth - left) > 2, axis=-1)
      assert changed.any() and not changed.all()
      assert np.all(truth[changed][:, 1] >= left[changed][:, 1] - 1)
      assert np.all(truth[changed][:, 0] <= left[changed][:, 0] + 1)


def test_profile_steps_writes_a_trace(run):
  traces = glob.glob(os.path.join(run["workdir"], "plugins", "profile", "*", "*.xplane.pb"))
  assert traces and all(os.path.getsize(path) > 0 for path in traces)


def test_freeze_backbone_bn_keeps_the_backbone_statistics(run):
  """Trained with `freeze_backbone_bn`: the image encoder's BatchNorm statistics are still their initial values
  (mean 0, variance 1), while the neck's (not frozen) moved."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  state = ocp.StandardCheckpointer().restore(os.path.join(run["workdir"], "checkpoints", "4", "default"))
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["batch_stats"])[0]
  }
  backbone = {k: v for k, v in flat.items() if k.startswith("image_encoder/")}
  others = {k: v for k, v in flat.items() if not k.startswith("image_encoder/")}
  assert len(backbone) > 10 and len(others) > 4
  for name, value in backbone.items():
    np.testing.assert_array_equal(
      value, np.zeros_like(value) if name.endswith("mean") else np.ones_like(value), err_msg=name
    )
  assert all(
    not np.array_equal(v, np.zeros_like(v) if k.endswith("mean") else np.ones_like(v)) for k, v in others.items()
  )


def test_eval_with_cris_letterbox_reports_both_protocols(run, tmp_path):
  """`--config.data.letterbox=cris` runs CRIS's preprocessing through the real pipeline and evaluation; both
  protocols' metrics reach eval_<split>.json and the printed table."""
  log = tmp_path / "eval_cris.log"
  command = run["command"](
    run["workdir"],
    "--mode=eval",
    "--checkpoint=latest",
    "--config.data.letterbox=cris",
    "--config.eval_shuffled_control=false",
  )
  train_worker.run_checked(command, str(log), train_worker.TIMEOUT_S)
  scores = _eval_jsons_plain(run["workdir"])
  for split in SPLITS:
    for prefix in ("", "cris/"):
      assert 0.0 <= scores[split][f"{prefix}mIoU"] <= 1.0
  header = next(line for line in log.read_text().splitlines() if line.startswith("split"))
  assert "cris/mIoU" in header and "cris/prec@0.5" in header


def _eval_jsons_plain(workdir: str) -> dict:
  out = {}
  for split in SPLITS:
    with open(os.path.join(workdir, f"eval_{split}.json")) as f:
      out[split] = json.load(f)
  return out
