"""FCNet model tests on the tiny config: shapes, gradients, text masking, precision, resolution checks."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from configs import tiny
from fcnet_jax.models import fcnet
from fcnet_jax.models import image_encoder
from fcnet_jax.models import layers
from fcnet_jax.tools import summary
from fcnet_jax.tools.benchmark import inputs

SOS, EOS = 49406, 49407


def make_tokens(rng: np.random.Generator, batch: int, length: int, lengths=None) -> np.ndarray:
  """Random CLIP-like token rows: [SOS] words [EOS] then zero padding."""
  tokens = np.zeros((batch, length), np.int32)
  for b in range(batch):
    n = lengths[b] if lengths is not None else rng.integers(1, length - 1)
    tokens[b, 0] = SOS
    tokens[b, 1 : n + 1] = rng.integers(1, 49000, n)
    tokens[b, n + 1] = EOS
  return tokens


def tiny_model(**overrides) -> fcnet.FCNet:
  cfg = tiny.get_config().model
  cfg.update(overrides)
  return fcnet.build_model(cfg)


def init(model, batch=2, seed=0):
  """Random variables for `model` and random inputs. The variables are drawn on the host with fan-in scales
  (`fcnet_jax.tools.benchmark.inputs.random_variables`), not by the model's initialisers: a jitted `model.init`
  compiles for 15 s per model variant on 2 cores, and these tests are about the forward and backward computation.
  `model_init` is the model's own initialisation."""
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(batch, model.image_size, model.image_size, 3)), jnp.float32)
  tokens = jnp.asarray(make_tokens(rng, batch, model.context_length))
  return inputs.random_variables(summary.abstract_variables(model), seed), images, tokens


def model_init(*models, seed=0):
  """The models' own initialisations from one key, in one compiled program (op by op it costs tens of seconds of
  dispatch on 2 cores; XLA merges the random draws the models share, so two models compile ~40% faster together)."""
  images = jnp.zeros((1, models[0].image_size, models[0].image_size, 3), jnp.float32)
  tokens = jnp.zeros((1, models[0].context_length), jnp.int32)
  return jax.jit(lambda rng: [model.init(rng, images, tokens, train=False) for model in models])(jax.random.key(seed))


def abstract_init(model, batch=2):
  images = jax.ShapeDtypeStruct((batch, model.image_size, model.image_size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((batch, model.context_length), jnp.int32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images, tokens)
  return variables, images, tokens


@pytest.mark.parametrize(
  "overrides",
  [
    {},
    {"num_emphasis": 1},
    {"num_emphasis": 16},
    {"use_egm": False},
    {"use_ecm": False},
    {"egm_layernorm": False},
    {"calibration_gate": "sigmoid"},
    {"calibration_gate": "softmax"},
    {"egm_heads": 2, "egm_query_init_scale": 4.0, "text_embed_init_std": 1.0},
  ],
)
def test_intermediate_shapes(overrides):
  model = tiny_model(**overrides)
  variables, images, tokens = abstract_init(model)
  s, c, n_k, b = model.image_size, model.hidden_dim, model.num_emphasis, 2
  apply = lambda *args, **kw: jax.eval_shape(functools.partial(model.apply, **kw), *args)  # shapes only
  f_v2, f_v3, f_v4 = apply(variables, images, method=fcnet.FCNet.encode_image)
  w = model.vision_width
  assert f_v2.shape == (b, s // 8, s // 8, w * 8)  # stage 2: planes 2w, ×4 expansion
  assert f_v3.shape == (b, s // 16, s // 16, w * 4 * 4)
  assert f_v4.shape == (b, s // 32, s // 32, model.embed_dim)
  f_t, eos, padding = apply(variables, tokens, method=fcnet.FCNet.encode_text)
  assert f_t.shape == (b, model.context_length, model.text_width)
  assert eos.shape == (b, model.embed_dim)
  assert padding.shape == (b, model.context_length) and padding.dtype == jnp.bool_
  logits, state = apply(variables, images, tokens, train=False, mutable=["intermediates"])
  assert logits.shape == (b, s // 4, s // 4) and logits.dtype == jnp.float32
  inter = {k: v[0].shape for k, v in state["intermediates"].items() if not isinstance(v, dict)}
  assert inter["F_v"] == (b, s // 16, s // 16, c)
  assert inter["F_q"] == (b, s // 16, s // 16, c)
  if model.use_egm:
    assert inter["F_e"] == (b, n_k, c)
    assert ("F_c" in inter) == model.use_ecm
    if model.use_ecm:
      assert inter["F_c"] == (b, n_k, c)
      alpha = state["intermediates"]["emphasis_calibration"]["alpha"][0]
      assert alpha.shape == (b, n_k)
  else:
    assert "F_e" not in inter and "emphasis_generation" not in variables["params"]


def test_ecm_off_means_calibrated_equals_emphasis():
  model = tiny_model(use_ecm=False)
  variables, images, tokens = abstract_init(model)
  assert "emphasis_calibration" not in variables["params"]
  _, state = jax.eval_shape(functools.partial(model.apply, mutable=["intermediates"]), variables, images, tokens)
  assert "F_c" not in state["intermediates"] and "F_e" in state["intermediates"]


@pytest.mark.parametrize("gate", ["none", "sigmoid", "softmax"])
def test_calibration_adds_weighted_emphasis(gate):
  """F_c = F_e + α ⊙ F_e (sec. 3.3), with α gated as configured."""
  model = tiny_model(calibration_gate=gate)
  variables, images, tokens = init(model)
  _, state = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))(variables, images, tokens)
  inter = state["intermediates"]
  f_e, f_c, alpha = inter["F_e"][0], inter["F_c"][0], inter["emphasis_calibration"]["alpha"][0]
  np.testing.assert_allclose(f_c, f_e * (1 + alpha[..., None]), rtol=1e-5, atol=1e-6)
  if gate == "softmax":
    np.testing.assert_allclose(np.asarray(alpha).sum(-1), 1.0, rtol=1e-5)
  elif gate == "sigmoid":
    assert np.all((np.asarray(alpha) > 0) & (np.asarray(alpha) < 1))


@pytest.mark.parametrize("overrides", [{}, {"use_egm": False}])
def test_every_parameter_gets_gradient(overrides):
  model = tiny_model(**overrides)
  variables, images, tokens = init(model, batch=4)
  target = (jax.random.uniform(jax.random.key(3), (4, 16, 16)) > 0.5).astype(jnp.float32)

  def loss_fn(params):
    logits, _ = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      images,
      tokens,
      train=True,
      rngs={"dropout": jax.random.key(1)},
      mutable=["batch_stats"],
    )
    return jnp.mean((jax.nn.sigmoid(logits) - target) ** 2)

  grads = jax.jit(jax.grad(loss_fn))(variables["params"])
  flat = flax.traverse_util.flatten_dict(grads, sep="/")
  dead = [name for name, g in flat.items() if not np.any(np.asarray(g) != 0)]
  if not model.use_egm:
    # The CRIS-like baseline reads only the words; the sentence feature (EOS · text_projection) feeds the ECM.
    dead.remove("text_encoder/text_projection")
  assert not dead, f"parameters without gradient: {dead}"


def test_init_scales_multiply_the_default_init():
  # egm_query_init_scale and text_embed_init_std rescale the same random draws; every other parameter is unchanged.
  shapes = lambda model: jax.tree.map(lambda x: x.shape, summary.abstract_variables(model))
  base_model, scaled_model = tiny_model(), tiny_model(egm_query_init_scale=4.0, text_embed_init_std=0.1)
  assert shapes(base_model) == shapes(scaled_model)
  base, scaled = model_init(base_model, scaled_model)
  flat = lambda v: flax.traverse_util.flatten_dict(v["params"], sep="/")
  base, scaled = flat(base), flat(scaled)
  query = "emphasis_generation/cross_attn/query/kernel"
  embed = "text_encoder/token_embedding/embedding"
  np.testing.assert_allclose(scaled[query], 4.0 * base[query], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(scaled[embed], 5.0 * base[embed], rtol=1e-5, atol=1e-7)
  for name in base:
    if name not in (query, embed):
      np.testing.assert_array_equal(scaled[name], base[name], err_msg=name)


def test_padding_after_eos_leaves_outputs_unchanged():
  """Appending padding after [EOS] (a longer context) changes neither the words, the EOS feature nor the mask."""
  long_model = tiny_model(context_length=12)
  short_model = tiny_model(context_length=8)
  variables, images, _ = init(long_model)
  tokens_long = make_tokens(np.random.default_rng(1), 2, 12, lengths=[3, 6])
  tokens_short = tokens_long[:, :8]
  short_vars = flax.core.unfreeze(jax.tree.map(lambda x: x, variables))
  text = short_vars["params"]["text_encoder"]
  text["positional_embedding"] = text["positional_embedding"][:8]
  encode = lambda m, v, t: jax.jit(functools.partial(m.apply, method=fcnet.FCNet.encode_text))(v, t)
  f_t_l, eos_l, _ = encode(long_model, variables, tokens_long)
  f_t_s, eos_s, _ = encode(short_model, short_vars, tokens_short)
  np.testing.assert_allclose(f_t_l[:, :8], f_t_s, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(eos_l, eos_s, rtol=1e-5, atol=1e-5)
  for overrides in [{}, {"use_egm": False}]:
    long_m, short_m = tiny_model(context_length=12, **overrides), tiny_model(context_length=8, **overrides)
    v_long, _, _ = init(long_m)
    v_short = flax.core.unfreeze(jax.tree.map(lambda x: x, v_long))
    v_short["params"]["text_encoder"]["positional_embedding"] = v_long["params"]["text_encoder"][
      "positional_embedding"
    ][:8]
    out_l = jax.jit(long_m.apply)(v_long, images, tokens_long)
    out_s = jax.jit(short_m.apply)(v_short, images, tokens_short)
    np.testing.assert_allclose(out_l, out_s, rtol=1e-4, atol=1e-5)


def test_text_encoder_is_causal():
  model = tiny_model(context_length=8)
  variables, _, _ = init(model)
  encode = jax.jit(functools.partial(model.apply, method=fcnet.FCNet.encode_text))
  tokens = make_tokens(np.random.default_rng(2), 1, 8, lengths=[6])
  f_t, _, padding = encode(variables, tokens)
  np.testing.assert_array_equal(padding, [[False] * 8])  # [SOS] 6 words [EOS] fill the context
  for j in range(1, 7):
    changed = tokens.copy()
    changed[0, j] = (changed[0, j] + 17) % 49000 + 1
    f_t2, _, _ = encode(variables, changed)
    np.testing.assert_array_equal(f_t[:, :j], f_t2[:, :j])
    assert np.abs(np.asarray(f_t[:, j]) - np.asarray(f_t2[:, j])).max() > 1e-4  # position j does change


def test_eos_feature_is_taken_at_eos_position():
  model = tiny_model(context_length=8)
  variables, _, _ = init(model)
  tokens = make_tokens(np.random.default_rng(3), 2, 8, lengths=[2, 5])
  tokens[0, 5] = 0  # id 0 is also the real token "!"; only positions after [EOS] are padding
  f_t, eos, padding = jax.jit(functools.partial(model.apply, method=fcnet.FCNet.encode_text))(variables, tokens)
  np.testing.assert_array_equal(padding, np.arange(8)[None] > np.array([[3], [6]]))
  projection = variables["params"]["text_encoder"]["text_projection"]
  expected = np.stack([f_t[0, 3], f_t[1, 6]]) @ np.asarray(projection)
  np.testing.assert_allclose(eos, expected, rtol=1e-5, atol=1e-6)


def test_bf16_matches_fp32_under_jit():
  """bf16 compute (fp32 params) stays close to fp32: relative L2 error of the logits below 5%."""
  model32 = tiny_model(dtype="float32")
  model16 = tiny_model(dtype="bfloat16")
  variables, images, tokens = init(model32, batch=4)
  out32 = jax.jit(lambda v, x, t: model32.apply(v, x, t))(variables, images, tokens)
  out16 = jax.jit(lambda v, x, t: model16.apply(v, x, t))(variables, images, tokens)
  assert out16.dtype == jnp.float32  # logits are returned in fp32 for the loss
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract_init(model16)[0]))
  rel = np.linalg.norm(np.asarray(out16) - np.asarray(out32)) / np.linalg.norm(np.asarray(out32))
  assert rel < 0.05, rel
  # And bf16 is really in use: the results are not bit-identical.
  assert rel > 0


def test_resolution_check_raises_clear_error():
  model = tiny_model()
  variables, _, tokens = init(model)
  wrong = jnp.zeros((2, 96, 96, 3))
  with pytest.raises(ValueError, match=r"96×96 differs from config.model.image_size=64"):
    jax.eval_shape(model.apply, variables, wrong, tokens)
  with pytest.raises(ValueError, match="context_length"):
    jax.eval_shape(model.apply, variables, jnp.zeros((2, 64, 64, 3)), tokens[:, :5])


def test_bad_config_fields_are_named():
  cfg = tiny.get_config().model
  cfg.image_size = 100
  with pytest.raises(ValueError, match=r"config.model.image_size=100"):
    fcnet.build_model(cfg)
  cfg = tiny.get_config().model
  cfg.calibration_gate = "tanh"
  with pytest.raises(ValueError, match="calibration_gate"):
    fcnet.build_model(cfg)
  cfg = tiny.get_config().model
  cfg.egm_heads = 3
  with pytest.raises(ValueError, match="config.model.egm_heads=3"):
    fcnet.build_model(cfg)


def test_pos_embed_resize_identity_and_torch_bicubic():
  rng = np.random.default_rng(0)
  pos = rng.normal(size=(49, 6)).astype(np.float32)
  np.testing.assert_array_equal(image_encoder.resize_pos_embed(pos, (7, 7)), pos)
  torch = pytest.importorskip("torch")
  for grid in [(15, 15), (13, 13), (4, 4), (7, 7), (9, 5)]:
    ref = (
      torch.nn.functional.interpolate(
        torch.from_numpy(pos.astype(np.float64)).reshape(1, 7, 7, 6).permute(0, 3, 1, 2),
        size=grid,
        mode="bicubic",
        align_corners=False,
      )
      .permute(0, 2, 3, 1)
      .reshape(-1, 6)
      .numpy()
    )
    np.testing.assert_allclose(image_encoder.resize_pos_embed(pos, grid), ref, rtol=1e-5, atol=1e-6)


def test_sine_encoding_matches_formula():
  pe = layers.sine_position_encoding_2d(3, 5, 8).reshape(3, 5, 8)
  freqs = np.exp(np.arange(0, 4, 2) * -(np.log(10000.0) / 4))
  for y in range(3):
    for x in range(5):
      np.testing.assert_allclose(pe[y, x, 0:4:2], np.sin(x * freqs), atol=1e-6)
      np.testing.assert_allclose(pe[y, x, 1:4:2], np.cos(x * freqs), atol=1e-6)
      np.testing.assert_allclose(pe[y, x, 4::2], np.sin(y * freqs), atol=1e-6)
      np.testing.assert_allclose(pe[y, x, 5::2], np.cos(y * freqs), atol=1e-6)


def test_upsample_matches_torch_bilinear():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
  ref = (
    torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(0, 3, 1, 2), scale_factor=2, mode="bilinear", align_corners=False
    )
    .permute(0, 2, 3, 1)
    .numpy()
  )
  np.testing.assert_allclose(layers.upsample2x(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "config_fn,expected",
  [
    (default.get_config, 172_390_530),
  ],
)
def test_full_size_parameter_count(config_fn, expected):
  from fcnet_jax.tools import summary  # pylint: disable=g-import-not-at-top

  variables = summary.abstract_variables(fcnet.build_model(config_fn().model))
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])) == expected


def test_config_overrides_from_command_line():
  """`--config.model.num_emphasis=8` style overrides reach the model (absl + ml_collections config_flags)."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = (
    "from absl import app, flags\n"
    "from ml_collections import config_flags\n"
    "from fcnet_jax.models import fcnet\n"
    "config_flags.DEFINE_config_file('config')\n"
    "def main(_):\n"
    "  m = fcnet.build_model(flags.FLAGS.config.model)\n"
    "  print('RESULT', m.num_emphasis, m.use_ecm, m.context_length)\n"
    "app.run(main)\n"
  )
  out = subprocess.run(
    [
      sys.executable,
      "-c",
      script,
      "--config=configs/refcocog_r101.py",
      "--config.model.num_emphasis=8",
      "--config.model.use_ecm=False",
    ],
    cwd=root,
    capture_output=True,
    text=True,
    check=True,
    env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"},
  )
  assert "RESULT 8 False 22" in out.stdout, out.stdout + out.stderr


def test_mask_loss_is_bce_plus_weighted_dice_over_valid_examples():
  from fcnet_jax.models import mask_head  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(3)
  logits = rng.normal(0, 3, (4, 6, 5)).astype(np.float32)
  target = (rng.random((4, 6, 5)) > 0.8).astype(np.float32)
  target[1] = 0  # An empty object.
  weights = np.array([1, 1, 1, 0], np.float32)  # The last example is padding.
  prob = 1 / (1 + np.exp(-logits.astype(np.float64)))
  bce = -(target * np.log(prob) + (1 - target) * np.log(1 - prob)).mean(axis=(1, 2))
  dice = 1 - (2 * (prob * target).sum((1, 2)) + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)
  np.testing.assert_allclose(mask_head.dice_loss(logits, target), dice, rtol=1e-5)
  np.testing.assert_allclose(mask_head.mask_loss(logits, target, weights), bce[:3].mean(), rtol=1e-5)
  np.testing.assert_allclose(
    mask_head.mask_loss(logits, target, weights, dice_weight=0.5), (bce + 0.5 * dice)[:3].mean(), rtol=1e-5
  )
  # A confident empty prediction of an empty object costs no Dice; a confident exact prediction almost none.
  assert float(mask_head.dice_loss(np.full((1, 3, 3), -30.0), np.zeros((1, 3, 3)))[0]) < 1e-6
  exact = np.where(target[:1] > 0, 30.0, -30.0)
  assert float(mask_head.dice_loss(exact, target[:1])[0]) < 1e-6
