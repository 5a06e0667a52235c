"""Swin backbone (fcnet_jax/models/swin.py, fcnet_jax/weights/swin.py, tools/convert_swin.py, configs/*swin*.py).

Parity: state dicts with the published key names and shapes of Microsoft's release and timm's are built here with
random values (the files cannot be downloaded); transformers' PyTorch `SwinModel` (an independent implementation)
loads the same tensors under its own names and is the reference: every stage output (before patch merging, through
the same LayerNorm) within 1e-5 max relative error at 384 (stage 4 = one window, no shift) and 480 (stages 120, 60,
30, 15: padded to whole windows, shifted and masked). Swin-B widths, heads and window, 2 blocks per stage (a block
pair is the whole W-MSA / SW-MSA pattern; 18 blocks add nothing), batch 1, fp32 on the CPU.
The tiny-Swin twin of configs/tiny.py converts, loads through config.init_from and trains a few real steps.
"""

import contextlib
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from configs import refcoco_swinb
from configs import refcocog_swinb
from configs import tiny_swin
from fcnet_jax import sharding
from fcnet_jax import train
from fcnet_jax.models import fcnet
from fcnet_jax.models import image_encoder
from fcnet_jax.models import swin as swin_model
from fcnet_jax.tools import convert_swin
from fcnet_jax.tools import summary
from fcnet_jax.tools.benchmark import inputs as bench_inputs
from fcnet_jax.weights import loading
from fcnet_jax.weights import store
from fcnet_jax.weights import swin

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SWIN_B = dict(swin_embed_dim=128, swin_depths=(2, 2, 2, 2), swin_heads=(4, 8, 16, 32), swin_window=12)
TEXT = dict(text_width=64, text_heads=1, text_layers=1, embed_dim=32, context_length=8)


def relative_error(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def tiny_state_dict(window=2):
  m = tiny_swin.get_config().model
  return microsoft_state_dict(m.swin_embed_dim, m.swin_depths, m.swin_heads, window)


def model_config(**overrides):
  cfg = tiny_swin.get_config().model
  cfg.update(dict(TEXT, dtype="float32"))
  cfg.update(overrides)
  return cfg


# ------------------------------------------------------------------------------------------------------------
# State dicts with the released names.


def microsoft_state_dict(embed_dim, depths, heads, window, seed=0, num_classes=5) -> dict:
  """Random tensors under the names and shapes of Microsoft's release (buffers and classifier included)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, std=1.0: (rng.standard_normal(shape) * std).astype(np.float32)
  linear = lambda out, inp: {"weight": normal(out, inp, std=inp**-0.5), "bias": normal(out, std=0.02)}
  norm = lambda n: {"weight": 1 + normal(n, std=0.1), "bias": normal(n, std=0.1)}
  sd = {}

  def put(prefix, tensors):
    sd.update({f"{prefix}.{k}": v for k, v in tensors.items()})

  put("patch_embed.proj", {"weight": normal(embed_dim, 3, 4, 4, std=0.2), "bias": normal(embed_dim, std=0.02)})
  put("patch_embed.norm", norm(embed_dim))
  index = swin_model.relative_position_index(window, window).astype(np.int64)
  for i, depth in enumerate(depths):
    c = embed_dim * 2**i
    for j in range(depth):
      b = f"layers.{i}.blocks.{j}"
      put(f"{b}.norm1", norm(c))
      put(f"{b}.attn.qkv", linear(3 * c, c))
      put(f"{b}.attn.proj", linear(c, c))
      sd[f"{b}.attn.relative_position_bias_table"] = normal((2 * window - 1) ** 2, heads[i], std=0.5)
      sd[f"{b}.attn.relative_position_index"] = index
      put(f"{b}.norm2", norm(c))
      put(f"{b}.mlp.fc1", linear(4 * c, c))
      put(f"{b}.mlp.fc2", linear(c, 4 * c))
      if j % 2:
        sd[f"{b}.attn_mask"] = np.zeros((4, window**2, window**2), np.float32)
    if i < len(depths) - 1:
      put(f"layers.{i}.downsample.norm", norm(4 * c))
      sd[f"layers.{i}.downsample.reduction.weight"] = normal(2 * c, 4 * c, std=(4 * c) ** -0.5)
  c = embed_dim * 2 ** (len(depths) - 1)
  put("norm", norm(c))
  put("head", linear(num_classes, c))
  return sd


def timm_from_microsoft(sd: dict) -> dict:
  """timm ≥ 0.9 names: patch merging moves to the start of the next stage; the classifier is head.fc."""
  out = {}
  for key, value in sd.items():
    if key.endswith(("relative_position_index", "attn_mask")):
      continue  # timm's buffers are not persistent.
    parts = key.split(".")
    if parts[0] == "layers" and parts[2] == "downsample":
      parts[1] = str(int(parts[1]) + 1)
    if parts[0] == "head":
      parts.insert(1, "fc")
    out[".".join(parts)] = value
  return out


def transformers_from_microsoft(sd: dict) -> dict:
  """The same tensors under transformers' SwinModel names (q/k/v split from the fused qkv)."""
  renames = [
    ("patch_embed.proj.", "embeddings.patch_embeddings.projection."),
    ("patch_embed.norm.", "embeddings.norm."),
    (".norm1.", ".layernorm_before."),
    (".norm2.", ".layernorm_after."),
    (".attn.proj.", ".attention.o_proj."),
    (".attn.relative_position_bias_table", ".attention.relative_position_bias.relative_position_bias_table"),
  ]
  out = {}
  for key, value in sd.items():
    if key.endswith(("relative_position_index", "attn_mask")) or key.startswith("head."):
      continue
    value = torch.from_numpy(np.ascontiguousarray(value))
    if key.startswith("norm."):
      out["layernorm." + key[5:]] = value
      continue
    new = key
    for old, repl in renames:
      new = new.replace(old, repl)
    new = "encoder." + new if new.startswith("layers.") else new
    if ".attn.qkv." in new:
      for part, name in zip(value.chunk(3, dim=0), ("q_proj", "k_proj", "v_proj")):
        out[new.replace(".attn.qkv.", f".attention.{name}.")] = part
    else:
      out[new] = value
  return out


def clip_text_state_dict(width=64, layers=1, embed_dim=32, positions=77, vocab=49408, seed=1) -> dict:
  """Random CLIP text tower under OpenAI's names, plus one image-tower key and logit_scale (ignored)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: (rng.standard_normal(shape) * 0.02).astype(np.float32)
  sd = {
    "token_embedding.weight": normal(vocab, width),
    "positional_embedding": normal(positions, width),
    "ln_final.weight": 1 + normal(width),
    "ln_final.bias": normal(width),
    "text_projection": normal(width, embed_dim),
    "logit_scale": np.array(4.6, np.float32),
    "visual.conv1.weight": normal(8, 3, 3, 3),
  }
  for i in range(layers):
    b = f"transformer.resblocks.{i}"
    sd.update({
      f"{b}.ln_1.weight": 1 + normal(width), f"{b}.ln_1.bias": normal(width),
      f"{b}.ln_2.weight": 1 + normal(width), f"{b}.ln_2.bias": normal(width),
      f"{b}.attn.in_proj_weight": normal(3 * width, width), f"{b}.attn.in_proj_bias": normal(3 * width),
      f"{b}.attn.out_proj.weight": normal(width, width), f"{b}.attn.out_proj.bias": normal(width),
      f"{b}.mlp.c_fc.weight": normal(4 * width, width), f"{b}.mlp.c_fc.bias": normal(4 * width),
      f"{b}.mlp.c_proj.weight": normal(width, 4 * width), f"{b}.mlp.c_proj.bias": normal(width),
    })  # fmt: skip
  return sd


def loaded_encoders(cfg, swin_sd, clip_sd=None):
  """Converted + loaded encoder variables (stage LayerNorms randomised so that they are tested too), report."""
  pretrained, image_report, _ = swin.convert_swin_state_dicts(swin_sd, clip_sd or clip_text_state_dict(), cfg)
  variables, load_report = loading.load_pretrained(loading.abstract_variables(cfg, encoders_only=True), pretrained)
  rng = np.random.default_rng(7)
  for i in (1, 2, 3):
    norm = variables["params"]["image_encoder"][f"norm{i}"]
    norm["scale"] = (1 + 0.1 * rng.standard_normal(norm["scale"].shape)).astype(np.float32)
    norm["bias"] = (0.1 * rng.standard_normal(norm["bias"].shape)).astype(np.float32)
  return variables, image_report, load_report


# ------------------------------------------------------------------------------------------------------------
# Parity with transformers' SwinModel.


def swin_b_reference():
  """transformers' SwinModel of Swin-B widths, heads and window, depths 2-2-2-2, in eval mode (weights to be loaded)."""
  config = transformers.SwinConfig(
    image_size=384, patch_size=4, embed_dim=128, depths=[2, 2, 2, 2], num_heads=[4, 8, 16, 32], window_size=12
  )
  try:
    from transformers import initialization  # pylint: disable=g-import-not-at-top

    no_init = initialization.no_init_weights()  # The random init of 35 M parameters is overwritten anyway.
  except (ImportError, AttributeError):
    no_init = contextlib.nullcontext()
  with no_init:
    return transformers.SwinModel(config, add_pooling_layer=False).eval()


def test_stage_outputs_match_transformers_swin():
  """480 (padding + shifted windows in every stage) first, then 384 (stage 4 = one window, shift skipped).

  One reference serves both only in this order: transformers' SwinLayer switches its shift off for good once it
  sees a stage no larger than the window (it assigns `self.shift_size` in forward).
  """
  sd = microsoft_state_dict(128, (2, 2, 2, 2), (4, 8, 16, 32), 12)
  reference = swin_b_reference()
  missing, unexpected = reference.load_state_dict(transformers_from_microsoft(sd), strict=False)
  assert not unexpected and not [k for k in missing if "relative_position_index" not in k], (missing, unexpected)
  for size in (480, 384):
    cfg = model_config(image_size=size, **SWIN_B)
    variables, _, _ = loaded_encoders(cfg, sd)
    image = np.random.default_rng(size).standard_normal((1, size, size, 3)).astype(np.float32)
    model = fcnet.build_model(cfg)
    encode = jax.jit(functools.partial(model.apply, method=fcnet.FCNet.encode_image))
    ours = encode({"params": {"image_encoder": variables["params"]["image_encoder"]}}, jnp.asarray(image))
    with torch.no_grad():
      out = reference(
        torch.from_numpy(image).permute(0, 3, 1, 2),
        output_hidden_states=True,
        output_hidden_states_before_downsampling=True,
      )
    for i, f_v in enumerate(ours, start=1):
      stage = out.reshaped_hidden_states[i + 1].permute(0, 2, 3, 1)  # (embeddings, stage 1, …, stage 4)
      norm = variables["params"]["image_encoder"][f"norm{i}"]
      ref = torch.nn.functional.layer_norm(
        stage, stage.shape[-1:], torch.from_numpy(norm["scale"]), torch.from_numpy(norm["bias"]), eps=1e-5
      ).numpy()
      assert f_v.shape == (1, size // 2 ** (i + 2), size // 2 ** (i + 2), 128 * 2**i)
      assert relative_error(f_v, ref) <= 1e-5, (size, i, relative_error(f_v, ref))


def test_stage_smaller_than_window_uses_the_central_table():
  """A 3×3 map with window 7: one 3×3 window, no shift, biases of the offsets −2..2 from the 13×13 table."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 3, 3, 8)), jnp.float32)
  big = swin_model.SwinBlock(2, 7, shift=True)
  small = swin_model.SwinBlock(2, 3, shift=True)
  params = jax.jit(functools.partial(big.init, train=False))(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + 0.3 * rng.standard_normal(p.shape), params)
  table = params["params"]["attn"]["relative_position_bias_table"].reshape(13, 13, 2)
  small_params = flax.core.unfreeze(params)
  small_params["params"]["attn"]["relative_position_bias_table"] = table[4:9, 4:9].reshape(25, 2)
  apply = lambda module, p: jax.jit(functools.partial(module.apply, train=False))(p, x)
  np.testing.assert_allclose(apply(big, params), apply(small, small_params), rtol=1e-6, atol=1e-6)


def test_bf16_compute_tracks_fp32():
  """A shifted, masked block (8×8 map, window 4) computing in bf16 stays close to fp32; parameters stay fp32."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 16)), jnp.float32)
  block, block16 = swin_model.SwinBlock(2, 4, shift=True), swin_model.SwinBlock(2, 4, shift=True, dtype=jnp.bfloat16)
  params = jax.jit(functools.partial(block16.init, train=False))(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  ours = jax.jit(functools.partial(block.apply, train=False))(params, x)
  ours16 = jax.jit(functools.partial(block16.apply, train=False))(params, x.astype(jnp.bfloat16))  # As in the trunk.
  assert ours16.dtype == jnp.bfloat16 and relative_error(ours16.astype(jnp.float32), ours) < 3e-2


# ------------------------------------------------------------------------------------------------------------
# Weight names and conversion.


def test_timm_and_microsoft_names_give_the_same_variables():
  cfg = model_config()
  ms = tiny_state_dict()
  from_ms, ms_report, text_report = swin.convert_swin_state_dicts({"model": ms}, clip_text_state_dict(), cfg)
  from_timm, timm_report, _ = swin.convert_swin_state_dicts(timm_from_microsoft(ms), clip_text_state_dict(), cfg)
  flat_ms, flat_timm = flax.traverse_util.flatten_dict(from_ms), flax.traverse_util.flatten_dict(from_timm)
  assert flat_ms.keys() == flat_timm.keys()
  for path in flat_ms:
    np.testing.assert_array_equal(flat_ms[path], flat_timm[path])
  assert "microsoft" in ms_report.architecture and "timm" in timm_report.architecture
  assert not ms_report.unused_keys and not timm_report.unused_keys and not text_report.unused_keys
  assert "layers.1.blocks.1.attn_mask" in ms_report.ignored_keys and "head.weight" in ms_report.ignored_keys
  assert "head.fc.weight" in timm_report.ignored_keys and "visual.conv1.weight" in text_report.ignored_keys
  downsample = ("params", "image_encoder", "layers_1", "downsample", "reduction", "kernel")
  np.testing.assert_array_equal(flat_ms[downsample], ms["layers.1.downsample.reduction.weight"].T)
  qkv = ("params", "image_encoder", "layers_1", "blocks_1", "attn", "qkv", "kernel")
  np.testing.assert_array_equal(flat_ms[qkv], ms["layers.1.blocks.1.attn.qkv.weight"].T)


def test_relative_position_tables_resize_to_the_window_bicubically():
  cfg = model_config(swin_window=3)
  sd = tiny_state_dict()  # Window 2 (3×3 tables) into window 3 (5×5).
  variables, _, report = loaded_encoders(cfg, sd)
  source = torch.from_numpy(sd["layers.1.blocks.1.attn.relative_position_bias_table"])
  ref = torch.nn.functional.interpolate(source.T.reshape(1, 2, 3, 3), size=(5, 5), mode="bicubic", align_corners=False)
  ours = variables["params"]["image_encoder"]["layers_1"]["blocks_1"]["attn"]["relative_position_bias_table"]
  np.testing.assert_allclose(ours, ref.reshape(2, 25).T.numpy(), rtol=1e-5, atol=1e-6)
  tables = [r for r in report.resized if r[0].endswith("relative_position_bias_table")]
  assert len(tables) == sum(cfg.swin_depths) and "window 2 → 3" in tables[0][3]
  assert {p.split("/")[2] for p, _ in report.new} == {"norm1", "norm2", "norm3"}


def test_mismatches_name_the_key_the_shapes_and_the_field():
  cfg = model_config()
  sd = tiny_state_dict()
  bad = dict(sd, **{"layers.1.blocks.0.mlp.fc1.weight": np.zeros((60, 16), np.float32)})
  with pytest.raises(ValueError, match=r"'layers.1.blocks.0.mlp.fc1.weight' has shape \(60, 16\).*\(16, 64\)"):
    swin.convert_swin_state_dicts(bad, clip_text_state_dict(), cfg)
  with pytest.raises(ValueError, match=r"config.model.swin_depths=\(1, 2, 1, 1\) \(checkpoint: \(2, 2, 2, 2\)\)"):
    swin.convert_swin_state_dicts(microsoft_state_dict(8, (2, 2, 2, 2), (1, 2, 2, 4), 2), clip_text_state_dict(), cfg)
  with pytest.raises(ValueError, match="config.model.backbone='clip_resnet'"):
    swin.convert_swin_state_dicts(sd, clip_text_state_dict(), model_config(backbone="clip_resnet"))
  with pytest.raises(ValueError, match="config.model.text_layers=1, but the CLIP text tower has 2"):
    swin.convert_swin_state_dicts(sd, clip_text_state_dict(layers=2), cfg)
  with pytest.raises(ValueError, match="text_projection.*does not fit"):
    swin.convert_swin_state_dicts(sd, clip_text_state_dict(embed_dim=48), cfg)
  with pytest.raises(ValueError, match="CLIP checkpoint: pass it as --clip"):
    swin.convert_swin_state_dicts(clip_text_state_dict(), clip_text_state_dict(), cfg)


def test_config_fields_are_checked():
  for field, value in (("backbone", "vit"), ("text_backbone", "bert"), ("swin_heads", (1, 3, 2, 4))):
    cfg = tiny_swin.get_config().model
    cfg[field] = value
    with pytest.raises(ValueError, match=f"config.model.{field}="):
      fcnet.build_model(cfg)
  for get_config in (refcoco_swinb.get_config, refcocog_swinb.get_config):
    m = get_config().model
    assert m.backbone == "swin" and m.swin_depths == (2, 2, 18, 2) and m.swin_window == 12
  assert default.get_config().model.backbone == "clip_resnet"


# ------------------------------------------------------------------------------------------------------------
# The tiny twin: convert (CLI code path, timm safetensors + CLIP safetensors), config.init_from, train.


def test_tiny_swin_converts_loads_through_init_from_and_trains(tmp_path):
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top

  config = tiny_swin.get_config()
  config.model.update(TEXT)
  config.learning_rate, config.lr_multi, config.model.dropout = 1e-3, 1.0, 0.0
  ms = tiny_state_dict()
  safetensors_numpy.save_file(timm_from_microsoft(ms), str(tmp_path / "swin.safetensors"))
  safetensors_numpy.save_file(clip_text_state_dict(), str(tmp_path / "clip.safetensors"))
  out = str(tmp_path / "converted")
  _, _, preview, text = convert_swin.convert_checkpoint(
    str(tmp_path / "swin.safetensors"), str(tmp_path / "clip.safetensors"), out, config
  )
  assert "timm names" in text and "Left at fresh initialisation" in text
  assert not preview.resized or all("positional_embedding" in p for p, *_ in preview.resized)
  with pytest.raises(FileExistsError, match="--overwrite"):
    convert_swin.convert_checkpoint(str(tmp_path / "swin.safetensors"), str(tmp_path / "clip.safetensors"), out, config)
  assert set(store.restore_converted(out)["params"]) == {"image_encoder", "text_encoder"}

  # What train.create_train_state does with config.init_from (tests/test_init_from.py runs that path), on host-drawn
  # fresh variables: jitting the full model's init would double this test's compile time.
  model = fcnet.build_model(config.model)
  fresh = bench_inputs.random_variables(summary.abstract_variables(model), seed=0)
  variables, report = loading.load_pretrained(fresh, store.restore_converted(out))
  new_modules = {p.split("/")[1] for p, _ in report.new}
  assert new_modules == {
    "image_encoder",
    "neck",
    "emphasis_generation",
    "text_global_proj",
    "emphasis_calibration",
    "decoder",
    "mask_head",
  }, new_modules
  kernel = variables["params"]["image_encoder"]["layers_1"]["blocks_1"]["attn"]["qkv"]["kernel"]
  np.testing.assert_array_equal(kernel, ms["layers.1.blocks.1.attn.qkv.weight"].T)
  tx = train.create_optimizer(config, train.create_learning_rate_fn(config, steps_per_epoch=10, total_steps=10))
  mesh = sharding.create_mesh()
  state = jax.jit(
    lambda v: train.TrainState.create(
      apply_fn=model.apply, params=v["params"], tx=tx, batch_stats=v["batch_stats"], dropout_rng=jax.random.key(0)
    ),
    out_shardings=sharding.replicated_sharding(mesh),
  )(variables)
  step = train.jit_train_step(config, model, mesh)
  host = bench_inputs.synthetic_batch(np.random.default_rng(0), 4, 64, config.model.context_length)
  batch = sharding.global_batch(host, mesh)
  losses = []
  for _ in range(4):
    with sharding.use_mesh(mesh):
      state, metrics = step(state, batch)
    losses.append(float(metrics.compute()["loss"]))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  assert int(state.step) == 4


def test_relative_position_index_matches_swin_formula():
  window = 3
  index = swin_model.relative_position_index(window, window)
  coords = [(i, j) for i in range(window) for j in range(window)]
  expected = [[(a[0] - b[0] + 2) * 5 + (a[1] - b[1] + 2) for b in coords] for a in coords]
  np.testing.assert_array_equal(index, expected)
  np.testing.assert_array_equal(image_encoder.resize_pos_embed(np.eye(9, 2), (3, 3)), np.eye(9, 2))
