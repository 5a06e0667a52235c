"""Loading converted encoder weights into FCNet: the model's variable shapes, positional-embedding fitting, merging.

A converted checkpoint stores the positional embeddings as CLIP has them (77 text positions; the attention
pool's g×g grid without its class position), so one conversion serves every image size and context length.
`load_pretrained` fits them to the model: the text embedding keeps its first L positions, the grid is resized
bicubically to (S/32)² with `image_encoder.resize_pos_embed` (PyTorch's bicubic, as CRIS resizes it on the fly).
Swin's relative-position bias tables ((2w−1)²×heads, `fcnet_jax/tools/convert_swin`) are stored as released and
resized the same way to the model's window (as Swin's own loader does), so one conversion serves every window size.
"""

import functools
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fcnet_jax.models import fcnet
from fcnet_jax.models import image_encoder
from fcnet_jax.weights import formats
from fcnet_jax.weights import reports

# (collection, module, ..., leaf), e.g. ("params", "image_encoder", "stem1", "conv", "kernel").
VariablePath = Tuple[str, ...]

TEXT_POSITIONS = ("params", "text_encoder", "positional_embedding")
GRID_POSITIONS = ("params", "image_encoder", "attnpool", "positional_embedding")
RELATIVE_POSITION_TABLE = "relative_position_bias_table"  # The leaf name of Swin's tables (`models/swin.py`).


def is_fitted(path: VariablePath) -> bool:
  """True for the variables `fit_positional_embedding` fits to the model (positional embeddings, Swin's tables)."""
  return path in (TEXT_POSITIONS, GRID_POSITIONS) or path[-1] == RELATIVE_POSITION_TABLE


def model_config(config: Any) -> Dict[str, Any]:
  """config.model as a checked plain dict (accepts the full config, config.model or a dict)."""
  section = config.model if hasattr(config, "model") else config
  cfg = dict(section.to_dict() if hasattr(section, "to_dict") else section)
  fcnet.build_model(cfg)  # Names the missing, unknown or impossible field.
  return cfg


def _encode_both(module: fcnet.FCNet, images: jax.Array, tokens: jax.Array):
  return module.encode_image(images), module.encode_text(tokens)


def abstract_variables(config: Any, encoders_only: bool = False) -> Dict[str, Any]:
  """Shapes/dtypes (jax.ShapeDtypeStruct) of the variables FCNet(config.model) initialises, without computing.

  With `encoders_only`, only the image- and text-encoder subtrees (what CLIP provides). Tracing an RN101 takes
  seconds, so results are cached per model config (a fresh copy of the nested dicts is returned each time).
  """
  cfg = model_config(config)
  key = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.items()))
  return flax.core.unfreeze(_abstract_variables(key, encoders_only))


@functools.lru_cache(maxsize=8)
def _abstract_variables(cfg: Tuple[Tuple[str, Any], ...], encoders_only: bool) -> flax.core.FrozenDict:
  model = fcnet.build_model(dict(cfg))
  images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, model.context_length), jnp.int32)
  init = (
    functools.partial(model.init, method=_encode_both) if encoders_only else functools.partial(model.init, train=False)
  )
  return flax.core.freeze(jax.eval_shape(init, jax.random.key(0), images, tokens))


def fit_positional_embedding(
  path: VariablePath, pretrained: np.ndarray, target_shape: Sequence[int]
) -> Tuple[np.ndarray, Optional[str]]:
  """Fits a positional embedding to the model's shape. Returns (array, how) with how=None when unchanged.

  Text (L×W): CLIP's first L positions (CLIP's causal transformer never saw later positions before earlier
  ones, so the prefix is exactly what a length-L CLIP computes). Attention pool (h·w×C): PyTorch-bicubic
  resize of the square grid (`image_encoder.resize_pos_embed`), as CRIS does at run time. Swin relative-position
  table ((2w−1)²×heads): the same resize of its (2w−1)×(2w−1) grid of offsets to the model's window.
  """
  target_shape = tuple(target_shape)
  if pretrained.shape == target_shape:
    return pretrained, None
  mismatch = f"pretrained {reports.path_str(path)} has shape {pretrained.shape} but the model has {target_shape}"
  if pretrained.ndim != 2 or pretrained.shape[1:] != target_shape[1:]:
    raise ValueError(mismatch)
  if path == TEXT_POSITIONS:
    if pretrained.shape[0] < target_shape[0]:
      raise ValueError(
        f"pretrained {reports.path_str(path)} has {pretrained.shape[0]} positions but the model "
        f"needs {target_shape[0]} (config.model.context_length)"
      )
    return pretrained[: target_shape[0]], f"first {target_shape[0]} of {pretrained.shape[0]} positions"
  if path == GRID_POSITIONS or path[-1] == RELATIVE_POSITION_TABLE:
    side = int(round(np.sqrt(target_shape[0])))
    if side * side != target_shape[0]:
      raise ValueError(f"{reports.path_str(path)}: the model's {target_shape[0]} positions are not a square grid")
    g = int(round(np.sqrt(pretrained.shape[0])))
    what = "grid" if path == GRID_POSITIONS else f"relative-position table (window {(g + 1) // 2} → {(side + 1) // 2})"
    return (
      image_encoder.resize_pos_embed(pretrained, (side, side)),
      f"{g}×{g} {what} resized to {side}×{side}, PyTorch bicubic",
    )
  raise ValueError(mismatch)


def load_pretrained(
  variables: Mapping[str, Any], pretrained: Mapping[str, Any]
) -> Tuple[Dict[str, Any], reports.LoadReport]:
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
  unknown = sorted(reports.path_str(p) for p in incoming if p not in fresh)
  if unknown:
    raise ValueError(f"pretrained variables the model does not have: {reports.abbreviate(unknown)}")
  merged, loaded, resized = dict(fresh), [], []
  for path, array in incoming.items():
    array = formats.to_numpy(array)
    target = fresh[path]
    if is_fitted(path):
      array, how = fit_positional_embedding(path, array, target.shape)
      if how:
        resized.append((reports.path_str(path), tuple(incoming[path].shape), tuple(target.shape), how))
    if array.shape != tuple(target.shape):
      raise ValueError(
        f"pretrained {reports.path_str(path)} has shape {array.shape} but the model has {tuple(target.shape)}"
      )
    merged[path] = np.asarray(array, dtype=target.dtype)
    loaded.append((reports.path_str(path), reports.count(array.shape)))
  new = [(reports.path_str(p), reports.count(x.shape)) for p, x in fresh.items() if p not in incoming]
  result = flax.traverse_util.unflatten_dict(merged)
  for collection in variables:  # Keep empty collections (flattening drops them).
    result.setdefault(collection, {})
  return result, reports.LoadReport(loaded=loaded, resized=resized, new=new)
