"""CLIP RN50 / RN101 weights → FCNet's image and text encoders (paper sec. 4.1: encoders initialised from CLIP).

Three steps, each usable on its own:

    state_dict, fmt = read_state_dict("RN101.pt")        # OpenAI TorchScript, torch.save or safetensors
    pretrained, conversion = convert_openai_state_dict(state_dict, config)
    variables, report = load_pretrained(fresh_variables, pretrained)   # fresh = model.init(...)

`from_openai_state_dict(state_dict, config)` does the first two and fits the positional embeddings to the
config (what the parity tests feed to the model); `restore_converted(dir)` reads what
`python -m fcnet_jax.tools.convert_clip` wrote.

Layouts (PyTorch → Flax): Conv OIHW → HWIO; Linear (out, in) → (in, out); attention q/k/v (out, in) →
(in, heads, head_dim) and output projections (out, in) → (heads, head_dim, out), the `nn.DenseGeneral` layouts
of `layers.MultiHeadAttention`; BatchNorm weight/bias/running_mean/running_var → scale/bias/mean/var.

Positional embeddings are stored as CLIP has them (77 text positions; the attention pool's g×g grid without
its class position) so one converted checkpoint serves every image size and context length; they are fitted
to the model when loaded: the text embedding keeps its first L positions, the grid is resized bicubically to
(S/32)² with `image_encoder.resize_pos_embed` (PyTorch's bicubic, as CRIS resizes it on the fly).

PyTorch is optional: it is imported only to read `.pt/.pth/.bin` files or when torch tensors are passed.
"""
import dataclasses
import functools
import json
import os
import re
import warnings
import zipfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fcnet_jax.models import fcnet
from fcnet_jax.models import image_encoder

VariablePath = Tuple[str, ...]  # (collection, module, ..., leaf), e.g. ("params", "image_encoder", "stem1", "conv", "kernel").

# Keys of OpenAI / open_clip CLIP state dicts that FCNet has no use for (`num_batches_tracked` too, by suffix).
IGNORED_KEYS = ("logit_scale", "logit_bias", "input_resolution", "context_length", "vocab_size")
TEXT_POSITIONS = ("params", "text_encoder", "positional_embedding")
GRID_POSITIONS = ("params", "image_encoder", "attnpool", "positional_embedding")
# Parts of the encoders CLIP does not have: CRIS's residual branch of the attention pool.
NOT_IN_CLIP = (("image_encoder", "attnpool", "connect"),)
KNOWN_RESNETS = {(3, 4, 6, 3): "RN50", (3, 4, 23, 3): "RN101"}
CLIP_HEAD_DIM = 64  # CLIP's heads: vision_width·32/64 in the attention pool, text_width/64 in the transformer.
CHECKPOINT_SUBDIR = "variables"


def _path_str(path: Sequence[str]) -> str:
  return "/".join(path)


def _count(shape: Sequence[int]) -> int:
  return int(np.prod(shape, dtype=np.int64))


def _millions(n: int) -> str:
  return f"{n / 1e6:.3f} M"


# ----------------------------------------------------------------------------------------------------------------
# Reports.


@dataclasses.dataclass
class ConversionReport:
  """What `convert_openai_state_dict` made of a state dict.

  Attributes:
    source: file name (or "<state dict>").
    source_format: how it was read (TorchScript archive, torch.save pickle, safetensors, in-memory mapping).
    architecture: e.g. "CLIP RN101 (vision_layers (3, 4, 23, 3), width 64, embed_dim 512; text 12×512)".
    converted: (our variable path, shape, source key(s)) for every array produced.
    positions: notes on the positional embeddings as stored (class position dropped, grid size).
    ignored_keys: keys FCNet never uses (logit_scale, num_batches_tracked, ...).
    unused_keys: other keys of the state dict that no variable was made from.
  """
  source: str
  source_format: str
  architecture: str
  converted: List[Tuple[str, Tuple[int, ...], str]]
  positions: List[str]
  ignored_keys: List[str]
  unused_keys: List[str]

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  def __str__(self) -> str:
    per_module: Dict[str, List[int]] = {}
    for path, shape, _ in self.converted:
      collection, module = path.split("/")[:2]
      counts = per_module.setdefault(module, [0, 0])
      counts[collection == "batch_stats"] += _count(shape)
    lines = [f"Converted {self.source} ({self.source_format})", f"  architecture: {self.architecture}",
             f"  {len(self.converted)} arrays:"]
    for module, (params, stats) in per_module.items():
      lines.append(f"    {module:<16} {_millions(params)} parameters"
                   + (f" + {stats:,} BatchNorm statistics" if stats else ""))
    lines += [f"  {note}" for note in self.positions]
    lines.append(f"  ignored keys ({len(self.ignored_keys)}): "
                 + _abbreviate(self.ignored_keys))
    lines.append(f"  UNUSED keys ({len(self.unused_keys)}): {_abbreviate(self.unused_keys)}" if self.unused_keys
                 else "  unused keys: none")
    return "\n".join(lines)


@dataclasses.dataclass
class LoadReport:
  """What `load_pretrained` did to a freshly initialised model's variables.

  Attributes:
    loaded: (path, number of values) of every array taken from the pretrained variables.
    resized: (path, pretrained shape, model shape, how) of the positional embeddings fitted to the model.
    new: (path, number of values) of every array left at its fresh initialisation.
  """
  loaded: List[Tuple[str, int]]
  resized: List[Tuple[str, Tuple[int, ...], Tuple[int, ...], str]]
  new: List[Tuple[str, int]]

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def loaded_parameters(self) -> int:
    return sum(n for path, n in self.loaded if path.startswith("params/"))

  @property
  def new_parameters(self) -> int:
    return sum(n for path, n in self.new if path.startswith("params/"))

  def __str__(self) -> str:
    loaded_paths = [path for path, _ in self.loaded]
    lines = [f"Loaded {len(self.loaded)} arrays: {_millions(self.loaded_parameters)} parameters"
             f" + {sum(n for p, n in self.loaded if p.startswith('batch_stats/')):,} BatchNorm statistics"]
    for group, n in _group_counts(self.loaded, []).items():
      lines.append(f"    {group:<40} {_millions(n)}")
    lines.append(f"Resized {len(self.resized)} positional embeddings:" if self.resized
                 else "Resized: nothing (positional embeddings already fit the model)")
    for path, source, target, how in self.resized:
      lines.append(f"    {path}: {source} → {target} ({how})")
    lines.append(f"Left at fresh initialisation: {len(self.new)} arrays, {_millions(self.new_parameters)} "
                 f"parameters (+ their BatchNorm statistics):")
    for group, n in _group_counts(self.new, loaded_paths).items():
      lines.append(f"    {group:<40} {_millions(n)}")
    return "\n".join(lines)


def _abbreviate(keys: Sequence[str], limit: int = 8) -> str:
  if not keys:
    return "none"
  shown = ", ".join(keys[:limit])
  return shown + (f", … (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _group_counts(entries: Sequence[Tuple[str, int]], other_paths: Sequence[str]) -> Dict[str, int]:
  """Parameter counts (params collection only) per largest module subtree that holds none of `other_paths`.

  With `other_paths` = the loaded arrays, the new arrays group as e.g. `neck`, `decoder` and
  `image_encoder/attnpool/connect`; with no other paths every entry groups under its top-level module.
  """
  blocked = set()
  for path in other_paths:
    parts = path.split("/")[1:]
    blocked.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
  groups: Dict[str, int] = {}
  for path, n in entries:
    parts = path.split("/")
    if parts[0] != "params":
      continue
    parts = parts[1:]
    depth = next((i for i in range(1, len(parts) + 1) if "/".join(parts[:i]) not in blocked), len(parts))
    group = "/".join(parts[:depth])
    groups[group] = groups.get(group, 0) + n
  return groups


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoints.


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading PyTorch checkpoints (.pt/.pth/.bin, OpenAI's TorchScript RN50.pt/RN101.pt) needs "
                      "PyTorch: `pip install torch` (the CPU wheel is enough), or convert the open_clip "
                      "safetensors file (open_clip_model.safetensors from the Hugging Face repos "
                      "timm/resnet50_clip.openai, timm/resnet101_clip.openai), which needs no torch") from e
  return torch


def _is_safetensors(path: str) -> bool:
  """safetensors: 8-byte little-endian header length, then a JSON header that starts with '{'."""
  with open(path, "rb") as f:
    head = f.read(9)
  if len(head) < 9:
    return False
  header_len = int.from_bytes(head[:8], "little")
  return head[8:9] == b"{" and 0 < header_len < os.path.getsize(path)


def _unwrap_state_dict(obj: Any, path: str) -> Mapping[str, Any]:
  """The tensor mapping inside a torch.load result (training checkpoints nest it; DDP prefixes 'module.')."""
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
    raise ValueError(f"{path}: expected a state dict (a mapping from names to tensors), got {type(obj).__name__}")
  if all(k.startswith("module.") for k in obj):
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return obj


def read_state_dict(path: str) -> Tuple[Mapping[str, Any], str]:
  """Reads a CLIP checkpoint into a name → array mapping. Returns (state_dict, format description).

  Formats, detected from the content (the extension only has to agree):
    - OpenAI's released RN50.pt / RN101.pt: TorchScript zip archives (`torch.jit.load(...).state_dict()`).
    - `torch.save`d state dicts (.pt/.pth/.bin, zip or legacy pickle), e.g. open_clip_pytorch_model.bin;
      a {"state_dict": ...} training checkpoint and DDP's "module." prefix are unwrapped.
    - safetensors, e.g. open_clip_model.safetensors (read with NumPy, no torch needed).
  A directory is searched for open_clip_model.safetensors, then open_clip_pytorch_model.bin.
  """
  if os.path.isdir(path):
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
      if os.path.isfile(os.path.join(path, name)):
        state_dict, source_format = read_state_dict(os.path.join(path, name))
        return state_dict, f"{source_format}: {name}"
    raise FileNotFoundError(f"{path} is a directory without open_clip_model.safetensors or "
                            f"open_clip_pytorch_model.bin; pass the checkpoint file itself")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"CLIP checkpoint {path} does not exist")
  ext = os.path.splitext(path)[1].lower()
  if _is_safetensors(path):
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    return safetensors_numpy.load_file(path), "safetensors"
  if ext == ".safetensors":
    raise ValueError(f"{path} has a .safetensors extension but no safetensors header (truncated download?)")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic == b"PK\x03\x04":
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
      torch = _torch()
      with warnings.catch_warnings():  # torch ≥ 2.9 deprecates TorchScript; OpenAI's releases are TorchScript.
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(path, map_location="cpu")
      return dict(module.state_dict()), "TorchScript archive"
    torch = _torch()
    return _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True), path), "torch.save zip"
  if magic[:1] == b"\x80":  # Pickle protocol ≥ 2: torch.save's legacy format.
    torch = _torch()
    return _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True), path), "torch.save pickle"
  raise ValueError(f"{path}: not a TorchScript archive, torch.save file or safetensors file (starts with "
                   f"{magic!r}); expected OpenAI's RN50.pt/RN101.pt or open_clip_model.safetensors")


def _to_numpy(value: Any) -> np.ndarray:
  """A float32 NumPy copy of an array or torch tensor (OpenAI's files hold float16 weights)."""
  if hasattr(value, "detach") and type(value).__module__.startswith("torch"):
    value = value.detach().cpu().float().numpy()  # .float() first: bfloat16 has no NumPy equivalent.
  return np.asarray(value, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Architecture.


def _model_config(config: Any) -> Dict[str, Any]:
  """config.model as a plain dict with every FCNet field (accepts the full config, config.model or a dict)."""
  model_config = config.model if hasattr(config, "model") else config
  cfg = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
  fields = {name: fcnet.FCNet.__dataclass_fields__[name].default for name in fcnet.FCNet.__annotations__}
  return {**fields, **cfg}


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
    return (f"{self.name} (vision_layers {self.vision_layers}, width {self.vision_width}, embed_dim "
            f"{self.embed_dim}, attention-pool grid {self.grid}×{self.grid}; text {self.text_layers} layers × "
            f"{self.text_width}, {self.context_length} positions, vocabulary {self.vocab_size})")


def _shape(state_dict: Mapping[str, Any], key: str) -> Tuple[int, ...]:
  if key not in state_dict:
    raise KeyError(f"CLIP state dict has no key {key!r}")
  return tuple(int(d) for d in state_dict[key].shape)


def infer_architecture(state_dict: Mapping[str, Any]) -> ClipArchitecture:
  """Reads block counts and widths from the key names and shapes (fails clearly on non-ResNet checkpoints)."""
  keys = list(state_dict)
  if "visual.layer1.0.conv1.weight" not in state_dict:
    if "visual.proj" in state_dict or "visual.class_embedding" in state_dict:
      raise ValueError("this is a CLIP ViT checkpoint; FCNet's image encoder is CLIP's ModifiedResNet "
                       "(use RN50.pt / RN101.pt or timm/resnet{50,101}_clip.openai)")
    if any(k.startswith("visual.trunk.") for k in keys):
      raise ValueError("this is an open_clip checkpoint with a timm image tower (visual.trunk.*), not OpenAI's "
                       "ModifiedResNet layout")
    raise ValueError(f"not a CLIP ResNet state dict: no key 'visual.layer1.0.conv1.weight' (first keys: "
                     f"{_abbreviate(keys, 5)})")
  blocks = []
  for stage in range(1, 5):
    pattern = re.compile(rf"visual\.layer{stage}\.(\d+)\.")
    indices = {int(m.group(1)) for m in map(pattern.match, keys) if m}
    if not indices or indices != set(range(len(indices))):
      raise ValueError(f"CLIP state dict: visual.layer{stage} blocks are missing or not numbered 0..n-1 "
                       f"(found {sorted(indices)})")
    blocks.append(len(indices))
  text_pattern = re.compile(r"transformer\.resblocks\.(\d+)\.")
  text_layers = len({m.group(1) for m in map(text_pattern.match, keys) if m})
  grid_positions = _shape(state_dict, "visual.attnpool.positional_embedding")[0] - 1
  grid = int(round(np.sqrt(grid_positions)))
  if grid * grid != grid_positions:
    raise ValueError(f"visual.attnpool.positional_embedding has {grid_positions + 1} positions; expected a "
                     f"class position plus a square grid")
  return ClipArchitecture(
      vision_layers=tuple(blocks), vision_width=_shape(state_dict, "visual.layer1.0.conv1.weight")[0],
      embed_dim=_shape(state_dict, "visual.attnpool.c_proj.weight")[0], grid=grid, text_layers=text_layers,
      text_width=_shape(state_dict, "ln_final.weight")[0],
      context_length=_shape(state_dict, "positional_embedding")[0],
      vocab_size=_shape(state_dict, "token_embedding.weight")[0])


def _check_architecture(arch: ClipArchitecture, cfg: Mapping[str, Any]):
  """Fails with the config field to change when the checkpoint's structure cannot fit config.model."""
  if tuple(cfg["vision_layers"]) != arch.vision_layers:
    ours = KNOWN_RESNETS.get(tuple(cfg["vision_layers"]), "a custom ModifiedResNet")
    raise ValueError(
        f"the checkpoint is {arch.name} with vision_layers {arch.vision_layers} (counted from the "
        f"visual.layerN.* keys) but config.model.vision_layers={tuple(cfg['vision_layers'])} ({ours}); use "
        f"a config for this backbone (configs/refcoco_r50.py for RN50, configs/refcoco_r101.py for RN101)")
  if cfg["text_layers"] != arch.text_layers:
    raise ValueError(f"the checkpoint's text transformer has {arch.text_layers} layers (transformer.resblocks.N) "
                     f"but config.model.text_layers={cfg['text_layers']}")
  if cfg["context_length"] > arch.context_length:
    raise ValueError(f"config.model.context_length={cfg['context_length']} exceeds the checkpoint's "
                     f"{arch.context_length} text positions (positional_embedding)")
  # Head counts are not stored in the weights; CLIP's are fixed by its 64-wide heads.
  for field, width_field, width in (("vision_heads", "vision_width", cfg["vision_width"] * 32),
                                    ("text_heads", "text_width", cfg["text_width"])):
    if cfg[field] * CLIP_HEAD_DIM != width:
      raise ValueError(f"config.model.{field}={cfg[field]}: CLIP's attention uses {CLIP_HEAD_DIM}-wide heads, "
                       f"i.e. {width // CLIP_HEAD_DIM} heads for {width_field}={cfg[width_field]}; other head "
                       f"counts would silently compute a different function with CLIP's weights")


# ----------------------------------------------------------------------------------------------------------------
# Conversion.


def _conv(w: np.ndarray) -> np.ndarray:
  return w.transpose(2, 3, 1, 0)  # OIHW → HWIO.


def _dense(w: np.ndarray) -> np.ndarray:
  return w.T  # (out, in) → (in, out).


def _heads_in(w: np.ndarray, heads: int) -> np.ndarray:
  return w.T.reshape(w.shape[1], heads, -1)  # (out, in) → (in, heads, head_dim); PyTorch heads split `out`.


def _heads_out(w: np.ndarray, heads: int) -> np.ndarray:
  return w.T.reshape(heads, -1, w.shape[0])  # (out, in) → (heads, head_dim, out).


def _heads_bias(b: np.ndarray, heads: int) -> np.ndarray:
  return b.reshape(heads, -1)


def _rows(part: int, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
  """Applies fn to the part-th third of a packed q/k/v `in_proj` tensor (rows q, then k, then v)."""
  def take(x):
    if x.shape[0] % 3:
      raise ValueError("packed in_proj tensor's first dimension is not divisible by 3")
    n = x.shape[0] // 3
    return fn(x[part * n:(part + 1) * n])
  return take


def _drop_class_position(pos: np.ndarray) -> np.ndarray:
  return pos[1:]  # CRIS's pool has no class token: only the g×g spatial positions are used.


def _identity(x: np.ndarray) -> np.ndarray:
  return x


_Entries = List[Tuple[VariablePath, str, Callable[[np.ndarray], np.ndarray], int]]  # (our path, key, transform, ndim)


def _conv_bn_entries(ours: VariablePath, conv_key: str, bn_prefix: str) -> _Entries:
  return [(("params",) + ours + ("conv", "kernel"), conv_key, _conv, 4),
          (("params",) + ours + ("bn", "scale"), f"{bn_prefix}.weight", _identity, 1),
          (("params",) + ours + ("bn", "bias"), f"{bn_prefix}.bias", _identity, 1),
          (("batch_stats",) + ours + ("bn", "mean"), f"{bn_prefix}.running_mean", _identity, 1),
          (("batch_stats",) + ours + ("bn", "var"), f"{bn_prefix}.running_var", _identity, 1)]


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
  entries.append((GRID_POSITIONS, "visual.attnpool.positional_embedding", _drop_class_position, 2))
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    entries.append((pool + ("attn", ours, "kernel"), f"visual.attnpool.{theirs}.weight",
                    functools.partial(_heads_in, heads=heads), 2))
    entries.append((pool + ("attn", ours, "bias"), f"visual.attnpool.{theirs}.bias",
                    functools.partial(_heads_bias, heads=heads), 1))
  entries.append((pool + ("attn", "c_proj", "kernel"), "visual.attnpool.c_proj.weight",
                  functools.partial(_heads_out, heads=heads), 2))
  entries.append((pool + ("attn", "c_proj", "bias"), "visual.attnpool.c_proj.bias", _identity, 1))
  return entries


def _text_entries(text_layers: int, heads: int) -> _Entries:
  text = ("params", "text_encoder")
  entries: _Entries = [(text + ("token_embedding", "embedding"), "token_embedding.weight", _identity, 2),
                       (TEXT_POSITIONS, "positional_embedding", _identity, 2)]
  for i in range(text_layers):
    src, ours = f"transformer.resblocks.{i}", text + (f"resblocks_{i}",)
    for ln in ("ln_1", "ln_2"):
      entries += [(ours + (ln, "scale"), f"{src}.{ln}.weight", _identity, 1),
                  (ours + (ln, "bias"), f"{src}.{ln}.bias", _identity, 1)]
    for part, name in enumerate(("query", "key", "value")):
      entries += [
          (ours + ("attn", name, "kernel"), f"{src}.attn.in_proj_weight",
           _rows(part, functools.partial(_heads_in, heads=heads)), 2),
          (ours + ("attn", name, "bias"), f"{src}.attn.in_proj_bias",
           _rows(part, functools.partial(_heads_bias, heads=heads)), 1)]
    entries += [(ours + ("attn", "out", "kernel"), f"{src}.attn.out_proj.weight",
                 functools.partial(_heads_out, heads=heads), 2),
                (ours + ("attn", "out", "bias"), f"{src}.attn.out_proj.bias", _identity, 1)]
    for fc in ("c_fc", "c_proj"):
      entries += [(ours + (fc, "kernel"), f"{src}.mlp.{fc}.weight", _dense, 2),
                  (ours + (fc, "bias"), f"{src}.mlp.{fc}.bias", _identity, 1)]
  entries += [(text + ("ln_final", "scale"), "ln_final.weight", _identity, 1),
              (text + ("ln_final", "bias"), "ln_final.bias", _identity, 1),
              (text + ("text_projection",), "text_projection", _identity, 2)]  # Used as x @ P: no transpose.
  return entries


def _encode_both(module: fcnet.FCNet, images: jax.Array, tokens: jax.Array):
  return module.encode_image(images), module.encode_text(tokens)


def abstract_variables(config: Any, encoders_only: bool = False) -> Dict[str, Any]:
  """Shapes/dtypes (jax.ShapeDtypeStruct) of the variables FCNet(config.model) initialises, without computing.

  With `encoders_only`, only the image- and text-encoder subtrees (what CLIP provides).
  """
  cfg = _model_config(config)
  model = fcnet.build_model(cfg)
  images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, model.context_length), jnp.int32)
  init = functools.partial(model.init, method=_encode_both) if encoders_only else functools.partial(
      model.init, train=False)
  variables = jax.eval_shape(init, jax.random.key(0), images, tokens)
  return flax.core.unfreeze(variables)


def convert_openai_state_dict(state_dict: Mapping[str, Any], config: Any, *, source: str = "<state dict>",
                              source_format: str = "mapping") -> Tuple[Dict[str, Any], ConversionReport]:
  """OpenAI-named CLIP ResNet state dict → FCNet encoder variables, positional embeddings as stored in CLIP.

  Args:
    state_dict: key → NumPy array or torch tensor, OpenAI/open_clip names (`visual.conv1.weight`,
      `transformer.resblocks.0.attn.in_proj_weight`, `text_projection`, ...).
    config: the experiment config (or its `model` section); fixes the architecture the weights must fit.
    source, source_format: shown in the report.

  Returns:
    ({"params": {"image_encoder": ..., "text_encoder": ...}, "batch_stats": {"image_encoder": ...}}, report).
    Text positional embedding: all of CLIP's positions (77×W); attention pool: g²×C (class position dropped).
    `load_pretrained` fits both to the model.

  Raises:
    ValueError naming the key and both shapes when a tensor does not fit the config, or the config field when
    the block structure / head counts differ; KeyError naming missing keys.
  """
  cfg = _model_config(config)
  arch = infer_architecture(state_dict)
  _check_architecture(arch, cfg)  # Before the (slower) abstract initialisation of the model.
  expected = flax.traverse_util.flatten_dict(abstract_variables(cfg, encoders_only=True))
  return _convert(state_dict, arch, cfg, expected, source, source_format)


def _convert(state_dict: Mapping[str, Any], arch: ClipArchitecture, cfg: Mapping[str, Any],
             expected: Mapping[VariablePath, Any], source: str, source_format: str) -> Tuple[Dict[str, Any],
                                                                                     ConversionReport]:
  """`convert_openai_state_dict` given the checked architecture and the model's flattened abstract encoder
  variables."""
  entries = (_image_entries(arch.vision_layers, cfg["vision_heads"])
             + _text_entries(arch.text_layers, cfg["text_heads"]))
  missing = sorted({key for _, key, _, _ in entries if key not in state_dict})
  if missing:
    raise KeyError(f"CLIP state dict lacks {len(missing)} keys the model needs: {_abbreviate(missing)}")

  cache: Dict[str, np.ndarray] = {}
  flat: Dict[VariablePath, np.ndarray] = {}
  converted = []
  for path, key, transform, ndim in entries:
    if key not in cache:
      cache[key] = _to_numpy(state_dict[key])
    source_array = cache[key]
    target = expected[path].shape
    positional = path in (TEXT_POSITIONS, GRID_POSITIONS)
    fits = source_array.ndim == ndim
    if fits:
      try:
        array = np.ascontiguousarray(transform(source_array))
      except ValueError:
        fits = False
    # Positional embeddings are fitted to the model later; only their width must agree now.
    fits = fits and (array.shape[1:] == target[1:] if positional else array.shape == tuple(target))
    if not fits:
      raise ValueError(
          f"CLIP key {key!r} has shape {source_array.shape}, which does not fit {_path_str(path)} of shape "
          f"{tuple(target)} in the model of config.model (vision_width={cfg['vision_width']}, "
          f"embed_dim={cfg['embed_dim']}, text_width={cfg['text_width']}); checkpoint: {arch}")
    flat[path] = array
    converted.append((_path_str(path), tuple(array.shape), key))

  expected_from_clip = {p for p in expected if not any(p[1:1 + len(n)] == n for n in NOT_IN_CLIP)}
  if set(flat) != expected_from_clip:  # The key tables above must cover the model exactly.
    raise AssertionError(f"conversion table out of sync with the model: "
                         f"{sorted(map(_path_str, expected_from_clip ^ set(flat)))[:5]}")
  used = set(cache)
  ignored = sorted(k for k in state_dict if k in IGNORED_KEYS or k.endswith(".num_batches_tracked"))
  unused = sorted(k for k in state_dict if k not in used and k not in ignored)
  report = ConversionReport(
      source=source, source_format=source_format, architecture=str(arch), converted=converted,
      positions=[f"text positional embedding: all {arch.context_length} CLIP positions kept (the model uses "
                 f"the first L)",
                 f"attention-pool positional embedding: class position dropped, {arch.grid}×{arch.grid} grid "
                 f"kept (resized to the model's (S/32)² grid when loaded)"],
      ignored_keys=ignored, unused_keys=unused)
  return flax.traverse_util.unflatten_dict(flat), report


# ----------------------------------------------------------------------------------------------------------------
# Fitting to a model and merging.


def fit_positional_embedding(path: VariablePath, pretrained: np.ndarray,
                             target_shape: Sequence[int]) -> Tuple[np.ndarray, Optional[str]]:
  """Fits a positional embedding to the model's shape. Returns (array, how) with how=None when unchanged.

  Text (L×W): CLIP's first L positions (CLIP's causal transformer never saw later positions before earlier
  ones, so the prefix is exactly what a length-L CLIP computes). Attention pool (h·w×C): PyTorch-bicubic
  resize of the square grid (`image_encoder.resize_pos_embed`), as CRIS does at run time.
  """
  target_shape = tuple(target_shape)
  if pretrained.shape == target_shape:
    return pretrained, None
  if pretrained.ndim != 2 or pretrained.shape[1:] != target_shape[1:]:
    raise ValueError(f"pretrained {_path_str(path)} has shape {pretrained.shape} but the model has "
                     f"{target_shape}")
  if path == TEXT_POSITIONS:
    if pretrained.shape[0] < target_shape[0]:
      raise ValueError(f"pretrained {_path_str(path)} has {pretrained.shape[0]} positions but the model needs "
                       f"{target_shape[0]} (config.model.context_length)")
    return pretrained[:target_shape[0]], f"first {target_shape[0]} of {pretrained.shape[0]} positions"
  if path == GRID_POSITIONS:
    side = int(round(np.sqrt(target_shape[0])))
    if side * side != target_shape[0]:
      raise ValueError(f"{_path_str(path)}: the model's {target_shape[0]} positions are not a square grid")
    g = int(round(np.sqrt(pretrained.shape[0])))
    return (image_encoder.resize_pos_embed(pretrained, (side, side)),
            f"{g}×{g} grid resized to {side}×{side}, PyTorch bicubic")
  raise ValueError(f"pretrained {_path_str(path)} has shape {pretrained.shape} but the model has {target_shape}")


def load_pretrained(variables: Mapping[str, Any], pretrained: Mapping[str, Any]) -> Tuple[Dict[str, Any],
                                                                                          LoadReport]:
  """Overlays pretrained (converted) variables on a freshly initialised model's variables.

  Args:
    variables: the model's variables ({"params": ..., "batch_stats": ...}) from `model.init` (or their
      `jax.ShapeDtypeStruct`s, to preview the report).
    pretrained: a subset of the same tree, e.g. `convert_openai_state_dict(...)[0]` or `restore_converted(dir)`.

  Returns:
    (variables with every pretrained array in place, cast to the fresh array's dtype, as NumPy arrays;
    report of what was loaded, resized and left new).

  Raises:
    ValueError naming the path and both shapes for every mismatch other than a positional embedding that
    `fit_positional_embedding` can fit, or a pretrained path the model does not have.
  """
  fresh = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  incoming = flax.traverse_util.flatten_dict(flax.core.unfreeze(pretrained))
  unknown = sorted(_path_str(p) for p in incoming if p not in fresh)
  if unknown:
    raise ValueError(f"pretrained variables the model does not have: {_abbreviate(unknown)}")
  merged, loaded, resized = dict(fresh), [], []
  for path, array in incoming.items():
    array = _to_numpy(array)
    target = fresh[path]
    if path in (TEXT_POSITIONS, GRID_POSITIONS):
      array, how = fit_positional_embedding(path, array, target.shape)
      if how:
        resized.append((_path_str(path), tuple(incoming[path].shape), tuple(target.shape), how))
    if array.shape != tuple(target.shape):
      raise ValueError(f"pretrained {_path_str(path)} has shape {array.shape} but the model has "
                       f"{tuple(target.shape)}")
    merged[path] = np.asarray(array, dtype=target.dtype)
    loaded.append((_path_str(path), _count(array.shape)))
  new = [(_path_str(p), _count(x.shape)) for p, x in fresh.items() if p not in incoming]
  result = flax.traverse_util.unflatten_dict(merged)
  for collection in variables:  # Keep empty collections (flattening drops them).
    result.setdefault(collection, {})
  return result, LoadReport(loaded=loaded, resized=resized, new=new)


def from_openai_state_dict(state_dict: Mapping[str, Any], config: Any) -> Dict[str, Any]:
  """OpenAI-named CLIP state dict → {"params": {...}, "batch_stats": {...}} of FCNet's two encoders.

  Unlike `convert_openai_state_dict`, the positional embeddings are fitted to `config` (first L text
  positions; attention-pool grid resized to (S/32)²), so the result can be applied directly, e.g.
  `model.apply(variables, images, method=FCNet.encode_image)`. Unused keys are logged.
  """
  cfg = _model_config(config)
  arch = infer_architecture(state_dict)
  _check_architecture(arch, cfg)
  target = flax.traverse_util.flatten_dict(abstract_variables(cfg, encoders_only=True))
  pretrained, report = _convert(state_dict, arch, cfg, target, "<state dict>", "mapping")
  if report.unused_keys:
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.warning("CLIP state dict: %d unused keys: %s", len(report.unused_keys),
                    _abbreviate(report.unused_keys))
  flat = flax.traverse_util.flatten_dict(pretrained)
  for path in (TEXT_POSITIONS, GRID_POSITIONS):
    flat[path] = fit_positional_embedding(path, flat[path], target[path].shape)[0]
  return flax.traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------------------------------------------
# Converted checkpoints on disk (written by fcnet_jax.tools.convert_clip).


def restore_converted(path: str) -> Dict[str, Any]:
  """Reads a checkpoint written by `python -m fcnet_jax.tools.convert_clip` (config.init_from).

  Args:
    path: the --out directory (holding `variables/`, report.txt, report.json) or its `variables/` folder.

  Returns:
    {"params": {...}, "batch_stats": {...}} as NumPy arrays, positional embeddings as stored in CLIP; pass it
    to `load_pretrained(fresh_variables, ...)`.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(os.fspath(path))
  checkpoint = os.path.join(path, CHECKPOINT_SUBDIR)
  if not os.path.isdir(checkpoint):
    checkpoint = path
  if not os.path.isfile(os.path.join(checkpoint, "_CHECKPOINT_METADATA")) and not os.path.isfile(
      os.path.join(checkpoint, "_METADATA")):
    raise FileNotFoundError(f"{path} is not a converted CLIP checkpoint (expected {CHECKPOINT_SUBDIR}/ with an "
                            f"Orbax checkpoint, written by `python -m fcnet_jax.tools.convert_clip`)")
  restored = ocp.StandardCheckpointer().restore(checkpoint)
  restored = jax.tree.map(np.asarray, dict(restored))
  if "params" not in restored:
    raise ValueError(f"{checkpoint}: no 'params' in the checkpoint")
  restored.setdefault("batch_stats", {})
  return restored


def save_converted(out_dir: str, pretrained: Mapping[str, Any], report_text: str, report_json: Mapping[str, Any]):
  """Writes `pretrained` (Orbax, under out_dir/variables) plus out_dir/report.txt and out_dir/report.json.

  `out_dir` must not exist yet: callers write to a temporary directory and rename it into place.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(out_dir, CHECKPOINT_SUBDIR), dict(pretrained))
  checkpointer.wait_until_finished()
  with open(os.path.join(out_dir, "report.txt"), "w") as f:
    f.write(report_text + "\n")
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report_json, f, indent=1)
