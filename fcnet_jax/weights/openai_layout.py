"""OpenAI CLIP ResNet names and layouts → FCNet's image- and text-encoder variables (paper sec. 4.1).

`convert_openai_state_dict` reads the architecture from the key names and shapes, checks it against
config.model, and converts every tensor the encoders need, following one table of (our path, OpenAI key,
transform) entries per tower. Layouts (PyTorch → Flax): Conv OIHW → HWIO; Linear (out, in) → (in, out);
attention q/k/v (out, in) → (in, heads, head_dim) and output projections (out, in) → (heads, head_dim, out), the
`nn.DenseGeneral` layouts of `layers.MultiHeadAttention`; BatchNorm weight/bias/running_mean/running_var →
scale/bias/mean/var. Positional embeddings are kept as CLIP has them (the attention pool's class position
dropped); `loading.load_pretrained` fits them to the model.
"""

import dataclasses
import functools
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import flax
import numpy as np

from fcnet_jax.weights import formats
from fcnet_jax.weights import loading
from fcnet_jax.weights import reports

VariablePath = loading.VariablePath

# Keys of OpenAI / open_clip CLIP state dicts that FCNet has no use for (`num_batches_tracked` too, by suffix).
IGNORED_KEYS = ("logit_scale", "logit_bias", "input_resolution", "context_length", "vocab_size")
# Parts of the encoders CLIP does not have: CRIS's residual branch of the attention pool.
NOT_IN_CLIP = (("image_encoder", "attnpool", "connect"),)
KNOWN_RESNETS = {(3, 4, 6, 3): "RN50", (3, 4, 23, 3): "RN101"}
CLIP_HEAD_DIM = 64  # CLIP's heads: vision_width·32/64 in the attention pool, text_width/64 in the transformer.

# ----------------------------------------------------------------------------------------------------------------
# Architecture.


@dataclasses.dataclass(frozen=True)
class ClipArchitecture:
  """What a CLIP ResNet state dict says about its model (as OpenAI's `build_model` reads it)."""

  vision_layers: Tuple[int, ...]
  vision_width: int
  embed_dim: int
  grid: int
  text_layers: int
  text_width: int
  context_length: int
  vocab_size: int

  @property
  def name(self) -> str:
    known = KNOWN_RESNETS.get(self.vision_layers) if self.vision_width == 64 else None
    return f"CLIP {known}" if known else "CLIP ModifiedResNet"

  def __str__(self) -> str:
    return (
      f"{self.name} (vision_layers {self.vision_layers}, width {self.vision_width}, embed_dim "
      f"{self.embed_dim}, attention-pool grid {self.grid}×{self.grid}; text {self.text_layers} layers × "
      f"{self.text_width}, {self.context_length} positions, vocabulary {self.vocab_size})"
    )


def _shape(state_dict: Mapping[str, Any], key: str) -> Tuple[int, ...]:
  if key not in state_dict:
    raise KeyError(f"CLIP state dict has no key {key!r}")
  return tuple(int(d) for d in state_dict[key].shape)


def infer_architecture(state_dict: Mapping[str, Any]) -> ClipArchitecture:
  """Reads block counts and widths from the key names and shapes (fails clearly on non-ResNet checkpoints)."""
  keys = list(state_dict)
  if "visual.layer1.0.conv1.weight" not in state_dict:
    if "visual.proj" in state_dict or "visual.class_embedding" in state_dict:
      raise ValueError(
        "this is a CLIP ViT checkpoint; FCNet's image encoder is CLIP's ModifiedResNet "
        "(use RN50.pt / RN101.pt or timm/resnet{50,101}_clip.openai)"
      )
    if any(k.startswith("visual.trunk.") for k in keys):
      raise ValueError(
        "this is an open_clip checkpoint with a timm image tower (visual.trunk.*), not OpenAI's ModifiedResNet layout"
      )
    raise ValueError(
      f"not a CLIP ResNet state dict: no key 'visual.layer1.0.conv1.weight' (first keys: {reports.abbreviate(keys, 5)})"
    )
  blocks = []
  for stage in range(1, 5):
    pattern = re.compile(rf"visual\.layer{stage}\.(\d+)\.")
    indices = {int(m.group(1)) for m in map(pattern.match, keys) if m}
    if not indices or indices != set(range(len(indices))):
      raise ValueError(
        f"CLIP state dict: visual.layer{stage} blocks are missing or not numbered 0..n-1 (found {sorted(indices)})"
      )
    blocks.append(len(indices))
  text_pattern = re.compile(r"transformer\.resblocks\.(\d+)\.")
  text_layers = len({m.group(1) for m in map(text_pattern.match, keys) if m})
  grid_positions = _shape(state_dict, "visual.attnpool.positional_embedding")[0] - 1
  grid = int(round(np.sqrt(grid_positions)))
  if grid * grid != grid_positions:
    raise ValueError(
      f"visual.attnpool.positional_embedding has {grid_positions + 1} positions; expected a "
      f"class position plus a square grid"
    )
  return ClipArchitecture(
    vision_layers=tuple(blocks),
    vision_width=_shape(state_dict, "visual.layer1.0.conv1.weight")[0],
    embed_dim=_shape(state_dict, "visual.attnpool.c_proj.weight")[0],
    grid=grid,
    text_layers=text_layers,
    text_width=_shape(state_dict, "ln_final.weight")[0],
    context_length=_shape(state_dict, "positional_embedding")[0],
    vocab_size=_shape(state_dict, "token_embedding.weight")[0],
  )


def check_architecture(arch: ClipArchitecture, cfg: Mapping[str, Any]) -> None:
  """Fails with the config field to change when the checkpoint's structure cannot fit config.model."""
  if tuple(cfg["vision_layers"]) != arch.vision_layers:
    ours = KNOWN_RESNETS.get(tuple(cfg["vision_layers"]), "a custom ModifiedResNet")
    raise ValueError(
      f"the checkpoint is {arch.name} with vision_layers {arch.vision_layers} (counted from the "
      f"visual.layerN.* keys) but config.model.vision_layers={tuple(cfg['vision_layers'])} ({ours}); use "
      f"a config for this backbone (configs/refcoco_r50.py for RN50, configs/refcoco_r101.py for RN101)"
    )
  if cfg["text_layers"] != arch.text_layers:
    raise ValueError(
      f"the checkpoint's text transformer has {arch.text_layers} layers (transformer.resblocks.N) "
      f"but config.model.text_layers={cfg['text_layers']}"
    )
  if cfg["context_length"] > arch.context_length:
    raise ValueError(
      f"config.model.context_length={cfg['context_length']} exceeds the checkpoint's "
      f"{arch.context_length} text positions (positional_embedding)"
    )
  # Head counts are not stored in the weights; CLIP's are fixed by its 64-wide heads.
  for field, width_field, width in (
    ("vision_heads", "vision_width", cfg["vision_width"] * 32),
    ("text_heads", "text_width", cfg["text_width"]),
  ):
    if cfg[field] * CLIP_HEAD_DIM != width:
      raise ValueError(
        f"config.model.{field}={cfg[field]}: CLIP's attention uses {CLIP_HEAD_DIM}-wide heads, "
        f"i.e. {width // CLIP_HEAD_DIM} heads for {width_field}={cfg[width_field]}; other head "
        f"counts would silently compute a different function with CLIP's weights"
      )


# ----------------------------------------------------------------------------------------------------------------
# The name tables: (our path, OpenAI key, transform, the key's number of dimensions) per variable.

Transform = Callable[[np.ndarray], np.ndarray]
_Entries = List[Tuple[VariablePath, str, Transform, int]]


def conv_kernel(w: np.ndarray) -> np.ndarray:
  return w.transpose(2, 3, 1, 0)  # OIHW → HWIO.


def dense_kernel(w: np.ndarray) -> np.ndarray:
  return w.T  # (out, in) → (in, out).


def _heads_in(w: np.ndarray, heads: int) -> np.ndarray:
  return w.T.reshape(w.shape[1], heads, -1)  # (out, in) → (in, heads, head_dim); PyTorch heads split `out`.


def _heads_out(w: np.ndarray, heads: int) -> np.ndarray:
  return w.T.reshape(heads, -1, w.shape[0])  # (out, in) → (heads, head_dim, out).


def _heads_bias(b: np.ndarray, heads: int) -> np.ndarray:
  return b.reshape(heads, -1)


def _rows(part: int, fn: Transform) -> Transform:
  """Applies fn to the part-th third of a packed q/k/v `in_proj` tensor (rows q, then k, then v)."""

  def take(x):
    if x.shape[0] % 3:
      raise ValueError("packed in_proj tensor's first dimension is not divisible by 3")
    n = x.shape[0] // 3
    return fn(x[part * n : (part + 1) * n])

  return take


def _drop_class_position(pos: np.ndarray) -> np.ndarray:
  return pos[1:]  # CRIS's pool has no class token: only the g×g spatial positions are used.


def identity(x: np.ndarray) -> np.ndarray:
  return x


def _conv_bn_entries(ours: VariablePath, conv_key: str, bn_prefix: str) -> _Entries:
  return [
    (("params",) + ours + ("conv", "kernel"), conv_key, conv_kernel, 4),
    (("params",) + ours + ("bn", "scale"), f"{bn_prefix}.weight", identity, 1),
    (("params",) + ours + ("bn", "bias"), f"{bn_prefix}.bias", identity, 1),
    (("batch_stats",) + ours + ("bn", "mean"), f"{bn_prefix}.running_mean", identity, 1),
    (("batch_stats",) + ours + ("bn", "var"), f"{bn_prefix}.running_var", identity, 1),
  ]


def _image_entries(vision_layers: Sequence[int], heads: int) -> _Entries:
  entries: _Entries = []
  for i in (1, 2, 3):
    entries += _conv_bn_entries(("image_encoder", f"stem{i}"), f"visual.conv{i}.weight", f"visual.bn{i}")
  for stage, num_blocks in enumerate(vision_layers, start=1):
    for block in range(num_blocks):
      src, ours = f"visual.layer{stage}.{block}", ("image_encoder", f"layer{stage}_{block}")
      for k in (1, 2, 3):
        entries += _conv_bn_entries(ours + (f"conv{k}",), f"{src}.conv{k}.weight", f"{src}.bn{k}")
      if block == 0:  # CLIP's Sequential(AvgPool "-1", Conv "0", BN "1"): the first block of every stage.
        entries += _conv_bn_entries(ours + ("downsample",), f"{src}.downsample.0.weight", f"{src}.downsample.1")
  pool = ("params", "image_encoder", "attnpool")
  entries.append((loading.GRID_POSITIONS, "visual.attnpool.positional_embedding", _drop_class_position, 2))
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    entries.append(
      (
        pool + ("attn", ours, "kernel"),
        f"visual.attnpool.{theirs}.weight",
        functools.partial(_heads_in, heads=heads),
        2,
      )
    )
    entries.append(
      (pool + ("attn", ours, "bias"), f"visual.attnpool.{theirs}.bias", functools.partial(_heads_bias, heads=heads), 1)
    )
  entries.append(
    (
      pool + ("attn", "c_proj", "kernel"),
      "visual.attnpool.c_proj.weight",
      functools.partial(_heads_out, heads=heads),
      2,
    )
  )
  entries.append((pool + ("attn", "c_proj", "bias"), "visual.attnpool.c_proj.bias", identity, 1))
  return entries


def text_entries(text_layers: int, heads: int) -> _Entries:
  text = ("params", "text_encoder")
  entries: _Entries = [
    (text + ("token_embedding", "embedding"), "token_embedding.weight", identity, 2),
    (loading.TEXT_POSITIONS, "positional_embedding", identity, 2),
  ]
  for i in range(text_layers):
    src, ours = f"transformer.resblocks.{i}", text + (f"resblocks_{i}",)
    for ln in ("ln_1", "ln_2"):
      entries += [
        (ours + (ln, "scale"), f"{src}.{ln}.weight", identity, 1),
        (ours + (ln, "bias"), f"{src}.{ln}.bias", identity, 1),
      ]
    for part, name in enumerate(("query", "key", "value")):
      entries += [
        (
          ours + ("attn", name, "kernel"),
          f"{src}.attn.in_proj_weight",
          _rows(part, functools.partial(_heads_in, heads=heads)),
          2,
        ),
        (
          ours + ("attn", name, "bias"),
          f"{src}.attn.in_proj_bias",
          _rows(part, functools.partial(_heads_bias, heads=heads)),
          1,
        ),
      ]
    entries += [
      (ours + ("attn", "out", "kernel"), f"{src}.attn.out_proj.weight", functools.partial(_heads_out, heads=heads), 2),
      (ours + ("attn", "out", "bias"), f"{src}.attn.out_proj.bias", identity, 1),
    ]
    for fc in ("c_fc", "c_proj"):
      entries += [
        (ours + (fc, "kernel"), f"{src}.mlp.{fc}.weight", dense_kernel, 2),
        (ours + (fc, "bias"), f"{src}.mlp.{fc}.bias", identity, 1),
      ]
  entries += [
    (text + ("ln_final", "scale"), "ln_final.weight", identity, 1),
    (text + ("ln_final", "bias"), "ln_final.bias", identity, 1),
    (text + ("text_projection",), "text_projection", identity, 2),
  ]  # Used as x @ P: no transpose.
  return entries


# ----------------------------------------------------------------------------------------------------------------
# Conversion.


def convert_openai_state_dict(
  state_dict: Mapping[str, Any], config: Any, *, source: str = "<state dict>", source_format: str = "mapping"
) -> Tuple[Dict[str, Any], reports.ConversionReport]:
  """OpenAI-named CLIP ResNet state dict → FCNet encoder variables, positional embeddings as stored in CLIP.

  Args:
    state_dict: key → NumPy array or torch tensor, OpenAI/open_clip names (`visual.conv1.weight`,
      `transformer.resblocks.0.attn.in_proj_weight`, `text_projection`, ...).
    config: the experiment config (or its `model` section); fixes the architecture the weights must fit.
    source, source_format: shown in the report.

  Returns:
    ({"params": {"image_encoder": ..., "text_encoder": ...}, "batch_stats": {"image_encoder": ...}}, report).
    Text positional embedding: all of CLIP's positions (77×W); attention pool: g²×C (class position dropped).
    `loading.load_pretrained` fits both to the model.

  Raises:
    ValueError naming the key and both shapes when a tensor does not fit the config, or the config field when
    the block structure / head counts differ; KeyError naming missing keys.
  """
  cfg = loading.model_config(config)
  arch = infer_architecture(state_dict)
  check_architecture(arch, cfg)  # Before the (slower) abstract initialisation of the model.
  expected = flax.traverse_util.flatten_dict(loading.abstract_variables(cfg, encoders_only=True))
  entries = _image_entries(arch.vision_layers, cfg["vision_heads"]) + text_entries(arch.text_layers, cfg["text_heads"])
  missing = sorted({key for _, key, _, _ in entries if key not in state_dict})
  if missing:
    raise KeyError(f"CLIP state dict lacks {len(missing)} keys the model needs: {reports.abbreviate(missing)}")

  cache: Dict[str, np.ndarray] = {}
  flat: Dict[VariablePath, np.ndarray] = {}
  converted = []
  for path, key, transform, ndim in entries:
    if key not in cache:
      cache[key] = formats.to_numpy(state_dict[key])
    array = convert_entry(
      cache[key],
      transform,
      ndim,
      expected[path].shape,
      positional=path in (loading.TEXT_POSITIONS, loading.GRID_POSITIONS),
    )
    if array is None:
      raise ValueError(
        f"CLIP key {key!r} has shape {cache[key].shape}, which does not fit {reports.path_str(path)} of shape "
        f"{tuple(expected[path].shape)} in the model of config.model (vision_width={cfg['vision_width']}, "
        f"embed_dim={cfg['embed_dim']}, text_width={cfg['text_width']}); checkpoint: {arch}"
      )
    flat[path] = array
    converted.append((reports.path_str(path), tuple(array.shape), key))

  expected_from_clip = {p for p in expected if not any(p[1 : 1 + len(n)] == n for n in NOT_IN_CLIP)}
  if set(flat) != expected_from_clip:  # The key tables above must cover the model exactly.
    raise AssertionError(
      f"conversion table out of sync with the model: "
      f"{sorted(map(reports.path_str, expected_from_clip ^ set(flat)))[:5]}"
    )
  ignored = sorted(k for k in state_dict if k in IGNORED_KEYS or k.endswith(".num_batches_tracked"))
  unused = sorted(k for k in state_dict if k not in cache and k not in ignored)
  report = reports.ConversionReport(
    source=source,
    source_format=source_format,
    architecture=str(arch),
    converted=converted,
    positions=[
      f"text positional embedding: all {arch.context_length} CLIP positions kept (the model uses the first L)",
      f"attention-pool positional embedding: class position dropped, {arch.grid}×{arch.grid} grid "
      f"kept (resized to the model's (S/32)² grid when loaded)",
    ],
    ignored_keys=ignored,
    unused_keys=unused,
  )
  return flax.traverse_util.unflatten_dict(flat), report


def convert_entry(
  source: np.ndarray, transform: Transform, ndim: int, target: Sequence[int], positional: bool
) -> Optional[np.ndarray]:
  """transform(source) when it fits the model's `target` shape, else None. Positional embeddings are fitted to
  the model when loaded, so only their width must agree now."""
  if source.ndim != ndim:
    return None
  try:
    array = np.ascontiguousarray(transform(source))
  except ValueError:
    return None
  fits = array.shape[1:] == tuple(target)[1:] if positional else array.shape == tuple(target)
  return array if fits else None
