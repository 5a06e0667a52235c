"""FCNet's fusion modules against the independent float64 NumPy reference in `reference_fusion.py`.

The variable tree (names, shapes) is our model's own, `model.init` traced abstractly on the tiny config; the
values are drawn here in float32 (kernels at LeCun scale, every bias, norm scale and BatchNorm running statistic
non-trivial, so a dropped bias, a swapped scale or batch statistics in place of running ones would show; a
jitted `init` alone costs 15–45 s of compile on 2 cores). The same values feed the reference.

One jitted `FCNet.fuse` per ablation variant and one `FCNet.decode` per memory shape run with
`capture_intermediates`, so every module is checked on the inputs it really received (neck, EGM, F_tg, ECM with
its α, each decoder layer, the decoder, the mask head), and the whole forward from F_v2, F_v3, F_v4, F_t (+ [EOS]
feature, padding mask) to the logits is checked end to end. Every check requires
max|ours − reference| / max|reference| ≤ 1e-5 (fp32, train=False). `test_reference_detects_wrong_choices` shows
that the comparison fails when the reference makes one different choice.
"""

import functools
from typing import Any, Dict

import jax
import numpy as np
import pytest

from configs import tiny
from fcnet_jax.models import fcnet
import reference_fusion as ref

TOLERANCE = 1e-5
BATCH = 2
SOT, EOT = 49406, 49407
LENGTHS = (4, 8)  # Tokens per sentence including [SOS] and [EOS]: one padded sentence, one filling L = 8.
VARIANTS = {
  "default": {},
  "gate_sigmoid": {"calibration_gate": "sigmoid"},
  "gate_softmax": {"calibration_gate": "softmax"},
  "no_ecm": {"use_ecm": False},
  "no_egm": {"use_egm": False},
  "no_egm_layernorm": {"egm_layernorm": False},
  "egm_heads_2": {"egm_heads": 2},
}


def model_config(variant: str = "default") -> Dict[str, Any]:
  cfg = tiny.get_config().model
  cfg.decoder_layers = 2  # Exercise the layer stack (the tiny config has one layer).
  cfg.update(VARIANTS[variant])
  return cfg.to_dict()


def relative_error(ours, expected) -> float:
  ours, expected = np.asarray(ours, np.float64), np.asarray(expected, np.float64)
  assert ours.shape == expected.shape, (ours.shape, expected.shape)
  return float(np.abs(ours - expected).max() / np.abs(expected).max())


def assert_matches(ours, expected, what: str):
  error = relative_error(ours, expected)
  assert error <= TOLERANCE, f"{what}: max|ours − reference| / max|reference| = {error:.3g} > {TOLERANCE:g}"


def f64(*arrays):
  return [np.asarray(a, np.float64) for a in arrays]


def tokens_and_padding(length: int):
  """B×L token ids ([SOS] words [EOS], zero padding) and the padding mask (True after [EOS])."""
  rng = np.random.default_rng(1)
  tokens = np.zeros((BATCH, length), np.int32)
  for b, n in enumerate(LENGTHS):
    tokens[b, 0], tokens[b, 1 : n - 1], tokens[b, n - 1] = SOT, rng.integers(1, SOT, n - 2), EOT
  padding = np.arange(length)[None, :] > (np.array(LENGTHS) - 1)[:, None]
  return tokens, padding


def fusion_inputs(cfg: Dict[str, Any]):
  """F_v2 (S/8), F_v3 (S/16), F_v4 (S/32) shaped as CLIP's ModifiedResNet gives them, F_t, [EOS], padding."""
  rng = np.random.default_rng(0)
  s, w = cfg["image_size"], cfg["vision_width"]
  shapes = [
    (BATCH, s // 8, s // 8, 8 * w),
    (BATCH, s // 16, s // 16, 16 * w),
    (BATCH, s // 32, s // 32, cfg["embed_dim"]),
  ]
  f_v2, f_v3, f_v4 = (np.abs(rng.normal(size=shape)).astype(np.float32) for shape in shapes)  # Post-ReLU maps.
  f_t = rng.normal(size=(BATCH, cfg["context_length"], cfg["text_width"])).astype(np.float32)
  eos = rng.normal(size=(BATCH, cfg["embed_dim"])).astype(np.float32)
  _, padding = tokens_and_padding(cfg["context_length"])
  return f_v2, f_v3, f_v4, f_t, eos, padding


def draw_values(shapes, seed: int):
  """Float32 values for an abstract variable tree: LeCun-scaled kernels, non-trivial everything else."""
  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    names = [p.key for p in path]
    shape = shape.shape
    if names[0] == "batch_stats":
      value = rng.normal(0.0, 0.5, shape) if names[-1] == "mean" else rng.uniform(0.3, 2.0, shape)
    elif names[-1] in ("kernel", "text_projection"):
      # Attention output projections are heads×head_dim×D; q/k/v are D×heads×head_dim.
      fan_in = np.prod(shape[:-1]) if len(shape) != 3 or names[-2] in ("out", "c_proj") else shape[0]
      value = rng.normal(0.0, fan_in**-0.5, shape)
    elif names[-1] == "scale":
      value = rng.uniform(0.5, 1.5, shape)
    elif names[-1] in ("bias", "embedding", "positional_embedding"):
      value = rng.normal(0.0, 0.3 if names[-1] == "bias" else 1.0, shape)
    else:
      raise ValueError(f"no value rule for variable {'/'.join(names)}")
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _init_all(module, *inputs):
  return module.decode(*module.fuse(*inputs))


@pytest.fixture(scope="module")
def variables():
  """One tree for every variant: the EGM/ECM model's variables plus the no-EGM `word_proj`."""
  trees = []
  for variant in ("default", "no_egm"):
    cfg = model_config(variant)
    model = fcnet.build_model(cfg)
    trees.append(
      jax.eval_shape(functools.partial(model.init, method=_init_all), jax.random.key(0), *fusion_inputs(cfg))
    )
  merged = {col: {**trees[1].get(col, {}), **trees[0][col]} for col in trees[0]}
  return draw_values(merged, seed=0)


def variables_for(variables, variant: str):
  """`egm_heads=2` splits the EGM's q/k/v/out projections into 2 heads of 16 instead of 4 of 8: same matrices."""
  if variant != "egm_heads_2":
    return variables
  heads = model_config(variant)["egm_heads"]
  attn = variables["params"]["emphasis_generation"]["cross_attn"]
  split = {
    name: {"kernel": p["kernel"].reshape(p["kernel"].shape[0], heads, -1), "bias": p["bias"].reshape(heads, -1)}
    for name, p in attn.items()
    if name != "out"
  }
  split["out"] = {
    "kernel": attn["out"]["kernel"].reshape(heads, -1, attn["out"]["kernel"].shape[-1]),
    "bias": attn["out"]["bias"],
  }
  egm = dict(variables["params"]["emphasis_generation"], cross_attn=split)
  return {**variables, "params": dict(variables["params"], emphasis_generation=egm)}


@functools.lru_cache(maxsize=None)
def fuse_fn(variant: str):
  """Jitted FCNet.fuse (train=False) → ((F_v, memory, memory_mask), captured intermediates)."""
  model = fcnet.build_model(model_config(variant))
  return jax.jit(
    lambda v, *inputs: model.apply(
      v, *inputs, method=fcnet.FCNet.fuse, capture_intermediates=True, mutable=["intermediates"]
    )
  )


@functools.lru_cache(maxsize=None)
def decode_fn(masked_memory: bool):
  """Jitted FCNet.decode (train=False) → (logits, captured intermediates).

  Decode reads only the decoder and mask-head fields, which all variants share; one function per memory layout
  (N_k calibrated tokens, or the masked words when EGM is off) saves a compile per variant.
  """
  model = fcnet.build_model(model_config("no_egm" if masked_memory else "default"))
  return jax.jit(
    lambda v, f_v, memory, mask: model.apply(
      v, f_v, memory, mask, method=fcnet.FCNet.decode, capture_intermediates=True, mutable=["intermediates"]
    )
  )


def run_ours(variables, variant: str, inputs):
  variables = variables_for(variables, variant)
  (f_v, memory, memory_mask), fused = fuse_fn(variant)(variables, *inputs)
  logits, decoded = decode_fn(memory_mask is not None)(variables, f_v, memory, memory_mask)
  to_np = lambda tree: jax.tree_util.tree_map(np.asarray, tree)
  return {
    "f_v": np.asarray(f_v),
    "memory": np.asarray(memory),
    "memory_mask": None if memory_mask is None else np.asarray(memory_mask),
    "logits": np.asarray(logits),
    "fused": to_np(fused["intermediates"]),
    "decoded": to_np(decoded["intermediates"]),
  }


_RESULTS: Dict[str, Any] = {}


@pytest.fixture(scope="module")
def results(variables):
  """variant → (inputs, our outputs and intermediates), computed once per variant."""
  _RESULTS.clear()

  def get(variant: str):
    if variant not in _RESULTS:
      inputs = fusion_inputs(model_config(variant))
      _RESULTS[variant] = inputs, run_ours(variables, variant, inputs)
    return _RESULTS[variant]

  return get


@pytest.fixture(scope="module")
def ref_vars(variables):
  return ref.as_float64(variables)


def captured(tree, *path):
  """The output of the module at `path` from `capture_intermediates` (its `__call__`)."""
  for key in path:
    tree = tree[key]
  return tree["__call__"][0]


# ------------------------------------------------------------------------------------------------ per module


def test_vision_neck_matches_reference(results, ref_vars):
  cfg = model_config()
  inputs, ours = results("default")
  expected = ref.vision_neck(ref_vars["params"]["neck"], ref_vars["batch_stats"]["neck"], *f64(*inputs[:3]))
  assert expected.shape == (BATCH, cfg["image_size"] // 16, cfg["image_size"] // 16, cfg["hidden_dim"])
  assert_matches(captured(ours["fused"], "neck"), expected, "vision neck")


@pytest.mark.parametrize("variant", ["default", "no_egm_layernorm", "egm_heads_2"])
def test_emphasis_generation_matches_reference(results, ref_vars, variant):
  cfg = model_config(variant)
  inputs, ours = results(variant)
  f_t, padding = inputs[3], inputs[5]
  expected = ref.emphasis_generation(
    ref_vars["params"]["emphasis_generation"],
    ref_vars["batch_stats"]["emphasis_generation"],
    *f64(ours["f_v"], f_t),
    ~padding,
    cfg["egm_heads"] or cfg["attention_heads"],
    cfg["egm_layernorm"],
  )
  assert expected.shape == (BATCH, cfg["num_emphasis"], cfg["hidden_dim"])
  assert_matches(captured(ours["fused"], "emphasis_generation"), expected, f"{variant}: EGM F_e")


@pytest.mark.parametrize("variant", ["default", "gate_sigmoid", "gate_softmax"])
def test_emphasis_calibration_matches_reference(results, ref_vars, variant):
  cfg = model_config(variant)
  inputs, ours = results(variant)
  f_tg = captured(ours["fused"], "text_global_proj")
  assert_matches(f_tg, ref.dense(*f64(inputs[4]), ref_vars["params"]["text_global_proj"]), "F_tg")
  f_e = captured(ours["fused"], "emphasis_generation")
  expected, alpha = ref.emphasis_calibration(
    ref_vars["params"]["emphasis_calibration"], *f64(f_e, f_tg), cfg["attention_heads"], cfg["calibration_gate"]
  )
  assert_matches(captured(ours["fused"], "emphasis_calibration"), expected, f"{variant}: ECM F_c")
  assert_matches(ours["fused"]["emphasis_calibration"]["alpha"][0], alpha, f"{variant}: ECM α")
  if cfg["calibration_gate"] == "softmax":
    np.testing.assert_allclose(alpha.sum(axis=-1), 1.0)


@pytest.mark.parametrize("variant", ["default", "no_egm"])
def test_decoder_layers_match_reference(results, ref_vars, variant):
  """Each pre-LN layer of eq. 5 on the input it received: memory = N_k calibrated tokens, or the masked words."""
  cfg = model_config(variant)
  _, ours = results(variant)
  b, h, w, c = ours["f_v"].shape
  params, decoded = ref_vars["params"]["decoder"], ours["decoded"]["decoder"]
  pos = ref.sine_encoding_2d(h, w, c)
  x = ours["f_v"].reshape(b, h * w, c)
  for i in range(cfg["decoder_layers"]):
    expected = ref.decoder_layer(
      params[f"layer{i}"], *f64(x, ours["memory"]), ours["memory_mask"], pos, cfg["attention_heads"]
    )
    x = captured(decoded, f"layer{i}")
    assert_matches(x, expected, f"{variant}: decoder layer {i}")
  expected = ref.decoder(
    params, *f64(ours["f_v"], ours["memory"]), ours["memory_mask"], cfg["decoder_layers"], cfg["attention_heads"]
  )
  assert_matches(captured(ours["decoded"], "decoder"), expected, f"{variant}: decoder")


def test_mask_head_matches_reference(results, ref_vars):
  cfg = model_config()
  _, ours = results("default")
  expected = ref.mask_head(
    ref_vars["params"]["mask_head"], ref_vars["batch_stats"]["mask_head"], *f64(captured(ours["decoded"], "decoder"))
  )
  assert expected.shape == (BATCH, cfg["image_size"] // 4, cfg["image_size"] // 4)
  assert_matches(ours["logits"], expected, "mask head")


# ------------------------------------------------------------------------------------------------ whole forward


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fcnet_forward_matches_reference(results, ref_vars, variant):
  """F_v2, F_v3, F_v4, F_t, [EOS], padding → FCNet.fuse → FCNet.decode → logits, against the reference."""
  cfg = model_config(variant)
  inputs, ours = results(variant)
  expected = ref.forward(ref_vars, cfg, *f64(*inputs[:5]), inputs[5])
  assert_matches(ours["f_v"], expected["f_v"], f"{variant}: F_v")
  assert_matches(ours["memory"], expected["memory"], f"{variant}: memory")
  if cfg["use_egm"]:
    assert ours["memory_mask"] is None and expected["memory_mask"] is None
  else:
    np.testing.assert_array_equal(ours["memory_mask"], expected["memory_mask"])
  assert ours["logits"].dtype == np.float32
  assert_matches(ours["logits"], expected["logits"], f"{variant}: logits")


@pytest.mark.parametrize("variant", ["default", "no_egm"])
def test_text_padding_does_not_reach_the_logits(variables, results, ref_vars, variant):
  """Junk in F_t after [EOS] changes nothing, in ours (bit for bit) and in the reference; on a word it does."""
  cfg = model_config(variant)
  inputs, ours = results(variant)
  f_t, padding = inputs[3], inputs[5]
  assert padding[0].any() and not padding[1].any()  # One padded sentence, one of full length.
  junk = np.where(padding[..., None], np.random.default_rng(8).normal(0, 10, f_t.shape), f_t).astype(np.float32)
  word_junk = f_t.copy()
  word_junk[0, 1] = junk[0, -1]  # Control: the same junk on a real word.
  with_junk = lambda t: (*inputs[:3], t, *inputs[4:])
  np.testing.assert_array_equal(run_ours(variables, variant, with_junk(junk))["logits"], ours["logits"])
  forward = lambda t: ref.forward(ref_vars, cfg, *f64(*inputs[:3], t, inputs[4]), padding)["logits"]
  expected = forward(f_t)
  np.testing.assert_allclose(forward(junk), expected, rtol=0, atol=1e-12 * np.abs(expected).max())
  assert relative_error(run_ours(variables, variant, with_junk(word_junk))["logits"], ours["logits"]) > 1e-3
  assert relative_error(forward(word_junk), expected) > 1e-3


def test_token_ids_after_eos_change_neither_ours_nor_the_reference(variables, results, ref_vars):
  """Our text encoder reads token rows that differ only after [EOS]: F_t differs there, the logits do not."""
  cfg = model_config()
  model = fcnet.build_model(cfg)
  tokens, padding = tokens_and_padding(cfg["context_length"])
  other = np.where(padding, np.random.default_rng(9).integers(0, SOT, tokens.shape), tokens).astype(np.int32)
  assert (other != tokens).any()
  text_vars = draw_values(
    jax.eval_shape(functools.partial(model.init, method=fcnet.FCNet.encode_text), jax.random.key(0), tokens), seed=1
  )
  encode = jax.jit(lambda v, t: model.apply(v, t, method=fcnet.FCNet.encode_text))
  (f_t, eos, pad), (f_t_other, eos_other, pad_other) = (
    jax.tree_util.tree_map(np.asarray, encode(text_vars, t)) for t in (tokens, other)
  )
  np.testing.assert_array_equal(pad, padding)
  np.testing.assert_array_equal(pad_other, padding)
  np.testing.assert_array_equal(eos_other, eos)
  np.testing.assert_array_equal(f_t_other[~padding], f_t[~padding])  # Causal: the words do not see the padding.
  assert not np.array_equal(f_t_other[padding], f_t[padding])
  inputs, _ = results("default")
  ours = run_ours(variables, "default", (*inputs[:3], f_t, eos, pad))["logits"]
  ours_other = run_ours(variables, "default", (*inputs[:3], f_t_other, eos_other, pad_other))["logits"]
  np.testing.assert_array_equal(ours_other, ours)
  forward = lambda t, e: ref.forward(ref_vars, cfg, *f64(*inputs[:3], t, e), padding)["logits"]
  expected = forward(f_t, eos)
  np.testing.assert_allclose(forward(f_t_other, eos_other), expected, rtol=0, atol=1e-12 * np.abs(expected).max())
  assert_matches(ours, expected, "logits from our text encoder's F_t")


def _swap_halves(encoding):
  return lambda h, w, c: np.roll(encoding(h, w, c), c // 2, axis=-1)


WRONG_CHOICES = {
  "upsampling with align_corners=True": ("upsample2x", functools.partial(ref.upsample2x, align_corners=True)),
  "no 2-D sine encoding": ("sine_encoding_2d", lambda h, w, c: np.zeros((h * w, c))),
  "sine encoding: rows first": ("sine_encoding_2d", _swap_halves(ref.sine_encoding_2d)),
  "BatchNorm ignores the running mean": (
    "batch_norm",
    lambda x, p, s: x / np.sqrt(s["var"] + ref.EPS) * p["scale"] + p["bias"],
  ),
  "LayerNorm without bias": (
    "layer_norm",
    lambda x, p: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + ref.EPS) * p["scale"],
  ),
  "strided sampling instead of average pooling": ("avg_pool2x2", lambda x: x[:, ::2, ::2]),
}


@pytest.mark.parametrize("choice", list(WRONG_CHOICES))
def test_reference_detects_wrong_choices(results, ref_vars, monkeypatch, choice):
  """The whole-forward comparison fails by far when the reference makes one different choice."""
  cfg = model_config()
  inputs, ours = results("default")
  monkeypatch.setattr(ref, *WRONG_CHOICES[choice])
  wrong = ref.forward(ref_vars, cfg, *f64(*inputs[:5]), inputs[5])["logits"]
  assert relative_error(ours["logits"], wrong) > 100 * TOLERANCE
