"""CLIP RN50 / RN101 weights → FCNet's image and text encoders (paper sec. 4.1: encoders initialised from CLIP).

The public entry points of `fcnet_jax.weights`, in the order they are used:

    state_dict, fmt = clip.read_state_dict("RN101.pt")        # OpenAI TorchScript, torch.save or safetensors
    pretrained, conversion = clip.convert_openai_state_dict(state_dict, config)
    clip.save_converted(out_dir, pretrained, str(conversion), conversion.to_dict())   # what convert_clip does
    variables, report = clip.load_pretrained(fresh_variables, clip.restore_converted(out_dir))  # config.init_from

Each step lives in its own module: `formats` (reading checkpoint files), `openai_layout` (OpenAI names and
layouts → ours), `loading` (the model's variable shapes, fitting the positional embeddings, merging into fresh
variables), `store` (converted checkpoints on disk), `reports` (what each step did). `from_openai_state_dict`
composes conversion and fitting for code that applies the encoders directly (the parity tests). See
docs/model.md for how the encoders map to the paper.
"""

from typing import Any, Dict, Mapping

import flax

from fcnet_jax.weights import formats
from fcnet_jax.weights import loading
from fcnet_jax.weights import openai_layout
from fcnet_jax.weights import reports
from fcnet_jax.weights import store

ConversionReport = reports.ConversionReport
LoadReport = reports.LoadReport
TEXT_POSITIONS = loading.TEXT_POSITIONS
GRID_POSITIONS = loading.GRID_POSITIONS
CHECKPOINT_SUBDIR = store.CHECKPOINT_SUBDIR

read_state_dict = formats.read_state_dict
infer_architecture = openai_layout.infer_architecture
convert_openai_state_dict = openai_layout.convert_openai_state_dict
abstract_variables = loading.abstract_variables
fit_positional_embedding = loading.fit_positional_embedding
load_pretrained = loading.load_pretrained
restore_converted = store.restore_converted
save_converted = store.save_converted


def from_openai_state_dict(state_dict: Mapping[str, Any], config: Any) -> Dict[str, Any]:
  """OpenAI-named CLIP state dict → {"params": {...}, "batch_stats": {...}} of FCNet's two encoders.

  Unlike `convert_openai_state_dict`, the positional embeddings are fitted to `config` (first L text
  positions; attention-pool grid resized to (S/32)²), so the result can be applied directly, e.g.
  `model.apply(variables, images, method=FCNet.encode_image)` (after adding the attention pool's residual
  branch, which CLIP does not have). Unused keys are logged.
  """
  pretrained, report = convert_openai_state_dict(state_dict, config)
  if report.unused_keys:
    from absl import logging  # pylint: disable=g-import-not-at-top

    logging.warning(
      "CLIP state dict: %d unused keys: %s", len(report.unused_keys), reports.abbreviate(report.unused_keys)
    )
  target = flax.traverse_util.flatten_dict(abstract_variables(config, encoders_only=True))
  flat = flax.traverse_util.flatten_dict(pretrained)
  for path in (TEXT_POSITIONS, GRID_POSITIONS):
    flat[path] = fit_positional_embedding(path, flat[path], target[path].shape)[0]
  return flax.traverse_util.unflatten_dict(flat)
