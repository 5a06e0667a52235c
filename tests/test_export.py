"""Exported models (fcnet_jax/export.py, fcnet_jax/tools/export.py) of the shared trained tiny run.

orbax       written by the CLI; `pretrained.load` of it gives the workdir's best checkpoint bit for bit (fp32)
            and close logits (bf16); its card carries the run's metrics; `main.py --mode=eval --checkpoint=<it>`
            scores it as the training run did; `config.init_from=<it>` sets every parameter and BatchNorm
            statistic of a new train state (`train.create_train_state`).
stablehlo,  each loaded in its own runtime in a subprocess that imports nothing of fcnet_jax (jax alone,
savedmodel, TensorFlow alone, onnxruntime alone) and run at two batch sizes (symbolic batch); the logits must match
onnx        the jitted model on the same inputs: max|ours − ref| / max|ref| ≤ 1e-4.
"""

import json
import os
import sys

import flax
import jax
import numpy as np
import optax
import pytest

from fcnet_jax import export
from fcnet_jax import image_ops
from fcnet_jax import letterbox
from fcnet_jax import pretrained
from fcnet_jax import run_config
from fcnet_jax import tokenizer
from fcnet_jax import train
import train_worker

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

TOLERANCE = 1e-4
BATCHES = (1, 3)
TIMEOUT_S = 600
# Each runtime on its own: the script must not import fcnet_jax (checked at its end).
RUNTIME_SCRIPTS = {
  "stablehlo": """
import jax
exported = jax.export.deserialize(bytearray(open(f"{directory}/model.stablehlo", "rb").read()))
run = lambda image, tokens: np.asarray(exported.call(image, tokens))
""",
  "savedmodel": """
import tensorflow as tf
serve = tf.saved_model.load(f"{directory}/saved_model").signatures["serving_default"]
run = lambda image, tokens: serve(image=tf.constant(image), tokens=tf.constant(tokens))["logits"].numpy()
""",
  "onnx": """
import onnxruntime
session = onnxruntime.InferenceSession(f"{directory}/model.onnx", providers=["CPUExecutionProvider"])
run = lambda image, tokens: session.run(["logits"], {"image": image, "tokens": tokens})[0]
""",
}
RUNNER = """
import sys
import numpy as np
directory, inputs, outputs = sys.argv[1:4]
{body}
data = np.load(inputs)
np.savez(outputs, **{{key: run(data["image_" + key], data["tokens_" + key]) for key in ("a", "b")}})
assert not any(name.startswith("fcnet_jax") for name in sys.modules), "the runtime imported fcnet_jax"
"""


def _relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def loaded(trained_tiny_workdir):
  return pretrained.load(trained_tiny_workdir.workdir, "best")


@pytest.fixture(scope="module")
def inputs(loaded):
  """Two batches (BATCHES) of real preprocessed inputs: letterboxed random images and tokenized sentences."""
  rng = np.random.default_rng(0)
  out = {}
  for key, batch in zip("ab", BATCHES):
    sentences = ["the man on the left", "a red car", "left zebra behind the tall one"][:batch]
    image = rng.integers(0, 256, (50 + 17 * batch, 90, 3), np.uint8)
    prepared = export.preprocess(image, sentences, loaded.config)
    prepared.image[1:] = rng.integers(0, 256, prepared.image[1:].shape)  # Distinct images within a batch.
    out[key] = prepared
  return out


@pytest.fixture(scope="module")
def reference(loaded, inputs):
  """The jitted model's logits for `inputs` (normalised here, independently of the export's function)."""
  variables = {"params": loaded.state.params, "batch_stats": loaded.state.batch_stats}

  @jax.jit
  def logits(image, tokens):
    return loaded.model.apply(variables, image_ops.normalize_images(image), tokens, train=False)

  return {key: np.asarray(logits(p.image, p.tokens)) for key, p in inputs.items()}


def test_preprocess_matches_the_letterbox_and_tokenizer(loaded):
  image = np.random.default_rng(1).integers(0, 256, (30, 70, 3), np.uint8)
  prepared = export.preprocess(image, ["a dog", "the cat on the right"], loaded.config)
  size, length = loaded.config.model.image_size, loaded.config.model.context_length
  canvas, resized_hw, top_left = letterbox.letterbox_image(image, size, loaded.config.data.letterbox)
  assert prepared.image.shape == (2, size, size, 3) and prepared.image.dtype == np.float32
  np.testing.assert_array_equal(prepared.image[0], canvas.astype(np.float32))
  np.testing.assert_array_equal(prepared.image[1], prepared.image[0])
  np.testing.assert_array_equal(prepared.tokens, tokenizer.tokenize(["a dog", "the cat on the right"], length))
  assert (prepared.original_hw, prepared.resized_hw, prepared.top_left) == ((30, 70), resized_hw, top_left)
  # The Predictor's sentence checks: nothing to segment for is an error, not a mask for [SOS][EOS].
  for blank in ("", "&nbsp;"):
    with pytest.raises(ValueError, match=r"sentences\[1\] is empty"):
      export.preprocess(image, ["a dog", blank], loaded.config)


@pytest.mark.parametrize("fmt", ["stablehlo", "savedmodel", "onnx"])
def test_export_runs_in_its_own_runtime(fmt, loaded, inputs, reference, trained_tiny_workdir, tmp_path):
  out = export.export(trained_tiny_workdir.workdir, fmt, tmp_path / fmt, loaded=loaded)
  signature = json.loads((out / export.SIGNATURE_FILE).read_text())
  size, length = loaded.config.model.image_size, loaded.config.model.context_length
  assert signature["inputs"][0]["shape"] == [export.BATCH_DIM, size, size, 3]
  assert signature["inputs"][1]["shape"] == [export.BATCH_DIM, length]
  assert signature["outputs"][0]["shape"] == [export.BATCH_DIM, size // 4, size // 4]
  assert run_config.load(out).to_dict() == loaded.config.to_dict()
  assert not list(tmp_path.glob(".*tmp*")), "a temporary directory was left behind"
  arrays = {f"{name}_{key}": getattr(p, name) for key, p in inputs.items() for name in ("image", "tokens")}
  np.savez(tmp_path / "inputs.npz", **arrays)
  script = tmp_path / "runner.py"
  script.write_text(RUNNER.format(body=RUNTIME_SCRIPTS[fmt]))
  command = [sys.executable, str(script), str(out), str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")]
  train_worker.run_checked(command, str(tmp_path / "runner.log"), TIMEOUT_S)
  outputs = np.load(tmp_path / "out.npz")
  for key, batch in zip("ab", BATCHES):
    assert outputs[key].shape == reference[key].shape == (batch, size // 4, size // 4)
    assert outputs[key].dtype == np.float32
    assert _relative_error(outputs[key], reference[key]) <= TOLERANCE, (fmt, key)
  if fmt != "savedmodel":  # The in-process loader reads the same file (TensorFlow stays out of this process).
    np.testing.assert_allclose(export.load(out)(inputs["a"].image, inputs["a"].tokens), outputs["a"], atol=1e-6)


@pytest.fixture(scope="module")
def orbax_exports(trained_tiny_workdir, tmp_path_factory):
  """fp32 and bf16 orbax exports of the best checkpoint, written by the CLI (one process)."""
  root = tmp_path_factory.mktemp("orbax")
  outs = {dtype: root / dtype for dtype in ("float32", "bfloat16")}
  code = (
    "import sys; from absl import flags; from fcnet_jax.tools import export as tool; tool.define_flags(); "
    "[(flags.FLAGS(['x', f'--checkpoint={sys.argv[1]}', '--format=orbax', f'--out={out}', f'--dtype={dtype}']), "
    "tool.main(['x'])) for dtype, out in zip(('float32', 'bfloat16'), sys.argv[2:])]"
  )
  command = [sys.executable, "-c", code, trained_tiny_workdir.workdir, str(outs["float32"]), str(outs["bfloat16"])]
  train_worker.run_checked(command, str(root / "export.log"), TIMEOUT_S)
  return outs


def test_orbax_export_restores_the_checkpoint(orbax_exports, loaded, inputs, reference, trained_tiny_workdir):
  fp32 = pretrained.load(orbax_exports["float32"])
  assert fp32.step == loaded.step and pretrained.is_exported(orbax_exports["float32"])
  assert fp32.config.to_dict() == loaded.config.to_dict()
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), fp32.state.params, loaded.state.params)
  assert all(jax.tree.leaves(same))
  stats = jax.tree.map(lambda a, b: np.array_equal(a, b), fp32.state.batch_stats, loaded.state.batch_stats)
  assert jax.tree.leaves(stats) and all(jax.tree.leaves(stats))
  logits = export.inference_function(fp32.model, {"params": fp32.state.params, "batch_stats": fp32.state.batch_stats})
  np.testing.assert_array_equal(np.asarray(jax.jit(logits)(inputs["b"].image, inputs["b"].tokens)), reference["b"])

  bf16 = pretrained.load(orbax_exports["bfloat16"])
  info = pretrained.model_info(orbax_exports["bfloat16"])
  assert info["dtype"] == "bfloat16" and info["step"] == loaded.step
  variables = {"params": bf16.state.params, "batch_stats": bf16.state.batch_stats}
  logits = np.asarray(jax.jit(export.inference_function(bf16.model, variables))(inputs["b"].image, inputs["b"].tokens))
  assert 0 < _relative_error(logits, reference["b"]) < 0.05

  # The card and model.json carry the run's evaluation metrics (eval_<split>.json of the workdir).
  with open(os.path.join(trained_tiny_workdir.workdir, "eval_val.json")) as f:
    val = json.load(f)
  card = (orbax_exports["float32"] / "README.md").read_text()
  metrics = pretrained.model_info(orbax_exports["float32"])["metrics"]
  if val["step"] == loaded.step:  # Otherwise the run never scored the best step last: no metrics of that step.
    assert f"| val | {100 * val['mIoU']:.2f} |" in card
    assert metrics["val"]["mIoU"] == val["mIoU"] and metrics["testA"]["step"] == loaded.step
  else:
    assert "val" not in metrics
  sizes = {
    d: sum(f.stat().st_size for f in (p / "variables").rglob("*") if f.is_file()) for d, p in orbax_exports.items()
  }
  assert sizes["bfloat16"] < 0.75 * sizes["float32"], sizes
  with pytest.raises(ValueError, match="exported model of step"):
    pretrained.load(orbax_exports["float32"], loaded.step + 1)


def test_eval_mode_scores_the_orbax_export(orbax_exports, trained_tiny_workdir, loaded, tmp_path):
  workdir = tmp_path / "eval"
  command = train_worker.main_command(
    str(workdir), trained_tiny_workdir.dataset.tfrecord_dir, "--mode=eval", f"--checkpoint={orbax_exports['float32']}"
  )
  command.remove("--config=configs/tiny.py")  # The exported model's config.json is the configuration.
  train_worker.run_checked(command, str(tmp_path / "eval.log"), TIMEOUT_S)
  with open(workdir / "eval_val.json") as f:
    scores = json.load(f)
  assert scores["step"] == loaded.step
  # The best checkpoint evaluated by the training run itself, when it was the last step (eval_val.json is step 4's).
  with open(os.path.join(trained_tiny_workdir.workdir, "eval_val.json")) as f:
    trained = json.load(f)
  assert scores["count"] == trained["count"] > 0
  if trained["step"] == loaded.step:
    assert scores["mIoU"] == pytest.approx(trained["mIoU"], abs=1e-6)
    assert scores["oIoU"] == pytest.approx(trained["oIoU"], abs=1e-6)


def test_init_from_orbax_export_sets_every_variable(orbax_exports, loaded):
  config = run_config.load(orbax_exports["float32"])
  config.init_from = str(orbax_exports["float32"])
  tx = train.create_optimizer(config, optax.constant_schedule(1e-4))
  state = train.create_train_state(config, loaded.model, jax.random.key(7), tx)
  flat = lambda tree: flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
  for name in ("params", "batch_stats"):
    got, want = flat(getattr(state, name)), flat(getattr(loaded.state, name))
    assert got.keys() == want.keys() and want
    different = [k for k in want if not np.array_equal(np.asarray(got[k]), np.asarray(want[k]))]
    assert not different, (name, different[:5])


def test_bad_requests_fail_before_loading(tmp_path):
  (tmp_path / "out").mkdir()
  with pytest.raises(FileExistsError, match="--overwrite"):
    export.export(tmp_path / "no_model", "stablehlo", tmp_path / "out")
  with pytest.raises(ValueError, match="--format='tflite'"):
    export.export(tmp_path / "no_model", "tflite", tmp_path / "new")
  with pytest.raises(ValueError, match="--dtype='bfloat16' is for --format=orbax"):
    export.export(tmp_path / "no_model", "onnx", tmp_path / "new", dtype="bfloat16")
  with pytest.raises(FileNotFoundError, match="neither a training workdir"):
    export.export(tmp_path / "no_model", "onnx", tmp_path / "new")
  assert not (tmp_path / "new").exists()
