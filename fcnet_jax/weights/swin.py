"""Swin Transformer weights (timm or Microsoft names) + a CLIP text tower → FCNet's Swin-backbone encoders.

    swin_sd, fmt = swin.read_swin_state_dict("swin_base_patch4_window12_384_22k.pth")   # or timm's safetensors
    clip_sd, clip_fmt = formats.read_state_dict("RN101.pt")                             # any OpenAI/open_clip CLIP
    pretrained, image_report, text_report = swin.convert_swin_state_dicts(swin_sd, clip_sd, config)
    # → store.save_converted(out, pretrained, ...) (what `fcnet_jax.tools.convert_swin` does); config.init_from
    # loads it through `loading.load_pretrained`, which resizes the relative-position tables to the model's window.

Two layouts of the same tensors are read (`models/swin.py` names ours):
  - Microsoft's release (`swin_base_patch4_window12_384_22k.pth`, the `model` entry; what LAVT loads): patch merging
    at the end of a stage, `layers.{i}.downsample.*` for i = 0..2;
  - timm ≥ 0.9 (`swin_base_patch4_window12_384.ms_in22k`, model.safetensors): patch merging at the start of the
    next stage, `layers.{i+1}.downsample.*`.
Both: `patch_embed.{proj,norm}`, `layers.{i}.blocks.{j}.{norm1, attn.qkv, attn.proj, attn.relative_position_bias_table,
norm2, mlp.fc1, mlp.fc2}`. Layouts (PyTorch → Flax): conv OIHW → HWIO, Linear (out, in) → (in, out), the fused qkv
kept fused (rows q, k, v, each head-major, as `WindowAttention` splits it). Buffers (`relative_position_index`,
`attn_mask`) are rebuilt by the model; the classifier (`head.*`) and the final `norm.*` are not used (LAVT neither:
its stage LayerNorms `norm1`–`norm3` start fresh). The text tower uses `openai_layout`'s table of CLIP names.
"""

import dataclasses
import re
from typing import Any, Dict, List, Mapping, Tuple

import flax
import numpy as np

from fcnet_jax.weights import formats
from fcnet_jax.weights import loading
from fcnet_jax.weights import openai_layout
from fcnet_jax.weights import reports

VariablePath = loading.VariablePath
LAYOUTS = ("microsoft", "timm")
BUFFER_SUFFIXES = ("relative_position_index", "attn_mask", "num_batches_tracked")
NOT_USED_PREFIXES = ("head.", "norm.")  # Classifier and the classification model's final LayerNorm.
# Parts of the image encoder no Swin release has: the LayerNorms on F_v2..F_v4 (LAVT's norm1..norm3).
NOT_IN_SWIN = tuple(("image_encoder", f"norm{i}") for i in (1, 2, 3))
# Keys of a CLIP file that the text tower does not use (the image tower, the logit scale, ...).
CLIP_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


@dataclasses.dataclass(frozen=True)
class SwinArchitecture:
  """What a Swin state dict says about its model."""

  layout: str
  embed_dim: int
  depths: Tuple[int, ...]
  heads: Tuple[int, ...]
  window: int

  def __str__(self) -> str:
    known = {(128, (2, 2, 18, 2)): "Swin-B", (96, (2, 2, 6, 2)): "Swin-T", (96, (2, 2, 18, 2)): "Swin-S"}
    known[(192, (2, 2, 18, 2))] = "Swin-L"
    name = known.get((self.embed_dim, self.depths), "Swin")
    return (
      f"{name} ({self.layout} names; embed_dim {self.embed_dim}, depths {self.depths}, heads {self.heads}, "
      f"window {self.window})"
    )


def unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  """The tensors of Microsoft's `{"model": state_dict}` checkpoints (other mappings are returned as they are)."""
  if "model" in state_dict and isinstance(state_dict["model"], Mapping):
    return state_dict["model"]
  return state_dict


def read_swin_state_dict(path: str) -> Tuple[Mapping[str, Any], str]:
  """A Swin checkpoint (Microsoft .pth, timm safetensors/.bin) → (name → tensor, format description)."""
  state_dict, source_format = formats.read_state_dict(path)
  return unwrap(state_dict), source_format


def infer_swin_architecture(state_dict: Mapping[str, Any]) -> SwinArchitecture:
  """Layout, widths, depths, heads and window from the key names and shapes (fails clearly on other files)."""
  keys = list(state_dict)
  if "patch_embed.proj.weight" not in state_dict:
    hint = ""
    if any(k.startswith("embeddings.patch_embeddings.") for k in keys):
      hint = " (this is a Hugging Face transformers SwinModel; convert timm's or Microsoft's release instead)"
    elif any(k.startswith(("visual.", "transformer.")) for k in keys):
      hint = " (this is a CLIP checkpoint: pass it as --clip)"
    raise ValueError(
      f"not a Swin state dict: no key 'patch_embed.proj.weight'{hint}; first keys: {reports.abbreviate(keys, 5)}"
    )
  depths, heads = [], []
  for i in range(4):
    pattern = re.compile(rf"layers\.{i}\.blocks\.(\d+)\.")
    blocks = {int(m.group(1)) for m in map(pattern.match, keys) if m}
    if not blocks or blocks != set(range(len(blocks))):
      raise ValueError(f"Swin state dict: layers.{i}.blocks are missing or not numbered 0..n-1 ({sorted(blocks)})")
    depths.append(len(blocks))
    heads.append(_shape(state_dict, f"layers.{i}.blocks.0.attn.relative_position_bias_table")[1])
  table = _shape(state_dict, "layers.0.blocks.0.attn.relative_position_bias_table")[0]
  side = int(round(np.sqrt(table)))
  if side * side != table or side % 2 == 0:
    raise ValueError(f"layers.0.blocks.0.attn.relative_position_bias_table has {table} rows, not (2·window − 1)²")
  if any(k.startswith("layers.0.downsample.") for k in keys):
    layout = "microsoft"
  elif any(k.startswith("layers.1.downsample.") for k in keys):
    layout = "timm"
  else:
    raise ValueError("Swin state dict has no patch-merging keys (layers.N.downsample.*)")
  return SwinArchitecture(
    layout, _shape(state_dict, "patch_embed.proj.weight")[0], tuple(depths), tuple(heads), (side + 1) // 2
  )


def _shape(state_dict: Mapping[str, Any], key: str) -> Tuple[int, ...]:
  if key not in state_dict:
    raise KeyError(f"state dict has no key {key!r}")
  return tuple(int(d) for d in state_dict[key].shape)


def check_swin_architecture(arch: SwinArchitecture, cfg: Mapping[str, Any]) -> None:
  """Fails naming the config.model field that cannot hold these weights (the window may differ: it is resized)."""
  if cfg["backbone"] != "swin":
    raise ValueError(
      f"config.model.backbone={cfg['backbone']!r}: Swin weights need backbone='swin' (configs/refcoco_swinb.py)"
    )
  for field, ours, theirs in (
    ("swin_embed_dim", cfg["swin_embed_dim"], arch.embed_dim),
    ("swin_depths", tuple(cfg["swin_depths"]), arch.depths),
    ("swin_heads", tuple(cfg["swin_heads"]), arch.heads),
  ):
    if ours != theirs:
      raise ValueError(f"the checkpoint is {arch}, but config.model.{field}={ours} (checkpoint: {theirs})")


def _swin_entries(arch: SwinArchitecture) -> List[Tuple[VariablePath, str, Any, int]]:
  """(our path, their key, transform, the key's number of dimensions) for every Swin variable of the model."""
  conv, dense, same = openai_layout.conv_kernel, openai_layout.dense_kernel, openai_layout.identity
  ours = ("params", "image_encoder")
  entries = [
    (ours + ("patch_embed_proj", "kernel"), "patch_embed.proj.weight", conv, 4),
    (ours + ("patch_embed_proj", "bias"), "patch_embed.proj.bias", same, 1),
    (ours + ("patch_embed_norm", "scale"), "patch_embed.norm.weight", same, 1),
    (ours + ("patch_embed_norm", "bias"), "patch_embed.norm.bias", same, 1),
  ]

  def norm(path, key):
    return [(path + ("scale",), f"{key}.weight", same, 1), (path + ("bias",), f"{key}.bias", same, 1)]

  def linear(path, key):
    return [(path + ("kernel",), f"{key}.weight", dense, 2), (path + ("bias",), f"{key}.bias", same, 1)]

  for i, depth in enumerate(arch.depths):
    for j in range(depth):
      path, key = ours + (f"layers_{i}", f"blocks_{j}"), f"layers.{i}.blocks.{j}"
      entries += norm(path + ("norm1",), f"{key}.norm1") + norm(path + ("norm2",), f"{key}.norm2")
      entries += linear(path + ("attn", "qkv"), f"{key}.attn.qkv") + linear(path + ("attn", "proj"), f"{key}.attn.proj")
      entries += linear(path + ("fc1",), f"{key}.mlp.fc1") + linear(path + ("fc2",), f"{key}.mlp.fc2")
      table = f"{key}.attn.{loading.RELATIVE_POSITION_TABLE}"
      entries.append((path + ("attn", loading.RELATIVE_POSITION_TABLE), table, same, 2))
    if i < len(arch.depths) - 1:
      path = ours + (f"layers_{i}", "downsample")
      key = f"layers.{i if arch.layout == 'microsoft' else i + 1}.downsample"
      entries += norm(path + ("norm",), f"{key}.norm") + [
        (path + ("reduction", "kernel"), f"{key}.reduction.weight", dense, 2)
      ]
  return entries


def _text_entries(state_dict: Mapping[str, Any], cfg: Mapping[str, Any]):
  """`openai_layout`'s table for the CLIP text tower, after checking the file's text tower against config.model."""
  if "ln_final.weight" not in state_dict or "text_projection" not in state_dict:
    raise ValueError(
      f"not a CLIP state dict (no ln_final.weight / text_projection); first keys: "
      f"{reports.abbreviate(list(state_dict), 5)}"
    )
  pattern = re.compile(r"transformer\.resblocks\.(\d+)\.")
  layers = len({m.group(1) for m in map(pattern.match, state_dict) if m})
  width, positions = _shape(state_dict, "ln_final.weight")[0], _shape(state_dict, "positional_embedding")[0]
  for field, ours, theirs in (("text_layers", cfg["text_layers"], layers), ("text_width", cfg["text_width"], width)):
    if ours != theirs:
      raise ValueError(f"config.model.{field}={ours}, but the CLIP text tower has {theirs}")
  if cfg["text_heads"] * openai_layout.CLIP_HEAD_DIM != width:
    raise ValueError(
      f"config.model.text_heads={cfg['text_heads']}: CLIP's text transformer has "
      f"{width // openai_layout.CLIP_HEAD_DIM} heads of {openai_layout.CLIP_HEAD_DIM}"
    )
  if cfg["context_length"] > positions:
    raise ValueError(f"config.model.context_length={cfg['context_length']} exceeds the CLIP text tower's {positions}")
  description = (
    f"CLIP text transformer ({layers} layers × {width}, {positions} positions, projection to "
    f"{_shape(state_dict, 'text_projection')[1]})"
  )
  return openai_layout.text_entries(layers, cfg["text_heads"]), description


def _convert(state_dict, entries, expected, what: str) -> Tuple[Dict[VariablePath, np.ndarray], list, set]:
  """Applies a table of entries; errors name the key, its shape and the model's shape."""
  missing = sorted({key for _, key, _, _ in entries if key not in state_dict})
  if missing:
    raise KeyError(f"{what} state dict lacks {len(missing)} keys the model needs: {reports.abbreviate(missing)}")
  flat, converted, used = {}, [], set()
  for path, key, transform, ndim in entries:
    source = formats.to_numpy(state_dict[key])
    array = openai_layout.convert_entry(
      source, transform, ndim, expected[path].shape, positional=loading.is_fitted(path)
    )
    if array is None:
      raise ValueError(
        f"{what} key {key!r} has shape {source.shape}, which does not fit {reports.path_str(path)} "
        f"of shape {tuple(expected[path].shape)} in the model of config.model"
      )
    flat[path] = array
    converted.append((reports.path_str(path), tuple(array.shape), key))
    used.add(key)
  return flat, converted, used


def convert_swin_state_dicts(
  swin_state_dict: Mapping[str, Any],
  clip_state_dict: Mapping[str, Any],
  config: Any,
  *,
  sources: Tuple[str, str] = ("<swin state dict>", "<clip state dict>"),
  source_formats: Tuple[str, str] = ("mapping", "mapping"),
) -> Tuple[Dict[str, Any], reports.ConversionReport, reports.ConversionReport]:
  """Swin (timm or Microsoft names) + CLIP text tower → FCNet encoder variables {"params": {...}}.

  Relative-position tables are kept at the released window (resized to the model's when loaded) and the text
  positional embedding at CLIP's 77 positions (the model takes the first L).

  Returns:
    (variables, report of the image encoder's conversion, report of the text encoder's).

  Raises:
    ValueError naming the key and both shapes for a tensor that does not fit, or the config field for a structure
    that does not; KeyError naming missing keys.
  """
  cfg = loading.model_config(config)
  swin_state_dict = unwrap(swin_state_dict)
  arch = infer_swin_architecture(swin_state_dict)
  check_swin_architecture(arch, cfg)
  text_entries, text_description = _text_entries(clip_state_dict, cfg)
  expected = flax.traverse_util.flatten_dict(loading.abstract_variables(cfg, encoders_only=True))
  image_flat, image_converted, image_used = _convert(swin_state_dict, _swin_entries(arch), expected, "Swin")
  text_flat, text_converted, text_used = _convert(clip_state_dict, text_entries, expected, "CLIP")
  flat = {**image_flat, **text_flat}
  wanted = {p for p in expected if not any(p[1 : 1 + len(n)] == n for n in NOT_IN_SWIN)}
  if set(flat) != wanted:  # The tables must cover the encoders exactly.
    raise AssertionError(
      f"Swin conversion table out of sync with the model: {sorted(map(reports.path_str, wanted ^ set(flat)))[:5]}"
    )
  swin_ignored = sorted(k for k in swin_state_dict if k.endswith(BUFFER_SUFFIXES) or k.startswith(NOT_USED_PREFIXES))
  image_report = reports.ConversionReport(
    source=sources[0],
    source_format=source_formats[0],
    architecture=str(arch),
    converted=image_converted,
    positions=[
      f"relative-position tables: window {arch.window} kept (resized bicubically to config.model.swin_window="
      f"{cfg['swin_window']} when loaded)",
      "stage LayerNorms norm1-norm3 (on F_v2..F_v4) are not in the release: fresh, as in LAVT",
    ],
    ignored_keys=swin_ignored,
    unused_keys=sorted(k for k in swin_state_dict if k not in image_used and k not in swin_ignored),
  )
  clip_other = sorted(k for k in clip_state_dict if not k.startswith(CLIP_TEXT_PREFIXES))
  text_report = reports.ConversionReport(
    source=sources[1],
    source_format=source_formats[1],
    architecture=text_description,
    converted=text_converted,
    positions=["text positional embedding: all CLIP positions kept (the model uses the first L)"],
    ignored_keys=clip_other,  # The image tower and logit scale: only the text tower is taken.
    unused_keys=sorted(k for k in clip_state_dict if k not in text_used and k not in clip_other),
  )
  return flax.traverse_util.unflatten_dict(flat), image_report, text_report
