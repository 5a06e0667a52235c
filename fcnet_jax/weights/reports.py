"""What converting a CLIP state dict and loading it into FCNet did, for people to read (and as JSON).

`ConversionReport` comes from `openai_layout.convert_openai_state_dict`, `LoadReport` from
`loading.load_pretrained`; `fcnet_jax.tools.convert_clip` writes both next to the converted checkpoint, and
training logs the `LoadReport` when `config.init_from` is set.
"""

import dataclasses
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np


def path_str(path: Sequence[str]) -> str:
  """("params", "text_encoder", "ln_final", "scale") → "params/text_encoder/ln_final/scale"."""
  return "/".join(path)


def count(shape: Sequence[int]) -> int:
  """Number of values of an array of this shape."""
  return int(np.prod(shape, dtype=np.int64))


def _millions(n: int) -> str:
  return f"{n / 1e6:.3f} M"


def abbreviate(keys: Sequence[str], limit: int = 8) -> str:
  """The first `limit` keys, comma-separated, and how many more there are."""
  if not keys:
    return "none"
  shown = ", ".join(keys[:limit])
  return shown + (f", … (+{len(keys) - limit} more)" if len(keys) > limit else "")


@dataclasses.dataclass
class ConversionReport:
  """What `convert_openai_state_dict` made of a state dict.

  Attributes:
    source: file name (or "<state dict>").
    source_format: how it was read (TorchScript archive, torch.save pickle, safetensors, in-memory mapping).
    architecture: e.g. "CLIP RN101 (vision_layers (3, 4, 23, 3), width 64, embed_dim 512; text 12×512)".
    converted: (our variable path, shape, source key) for every array produced.
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
      counts[collection == "batch_stats"] += count(shape)
    lines = [
      f"Converted {self.source} ({self.source_format})",
      f"  architecture: {self.architecture}",
      f"  {len(self.converted)} arrays:",
    ]
    for module, (params, stats) in per_module.items():
      lines.append(
        f"    {module:<16} {_millions(params)} parameters" + (f" + {stats:,} BatchNorm statistics" if stats else "")
      )
    lines += [f"  {note}" for note in self.positions]
    lines.append(f"  ignored keys ({len(self.ignored_keys)}): {abbreviate(self.ignored_keys)}")
    lines.append(
      f"  UNUSED keys ({len(self.unused_keys)}): {abbreviate(self.unused_keys)}"
      if self.unused_keys
      else "  unused keys: none"
    )
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
    lines = [
      f"Loaded {len(self.loaded)} arrays: {_millions(self.loaded_parameters)} parameters"
      f" + {sum(n for p, n in self.loaded if p.startswith('batch_stats/')):,} BatchNorm statistics"
    ]
    for group, n in _group_counts(self.loaded, []).items():
      lines.append(f"    {group:<40} {_millions(n)}")
    lines.append(
      f"Resized {len(self.resized)} positional embeddings:"
      if self.resized
      else "Resized: nothing (positional embeddings already fit the model)"
    )
    for path, source, target, how in self.resized:
      lines.append(f"    {path}: {source} → {target} ({how})")
    lines.append(
      f"Left at fresh initialisation: {len(self.new)} arrays, {_millions(self.new_parameters)} "
      f"parameters (+ their BatchNorm statistics):"
    )
    for group, n in _group_counts(self.new, loaded_paths).items():
      lines.append(f"    {group:<40} {_millions(n)}")
    return "\n".join(lines)


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
