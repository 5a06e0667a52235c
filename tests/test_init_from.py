"""The paper's setup end to end (sec. 4.1): encoders from CLIP, everything else fresh, encoders at lr × lr_multi.

One path, as a user takes it, each step a separate process:

  a random CLIP in OpenAI's layout (open_clip modules at the tiny config's widths) → torch.save'd to a .pt
  → `python -m fcnet_jax.tools.convert_clip` → `python main.py --config.init_from=<converted>` for one step at
  learning rate LR with lr_multi 0.1.

The start of that step is rebuilt in this process the way training builds it (`train.create_train_state` with
`config.init_from`): it must hold the converted encoders (checked against the converter's output and against the
OpenAI names; positional embeddings fitted as the converter's report says: the first L text positions, the
attention-pool grid resized bicubically as PyTorch does) and, in every other module, the fresh initialisation of
`config.seed`. main.py's checkpoint after its one step must then be that start moved by exactly one Adam update
from zero moments: the head by −LR·m̂/(√v̂ + ε), the encoders by lr_multi times that, with the moments the step itself
recorded, so the run provably started from the rebuilt state. (One run instead of a learning-rate-0 run plus this
one: the same checks, one process less.)

The tiny config's text tower is 32 wide with 4 heads; CLIP's heads are 64 wide, so the run and the converter use
a 64-wide text tower with one head. The backbone BatchNorm is frozen (config.model.freeze_backbone_bn), so the
converted running statistics survive the step and are compared in main.py's checkpoint directly.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import flax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch.nn.functional as F  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position
from fcnet_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from fcnet_jax.models import fcnet  # pylint: disable=g-import-not-at-top,wrong-import-position
from fcnet_jax.weights import clip  # pylint: disable=g-import-not-at-top,wrong-import-position
import reference_impls  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_worker  # pylint: disable=g-import-not-at-top,wrong-import-position

# pycocotools (synthetic data / converter) warns once per decoded mask under NumPy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

LR, LR_MULTI = 1e-2, 0.1
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # optax.adam's defaults, which create_optimizer uses.
TIMEOUT_S = 600
# configs/tiny.py as every process here uses it: CLIP's 64-wide heads in the text tower, the backbone BatchNorm
# frozen, and plain Adam at a constant rate (spelled out, so that the Adam arithmetic below stays right).
OVERRIDES = {
  "model.text_width": 64,
  "model.text_heads": 1,
  "model.freeze_backbone_bn": True,
  "lr_schedule": "piecewise",
  "warmup_steps": 0,
  "weight_decay": 0.0,
  "grad_clip_norm": 0.0,
}
OVERRIDE_FLAGS = tuple(f"--config.{k}={v}" for k, v in OVERRIDES.items())


def tiny_clip_config():
  config = tiny.get_config()
  config.update_from_flattened_dict(OVERRIDES)
  return config


def initial_variables(init_from: str = "") -> dict:
  """What training starts from (`train.create_train_state`, seeded as `train.initial_state` seeds it; with
  `init_from`, the converted encoders loaded into it), flattened. Computed in this process, which has the workers'
  XLA flags and environment (tests/conftest.py): the program main.py runs, so the same bits (and a
  compilation-cache hit)."""
  config = tiny_clip_config()
  config.init_from = init_from
  tx = train.create_optimizer(config, train.create_learning_rate_fn(config, 1, 1))
  state = train.create_train_state(config, fcnet.build_model(config.model), jax.random.key(config.seed, impl="rbg"), tx)
  return _flat(jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))


def _flat(tree) -> dict:
  """{"params/text_encoder/ln_final/scale": NumPy array, ...} of a nested dict."""
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}


def _restore(workdir: str) -> dict:
  """The raw tree (no target: nothing of the train state's classes needed) of the only checkpoint in workdir."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  root = os.path.join(workdir, "checkpoints")
  steps = [name for name in os.listdir(root) if name.isdigit()]
  assert steps == ["1"], steps
  items = [
    os.path.join(root, "1", name)
    for name in os.listdir(os.path.join(root, "1"))
    if os.path.isdir(os.path.join(root, "1", name))
  ]
  assert len(items) == 1, items
  return ocp.StandardCheckpointer().restore(items[0])


def _adam_moments(opt_state) -> dict:
  """{"mu"|"nu"|"count": {param path: array}} from a restored optimiser state of any nesting (chain,
  multi_transform, masks): a leaf's path ends in the parameter's path after the moment's name."""
  moments = {"mu": {}, "nu": {}, "count": {}}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    for name in ("mu", "nu"):
      if name in keys:
        moments[name]["/".join(keys[keys.index(name) + 1 :])] = np.asarray(leaf)
    if keys[-1] == "count":
      moments["count"]["/".join(keys)] = np.asarray(leaf)
  return moments


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
  """The converted checkpoint, its inputs, main.py's checkpoint after one step, and the start states."""
  root = tmp_path_factory.mktemp("init_from")
  config = tiny_clip_config()
  assert not config.init_from
  m = config.model
  _, _, state_dict = reference_impls.random_clip(
    m.vision_layers,
    vision_width=m.vision_width,
    embed_dim=m.embed_dim,
    text_width=m.text_width,
    text_layers=m.text_layers,
    vocab_size=m.vocab_size,
    seed=0,
  )
  src = str(root / "clip.pt")
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, src)
  converted = str(root / "converted")
  env = train_worker.subprocess_env()
  train_worker.run_checked(
    [
      sys.executable,
      "-m",
      "fcnet_jax.tools.convert_clip",
      f"--src={src}",
      f"--out={converted}",
      "--config=configs/tiny.py",
      *OVERRIDE_FLAGS,
    ],
    str(root / "convert.log"),
    TIMEOUT_S,
    env=env,
  )
  workdir = str(root / "run")
  command = train_worker.main_command(
    workdir,
    tiny_dataset.tfrecord_dir,
    *OVERRIDE_FLAGS,
    f"--config.init_from={converted}",
    "--config.num_train_steps=1",
    "--config.checkpoint_every_steps=1",
    "--config.log_every_steps=1",
    f"--config.learning_rate={LR}",
    f"--config.lr_multi={LR_MULTI}",
  )
  train_worker.run_checked(command, str(root / "run.log"), TIMEOUT_S, env=env)
  return {
    "state_dict": state_dict,
    "converted": converted,
    "after": _restore(workdir),
    "start": initial_variables(converted),
    "fresh": initial_variables(),
  }


def test_positional_embeddings_fitted_as_reported(runs):
  with open(os.path.join(runs["converted"], "report.json")) as f:
    resized = {path: how for path, _, _, how in json.load(f)["load_preview"]["resized"]}
  assert resized == {
    "params/text_encoder/positional_embedding": "first 8 of 77 positions",
    "params/image_encoder/attnpool/positional_embedding": "7×7 grid resized to 2×2, PyTorch bicubic",
  }
  start = runs["start"]
  np.testing.assert_array_equal(
    start["params/text_encoder/positional_embedding"], runs["state_dict"]["positional_embedding"][:8]
  )
  grid = torch.from_numpy(runs["state_dict"]["visual.attnpool.positional_embedding"][1:]).double()  # No class pos.
  ref = F.interpolate(grid.T.reshape(1, -1, 7, 7), size=(2, 2), mode="bicubic", align_corners=False)
  ref = ref.reshape(ref.shape[1], -1).T.numpy()
  ours = start["params/image_encoder/attnpool/positional_embedding"]
  assert np.abs(ours - ref).max() <= 1e-6 * np.abs(ref).max()


def test_encoders_are_the_converted_weights(runs):
  converted = _flat(clip.restore_converted(runs["converted"]))
  start = runs["start"]
  fitted = {"params/text_encoder/positional_embedding", "params/image_encoder/attnpool/positional_embedding"}
  assert len(converted) > 50 and fitted < set(converted)
  for path in set(converted) - fitted:
    np.testing.assert_array_equal(start[path], converted[path], err_msg=path)
  # Anchored to the OpenAI names too, not only to our converter's output.
  sd = runs["state_dict"]
  np.testing.assert_array_equal(
    start["params/image_encoder/stem1/conv/kernel"], sd["visual.conv1.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(start["params/text_encoder/token_embedding/embedding"], sd["token_embedding.weight"])
  np.testing.assert_array_equal(
    start["params/text_encoder/resblocks_1/c_fc/kernel"], sd["transformer.resblocks.1.mlp.c_fc.weight"].T
  )
  # The frozen backbone's running statistics in main.py's own checkpoint: CLIP's, untouched by the step.
  after = _flat({"batch_stats": runs["after"]["batch_stats"]})
  np.testing.assert_array_equal(
    after["batch_stats/image_encoder/layer4_0/conv3/bn/var"], sd["visual.layer4.0.bn3.running_var"]
  )
  backbone_stats = [p for p in converted if p.startswith("batch_stats/image_encoder/")]
  assert len(backbone_stats) > 10
  for path in backbone_stats:
    np.testing.assert_array_equal(after[path], converted[path], err_msg=path)


def test_other_modules_keep_their_fresh_initialisation(runs):
  fresh, start = runs["fresh"], runs["start"]
  converted = _flat(clip.restore_converted(runs["converted"]))
  assert set(start) == set(fresh)
  new = [p for p in fresh if p not in converted]
  assert {p.split("/")[1] for p in new} >= {"image_encoder", "neck", "decoder"} and len(new) > 20
  for path in new:
    np.testing.assert_array_equal(start[path], fresh[path], err_msg=path)
  # The check can fail: the converted encoders are not what this seed initialises.
  assert not np.allclose(fresh["params/text_encoder/ln_final/scale"], start["params/text_encoder/ln_final/scale"])


def test_optimizer_state_holds_one_update_from_zero(runs):
  """After one step from zero moments, mu = (1 − β1)·g and nu = (1 − β2)·g², so mu² = 10·nu for every
  parameter and every count is 1; moments or counts carried over from anywhere else break this."""
  moments = _adam_moments(runs["after"]["opt_state"])
  params = _flat(runs["after"]["params"])
  assert set(moments["mu"]) == set(moments["nu"]) == set(params)
  assert moments["count"] and all(int(c) == 1 for c in moments["count"].values()), moments["count"]
  for path, mu in moments["mu"].items():
    nu = moments["nu"][path].astype(np.float64)
    np.testing.assert_allclose(
      mu.astype(np.float64) ** 2, (1 - ADAM_B1) ** 2 / (1 - ADAM_B2) * nu, rtol=1e-5, atol=1e-30, err_msg=path
    )
  assert sum(int(np.count_nonzero(mu)) for mu in moments["mu"].values()) > 10_000  # Real gradients, not zeros.


def test_encoder_updates_are_lr_multi_times_adam(runs):
  after = _flat(runs["after"]["params"])
  start = {path[len("params/") :]: value for path, value in runs["start"].items() if path.startswith("params/")}
  moments = _adam_moments(runs["after"]["opt_state"])
  converted = _flat(clip.restore_converted(runs["converted"])["params"])
  encoder_paths = {p for p in after if p.split("/")[0] in ("image_encoder", "text_encoder")}
  assert encoder_paths > set(converted)  # The converted encoders, plus the attention pool's residual branch.
  moved = {"encoder": 0, "head": 0}
  for path in after:
    mu_hat = moments["mu"][path].astype(np.float64) / (1 - ADAM_B1)
    nu_hat = moments["nu"][path].astype(np.float64) / (1 - ADAM_B2)
    adam = -LR * mu_hat / (np.sqrt(nu_hat) + ADAM_EPS)  # Adam's first update, no multiplier.
    multiplier = LR_MULTI if path in encoder_paths else 1.0
    delta = after[path].astype(np.float64) - start[path]
    rounding = 4 * np.spacing(np.maximum(np.abs(after[path]), np.abs(start[path])))
    np.testing.assert_array_less(
      np.abs(delta - multiplier * adam), rounding + 1e-5 * np.abs(adam) + 1e-12, err_msg=path
    )
    moved["encoder" if path in encoder_paths else "head"] += int(np.count_nonzero(delta))
  assert moved["encoder"] > 1000 and moved["head"] > 1000, moved
