"""CLIP weight import (fcnet_jax.weights.clip, fcnet_jax.tools.convert_clip).

The proof is numerical parity in float32 with independent PyTorch models holding random weights (BatchNorm in
eval mode with random running statistics and affine parameters, random LayerNorm/bias values):
- open_clip's ModifiedResNet, the real RN50 (3, 4, 6, 3) and RN101 (3, 4, 23, 3) block layouts at stem width 8
  on 96×96 images: stage-2 (F_v2), stage-3 (F_v3) and stage-4 maps; F_v4 (CRIS's spatial attention pool, which
  open_clip's pool does not compute) against a float64 NumPy implementation of the attention pool of
  docs/model.md fed with the reference stage-4 map, open_clip's pool weights and a torch-bicubic positional grid;
- open_clip's TextTransformer and transformers' CLIPTextModelWithProjection (quick_gelu): per-token features
  F_t and the projected [EOS] feature, with padding.
Tolerance: max |ours − ref| / max |ref| ≤ 1e-5 per tensor.
"""

import contextlib
import copy
import functools
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F

from configs import tiny
from fcnet_jax.models import fcnet
from fcnet_jax.tools import convert_clip
from fcnet_jax.weights import clip
import reference_impls

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5
RN50, RN101 = (3, 4, 6, 3), (3, 4, 23, 3)
WIDTH = 8  # Stem width: attention-pool width 8·32 = 256 → 4 of CLIP's 64-wide heads.
EMBED_DIM = 48
IMAGE_SIZE = 96  # → 3×3 attention-pool grid, resized from the 7×7 grid of a 224 CLIP.
TEXT_WIDTH = 128  # 2 heads of 64.
TEXT_LAYERS = 3
VOCAB = 1000  # EOS = VOCAB − 1 is the largest id, as in CLIP's vocabulary.
CONTEXT = 10  # L; the reference keeps CLIP's 77 positions.
SOS, EOS = VOCAB - 2, VOCAB - 1


def relative_error(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def model_config(vision_layers=RN50, **overrides):
  cfg = tiny.get_config().model
  cfg.update(
    dict(
      image_size=IMAGE_SIZE,
      context_length=CONTEXT,
      vision_layers=vision_layers,
      vision_width=WIDTH,
      vision_heads=WIDTH * 32 // 64,
      embed_dim=EMBED_DIM,
      vocab_size=VOCAB,
      text_width=TEXT_WIDTH,
      text_layers=TEXT_LAYERS,
      text_heads=TEXT_WIDTH // 64,
      dtype="float32",
    )
  )
  cfg.update(overrides)
  return cfg


@functools.lru_cache(maxsize=None)
def reference_clip(vision_layers):
  """(visual, text) open_clip modules in eval mode and their OpenAI-named state dict (NumPy)."""
  return reference_impls.random_clip(
    vision_layers,
    vision_width=WIDTH,
    embed_dim=EMBED_DIM,
    text_width=TEXT_WIDTH,
    text_layers=TEXT_LAYERS,
    vocab_size=VOCAB,
    seed=sum(vision_layers),
  )


def make_tokens(rng: np.random.Generator, lengths, length: int = CONTEXT) -> np.ndarray:
  """[SOS] words [EOS] then zero padding; `lengths` counts the words."""
  tokens = np.zeros((len(lengths), length), np.int32)
  for row, n in enumerate(lengths):
    tokens[row, 0] = SOS
    tokens[row, 1 : n + 1] = rng.integers(1, SOS, n)
    tokens[row, n + 1] = EOS
  return tokens


def fill_new_(variables, seed: int):
  """Replaces every abstract leaf (jax.ShapeDtypeStruct: not loaded) by random values; BatchNorm variances > 0."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(variables)
  for path, leaf in flat.items():
    if isinstance(leaf, jax.ShapeDtypeStruct):
      if path[-1] == "var":
        flat[path] = (0.5 + rng.random(leaf.shape)).astype(np.float32)
      elif path[-1] == "scale":
        flat[path] = (1 + 0.2 * rng.normal(size=leaf.shape)).astype(np.float32)
      else:
        flat[path] = (0.1 * rng.normal(size=leaf.shape)).astype(np.float32)
  return flax.traverse_util.unflatten_dict(flat)


def numpy_attention_pool(stage4, visual, connect_params, connect_stats, grid):
  """The attention pool of docs/model.md in float64 NumPy: CLIP grid positions (class position dropped,
  torch-bicubic to `grid`), multi-head self-attention with open_clip's q/k/v/c projections, a 1×1 conv + BN
  residual, ReLU.

  stage4: B×h×w×C. Returns B×h×w×embed_dim.
  """
  pool = visual.attnpool
  weights = {
    name: getattr(pool, name).weight.detach().double().numpy() for name in ("q_proj", "k_proj", "v_proj", "c_proj")
  }
  biases = {name: getattr(pool, name).bias.detach().double().numpy() for name in weights}
  pos = pool.positional_embedding.detach().double()[1:]
  g = int(round(pos.shape[0] ** 0.5))
  pos = F.interpolate(pos.T.reshape(1, -1, g, g), size=grid, mode="bicubic", align_corners=False)
  pos = pos.reshape(pos.shape[1], -1).T.numpy()
  b, h, w, c = stage4.shape
  heads = pool.num_heads
  tokens = stage4.reshape(b, h * w, c).astype(np.float64) + pos
  split = lambda t: t.reshape(b, h * w, heads, c // heads)
  q, k, v = (split(tokens @ weights[n].T + biases[n]) for n in ("q_proj", "k_proj", "v_proj"))
  logits = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(c // heads)
  attention = np.exp(logits - logits.max(-1, keepdims=True))
  attention /= attention.sum(-1, keepdims=True)
  mixed = np.einsum("bnqk,bknd->bqnd", attention, v).reshape(b, h * w, c)
  pooled = (mixed @ weights["c_proj"].T + biases["c_proj"]).reshape(b, h, w, -1)
  residual = stage4.astype(np.float64) @ connect_params["conv"]["kernel"][0, 0].astype(np.float64)
  residual = (residual - connect_stats["bn"]["mean"]) / np.sqrt(connect_stats["bn"]["var"] + 1e-5) * connect_params[
    "bn"
  ]["scale"] + connect_params["bn"]["bias"]
  return np.maximum(pooled + residual, 0)


def with_random_connect(variables):
  """Adds random values for the attention pool's residual `connect` conv + BN, the one encoder part CLIP lacks
  (`convert_openai_state_dict` itself fails if its tables miss any other variable of the encoders)."""
  pool = ("image_encoder", "attnpool", "connect")
  shapes = {("params",) + pool + ("conv", "kernel"): (1, 1, WIDTH * 32, EMBED_DIM)}
  shapes.update(
    {
      (c,) + pool + ("bn", n): (EMBED_DIM,)
      for c, n in (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var"))
    }
  )
  flat = flax.traverse_util.flatten_dict(variables)
  flat.update({path: jax.ShapeDtypeStruct(shape, jnp.float32) for path, shape in shapes.items()})
  return fill_new_(flax.traverse_util.unflatten_dict(flat), seed=3)


@pytest.mark.parametrize("vision_layers", [RN50, RN101], ids=["RN50", "RN101"])
def test_image_encoder_parity(vision_layers):
  cfg = model_config(vision_layers)
  variables = with_random_connect(clip.from_openai_state_dict(reference_clip(vision_layers)[2], cfg))
  model = fcnet.build_model(cfg)
  last_block = f"layer4_{vision_layers[3] - 1}"

  @jax.jit
  def encode(variables, images):
    return model.apply(
      variables,
      images,
      method=fcnet.FCNet.encode_image,
      capture_intermediates=lambda module, _: module.name == last_block,
    )

  images = np.random.default_rng(0).normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  (f_v2, f_v3, f_v4), state = encode(variables, images)
  stage4 = state["intermediates"]["image_encoder"][last_block]["__call__"][0]

  visual = reference_clip(vision_layers)[0]
  with torch.no_grad():
    x = visual.layer1(visual.stem(torch.from_numpy(images).permute(0, 3, 1, 2)))
    ref_v2 = visual.layer2(x)
    ref_v3 = visual.layer3(ref_v2)
    ref_v4_trunk = visual.layer4(ref_v3)
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  grid = (IMAGE_SIZE // 32,) * 2
  ref_v4 = numpy_attention_pool(
    nhwc(ref_v4_trunk),
    visual,
    variables["params"]["image_encoder"]["attnpool"]["connect"],
    variables["batch_stats"]["image_encoder"]["attnpool"]["connect"],
    grid,
  )
  errors = {
    "F_v2": relative_error(f_v2, nhwc(ref_v2)),
    "F_v3": relative_error(f_v3, nhwc(ref_v3)),
    "stage 4": relative_error(stage4, nhwc(ref_v4_trunk)),
    "F_v4": relative_error(f_v4, ref_v4),
  }
  print(vision_layers, errors)
  assert max(errors.values()) <= TOLERANCE, errors
  # The check can fail: F_v4 without the pool's residual branch is far off.
  no_residual = jax.tree.map(np.zeros_like, variables["params"]["image_encoder"]["attnpool"]["connect"])
  broken = flax.core.copy(variables, {})  # Copies the nested dicts too.
  broken["params"]["image_encoder"]["attnpool"]["connect"] = no_residual
  assert relative_error(encode(broken, images)[0][2], ref_v4) > 1e-2


def hf_to_openai(hf_state: dict) -> dict:
  """transformers' CLIPTextModelWithProjection state dict → OpenAI CLIP names (NumPy)."""
  sd = {k: v.numpy() for k, v in hf_state.items()}
  out = {
    "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
    "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
    "ln_final.weight": sd["text_model.final_layer_norm.weight"],
    "ln_final.bias": sd["text_model.final_layer_norm.bias"],
    "text_projection": sd["text_projection.weight"].T,
  }  # nn.Linear (E, W) → CLIP's W×E matrix.
  for i in range(TEXT_LAYERS):
    hf, ours = f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}"
    for part in ("weight", "bias"):
      out[f"{ours}.attn.in_proj_{part}"] = np.concatenate([sd[f"{hf}.self_attn.{p}_proj.{part}"] for p in "qkv"])
      out[f"{ours}.attn.out_proj.{part}"] = sd[f"{hf}.self_attn.out_proj.{part}"]
      out[f"{ours}.ln_1.{part}"] = sd[f"{hf}.layer_norm1.{part}"]
      out[f"{ours}.ln_2.{part}"] = sd[f"{hf}.layer_norm2.{part}"]
      out[f"{ours}.mlp.c_fc.{part}"] = sd[f"{hf}.mlp.fc1.{part}"]
      out[f"{ours}.mlp.c_proj.{part}"] = sd[f"{hf}.mlp.fc2.{part}"]
  return out


SMALL = (1, 1, 1, 1)  # Image-tower layout for the tests that are not about it (faster to trace).


@pytest.fixture(scope="module")
def text_model():
  cfg = model_config(SMALL)
  model = fcnet.build_model(cfg)
  return cfg, jax.jit(lambda variables, tokens: model.apply(variables, tokens, method=fcnet.FCNet.encode_text))


TOKEN_LENGTHS = (3, CONTEXT - 2, 0, 5)  # Words per sentence; CONTEXT − 2 puts [EOS] in the last slot.


def test_text_encoder_parity_open_clip(text_model):
  cfg, encode_text = text_model
  _, text, state_dict = reference_clip(SMALL)
  tokens = make_tokens(np.random.default_rng(1), TOKEN_LENGTHS)
  f_t, eos, padding = encode_text(clip.from_openai_state_dict(state_dict, cfg), tokens)
  # The reference runs CLIP's full 77 positions (zero-padded); causality makes its first L outputs those of a
  # length-L CLIP, which is what slicing the positional embedding to L must reproduce.
  with torch.no_grad():
    ref_eos, ref_tokens = text(torch.from_numpy(np.pad(tokens, ((0, 0), (0, 77 - CONTEXT)))).long())
  errors = {"F_t": relative_error(f_t, ref_tokens[:, :CONTEXT].numpy()), "EOS": relative_error(eos, ref_eos.numpy())}
  print(errors)
  assert max(errors.values()) <= TOLERANCE, errors
  eos_position = np.array(TOKEN_LENGTHS) + 1
  np.testing.assert_array_equal(padding, np.arange(CONTEXT)[None] > eos_position[:, None])


@contextlib.contextmanager
def without_torchvision_stub():
  """Hides reference_impls' torchvision stand-in: transformers probes `find_spec("torchvision")`, which fails
  on a module without __spec__ (the real, broken wheel is never imported by the text model)."""
  stub = {
    name: sys.modules.pop(name)
    for name in list(sys.modules)
    if name == "torchvision" or name.startswith("torchvision.")
  }
  try:
    yield
  finally:
    sys.modules.update(stub)


def test_text_encoder_parity_transformers(text_model):
  cfg, encode_text = text_model
  with without_torchvision_stub():
    ref_f_t, ref_eos, tokens, state_dict = _transformers_reference()
  # The converter wants a whole CLIP: the image tower comes from the open_clip reference.
  state_dict.update({k: v for k, v in reference_clip(SMALL)[2].items() if k.startswith("visual.")})
  f_t, eos, _ = encode_text(clip.from_openai_state_dict(state_dict, cfg), tokens)
  errors = {"F_t": relative_error(f_t, ref_f_t), "EOS": relative_error(eos, ref_eos)}
  print(errors)
  assert max(errors.values()) <= TOLERANCE, errors


def _transformers_reference():
  """CLIPTextModelWithProjection with random weights: (last_hidden_state, text_embeds, tokens, OpenAI-named
  state dict)."""
  import transformers  # pylint: disable=g-import-not-at-top

  hf_config = transformers.CLIPTextConfig(
    vocab_size=VOCAB,
    hidden_size=TEXT_WIDTH,
    intermediate_size=4 * TEXT_WIDTH,
    num_hidden_layers=TEXT_LAYERS,
    num_attention_heads=TEXT_WIDTH // 64,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=EMBED_DIM,
    layer_norm_eps=1e-5,
    bos_token_id=SOS,
    eos_token_id=EOS,
    pad_token_id=0,
  )
  torch.manual_seed(4)
  hf_model = transformers.CLIPTextModelWithProjection(hf_config)
  reference_impls.randomize_(hf_model, 5)
  hf_model.eval()
  tokens = make_tokens(np.random.default_rng(2), TOKEN_LENGTHS)
  with torch.no_grad():
    out = hf_model(input_ids=torch.from_numpy(tokens).long())  # Causal mask only, like CLIP.
  return (out.last_hidden_state.numpy(), out.text_embeds.numpy(), tokens, hf_to_openai(hf_model.state_dict()))


@pytest.mark.parametrize("side", [3, 15])
def test_positional_grid_resize_matches_torch_bicubic(side):
  pos = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)  # 224-CLIP: class + 7×7.
  state_dict = dict(reference_clip(SMALL)[2])
  cfg = model_config(SMALL, image_size=32 * side)
  fitted, how = clip.fit_positional_embedding(clip.GRID_POSITIONS, pos[1:], (side * side, 16))
  ref = (
    F.interpolate(
      torch.from_numpy(pos[1:]).double().T.reshape(1, 16, 7, 7), size=(side, side), mode="bicubic", align_corners=False
    )
    .reshape(16, -1)
    .T.numpy()
  )
  assert "7×7" in how and relative_error(fitted, ref) <= 1e-6
  # Through the converter, with the class position dropped.
  converted = clip.from_openai_state_dict(state_dict, cfg)
  pool_pos = reference_clip(SMALL)[0].attnpool.positional_embedding.detach().double()[1:]
  ref = F.interpolate(pool_pos.T.reshape(1, -1, 7, 7), size=(side, side), mode="bicubic", align_corners=False)
  ref = ref.reshape(ref.shape[1], -1).T.numpy()
  assert relative_error(converted["params"]["image_encoder"]["attnpool"]["positional_embedding"], ref) <= 1e-6
  text_pos = converted["params"]["text_encoder"]["positional_embedding"]
  np.testing.assert_array_equal(text_pos, state_dict["positional_embedding"][:CONTEXT])


def test_conversion_report_lists_ignored_and_unused_keys():
  state_dict = dict(reference_clip(SMALL)[2], **{"visual.extra.weight": np.zeros(3, np.float32)})
  # Torch tensors are accepted too, float16 (as OpenAI ships them) and bfloat16 included.
  state_dict = {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}
  state_dict["text_projection"] = state_dict["text_projection"].half()
  state_dict["ln_final.weight"] = state_dict["ln_final.weight"].bfloat16()
  converted, report = clip.convert_openai_state_dict(state_dict, model_config(SMALL))
  text_params = converted["params"]["text_encoder"]
  assert text_params["text_projection"].dtype == np.float32
  np.testing.assert_array_equal(text_params["text_projection"], state_dict["text_projection"].float().numpy())
  np.testing.assert_array_equal(text_params["ln_final"]["scale"], state_dict["ln_final.weight"].float().numpy())
  assert report.unused_keys == ["visual.extra.weight"]
  assert "logit_scale" in report.ignored_keys
  assert "visual.bn1.num_batches_tracked" in report.ignored_keys
  assert "CLIP ModifiedResNet (vision_layers (1, 1, 1, 1)" in report.architecture
  assert "UNUSED keys (1): visual.extra.weight" in str(report)


def test_shape_mismatch_errors_name_the_key_and_shapes():
  with pytest.raises(ValueError, match=r"vision_layers \(3, 4, 6, 3\).*config.model.vision_layers=\(3, 4, 23, 3\)"):
    clip.convert_openai_state_dict(reference_clip(RN50)[2], model_config(RN101))
  small = reference_clip(SMALL)[2]
  with pytest.raises(ValueError, match=r"'visual.conv1.weight' has shape \(4, 3, 3, 3\).*\(3, 3, 3, 8\)"):
    clip.convert_openai_state_dict(small, model_config(SMALL, vision_width=16, vision_heads=8))
  with pytest.raises(ValueError, match=r"'visual.attnpool.c_proj.weight' has shape \(48, 256\).*\(4, 64, 32\)"):
    clip.convert_openai_state_dict(small, model_config(SMALL, embed_dim=32))
  with pytest.raises(ValueError, match=r"config.model.vision_heads=8: CLIP's attention uses 64-wide heads"):
    clip.convert_openai_state_dict(small, model_config(SMALL, vision_heads=8))
  with pytest.raises(ValueError, match=r"transformer.resblocks.N\) but config.model.text_layers=2"):
    clip.convert_openai_state_dict(small, model_config(SMALL, text_layers=2))
  with pytest.raises(KeyError, match="transformer.resblocks.1.mlp.c_fc.bias"):
    clip.convert_openai_state_dict(
      {k: v for k, v in small.items() if k != "transformer.resblocks.1.mlp.c_fc.bias"}, model_config(SMALL)
    )
  with pytest.raises(ValueError, match="ViT"):
    clip.convert_openai_state_dict(
      {"visual.proj": np.zeros((4, 4)), "visual.conv1.weight": np.zeros((4, 3, 8, 8))}, model_config(SMALL)
    )


def test_load_pretrained_checks_shapes_and_reports():
  cfg = model_config(SMALL)
  pretrained, _ = clip.convert_openai_state_dict(reference_clip(SMALL)[2], cfg)
  fresh = clip.abstract_variables(cfg)  # The whole FCNet: encoders plus the parts CLIP does not have.
  merged, report = clip.load_pretrained(fresh, pretrained)
  assert merged["params"]["text_encoder"]["ln_final"]["scale"].dtype == np.float32
  resized = {path: (source, target) for path, source, target, _ in report.resized}
  assert resized == {
    "params/image_encoder/attnpool/positional_embedding": ((49, 256), (9, 256)),
    "params/text_encoder/positional_embedding": ((77, TEXT_WIDTH), (CONTEXT, TEXT_WIDTH)),
  }
  text = str(report)
  for module in (
    "image_encoder/attnpool/connect",
    "neck",
    "emphasis_generation",
    "emphasis_calibration",
    "decoder",
    "mask_head",
    "text_global_proj",
  ):
    assert f"    {module} " in text, text
  total = sum(np.prod(x.shape) for x in jax.tree.leaves(fresh["params"]))
  assert report.loaded_parameters + report.new_parameters == total
  bad = flax.core.copy(pretrained, {})
  bad["params"]["text_encoder"]["ln_final"]["scale"] = np.zeros(7, np.float32)
  with pytest.raises(ValueError, match=r"params/text_encoder/ln_final/scale has shape \(7,\).*\(128,\)"):
    clip.load_pretrained(fresh, bad)
  bad["params"]["text_encoder"]["ln_final"] = {"gamma": np.zeros(7, np.float32)}
  with pytest.raises(ValueError, match="params/text_encoder/ln_final/gamma"):
    clip.load_pretrained(fresh, bad)
  short = flax.core.copy(pretrained, {})
  short["params"]["text_encoder"]["positional_embedding"] = np.zeros((5, TEXT_WIDTH), np.float32)
  with pytest.raises(ValueError, match="has 5 positions but the model needs 10"):
    clip.load_pretrained(fresh, short)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # Making the TorchScript fixture.
def test_readers_torch_formats_and_errors(tmp_path):
  _, text, _ = reference_clip(SMALL)
  state = {k: v.half() for k, v in text.state_dict().items()}  # OpenAI ships float16 weights.
  torch.save(state, tmp_path / "plain.bin")
  torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pt")
  torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)

  class Container(torch.nn.Module):  # A TorchScript archive holding the state dict, like RN50.pt.
    def __init__(self):
      super().__init__()
      self.transformer = copy.deepcopy(text.transformer).half()
      self.ln_final = copy.deepcopy(text.ln_final).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      return self.ln_final(x)

  torch.jit.save(torch.jit.script(Container()), str(tmp_path / "script.pt"))
  for name, expected_format in (
    ("plain.bin", "torch.save zip"),
    ("wrapped.pt", "torch.save zip"),
    ("legacy.pth", "torch.save pickle"),
    ("script.pt", "TorchScript archive"),
  ):
    loaded, fmt = clip.read_state_dict(str(tmp_path / name))
    assert fmt == expected_format
    key = "transformer.resblocks.0.attn.in_proj_weight"
    assert loaded[key].dtype == torch.float16
    np.testing.assert_array_equal(loaded[key].numpy(), state[key].numpy())
  (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
  with pytest.raises(ValueError, match="junk.pt: not a TorchScript archive"):
    clip.read_state_dict(str(tmp_path / "junk.pt"))
  (tmp_path / "cut.safetensors").write_bytes(b"\x00" * 20)
  with pytest.raises(ValueError, match="no safetensors header"):
    clip.read_state_dict(str(tmp_path / "cut.safetensors"))
  with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
    clip.read_state_dict(str(tmp_path / "missing.pt"))


def test_cli_end_to_end(tmp_path):
  """safetensors → convert_clip → restore_converted → load_pretrained on a fresh FCNet → encoder parity."""
  layers = SMALL
  visual, text, state_dict = reference_clip(layers)
  src = str(tmp_path / "open_clip_model.safetensors")
  safetensors.numpy.save_file({k: np.asarray(v) for k, v in state_dict.items()}, src)
  cfg = model_config(layers)
  out = str(tmp_path / "converted")
  conversion, preview, text_report = convert_clip.convert_checkpoint(src, out, cfg)
  assert conversion.source_format == "safetensors" and "Left at fresh initialisation" in text_report
  assert sorted(os.listdir(out)) == ["report.json", "report.txt", "variables"]
  assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # No temporary directory left behind.
  with pytest.raises(FileExistsError, match="pass --overwrite"):
    convert_clip.convert_checkpoint(src, out, cfg)
  convert_clip.convert_checkpoint(src, out, cfg, overwrite=True)

  restored = clip.restore_converted(out)
  model = fcnet.build_model(cfg)
  rng = np.random.default_rng(0)
  tokens = make_tokens(rng, TOKEN_LENGTHS)
  images = rng.normal(size=(len(tokens), IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  # A stand-in for `model.init` (whose XLA compilation alone takes ~30 s on 2 cores): random values in every
  # variable of the whole FCNet.
  fresh = fill_new_(clip.abstract_variables(cfg), seed=7)
  variables, report = clip.load_pretrained(fresh, restored)
  assert report.loaded_parameters == preview.loaded_parameters and report.resized == preview.resized

  encode_both = lambda module, images, tokens: (module.encode_image(images), module.encode_text(tokens))
  (f_v2, f_v3, _), (f_t, eos, _) = jax.jit(lambda v, x, t: model.apply(v, x, t, method=encode_both))(
    variables, images, tokens
  )
  with torch.no_grad():
    ref_v2 = visual.layer2(visual.layer1(visual.stem(torch.from_numpy(images).permute(0, 3, 1, 2))))
    ref_v3 = visual.layer3(ref_v2)
    ref_eos, ref_tokens = text(torch.from_numpy(np.pad(tokens, ((0, 0), (0, 77 - CONTEXT)))).long())
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  errors = {
    "F_v2": relative_error(f_v2, nhwc(ref_v2)),
    "F_v3": relative_error(f_v3, nhwc(ref_v3)),
    "F_t": relative_error(f_t, ref_tokens[:, :CONTEXT].numpy()),
    "EOS": relative_error(eos, ref_eos.numpy()),
  }
  assert max(errors.values()) <= TOLERANCE, errors
  # The parts CLIP does not have keep their fresh initialisation.
  flat_fresh, flat_merged = (flax.traverse_util.flatten_dict(v, sep="/") for v in (fresh, variables))
  assert len(report.new) > 20
  for path, _ in report.new:
    np.testing.assert_array_equal(flat_merged[path], flat_fresh[path])


def test_cli_command_line(tmp_path):
  """The absl entry point: --src (a Hugging Face snapshot folder), --config file, --out, --overwrite."""
  snapshot = tmp_path / "snapshot"
  snapshot.mkdir()
  safetensors.numpy.save_file(
    {k: np.asarray(v) for k, v in reference_clip(SMALL)[2].items()}, str(snapshot / "open_clip_model.safetensors")
  )
  config_file = tmp_path / "config.py"
  config_file.write_text(
    "from configs import default\n\n\ndef get_config():\n  config = default.get_config()\n"
    f"  config.model.update({model_config(SMALL).to_dict()!r})\n  return config\n"
  )
  out = tmp_path / "converted"
  (out / "old").mkdir(parents=True)
  command = [
    sys.executable,
    "-X",
    "importtime",
    "-m",
    "fcnet_jax.tools.convert_clip",
    f"--src={snapshot}",
    f"--out={out}",
    f"--config={config_file}",
  ]
  # (Refusal without --overwrite is checked in-process in test_cli_end_to_end; one launch costs ~5 s.)
  done = subprocess.run(
    command + ["--overwrite"],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
  assert "flax" in imported and "torch" not in imported  # safetensors needs no PyTorch.
  assert "Left at fresh initialisation" in done.stdout and "7×7 grid resized to 3×3" in done.stdout, done.stdout
  assert sorted(os.listdir(out)) == ["report.json", "report.txt", "variables"]  # "old" is gone.
  restored = clip.restore_converted(str(out))
  np.testing.assert_array_equal(
    restored["params"]["text_encoder"]["ln_final"]["bias"], reference_clip(SMALL)[2]["ln_final.bias"]
  )
