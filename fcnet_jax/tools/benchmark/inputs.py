"""What the benchmark feeds the model: synthetic batches, random weights, a train state with the real optimiser."""

from typing import Any, Dict

import jax
import ml_collections
import numpy as np

from fcnet_jax import sharding
from fcnet_jax import tokenizer
from fcnet_jax import train
from fcnet_jax.models import fcnet
from fcnet_jax.tools import summary


def synthetic_batch(
  rng: np.random.Generator, batch_size: int, image_size: int, context_length: int
) -> Dict[str, np.ndarray]:
  """A host batch shaped like `input_pipeline`'s training batches (never all zeros: zeros can time faster).

  image B×S×S×3 uint8 noise; mask B×S×S uint8 0/1 with a random rectangle per example; tokens B×L int32
  [SOS] words [EOS] 0…; valid B bool (all True).
  """
  images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
  masks = np.zeros((batch_size, image_size, image_size), np.uint8)
  tokens = np.full((batch_size, context_length), tokenizer.PAD_TOKEN, np.int32)
  for b in range(batch_size):
    top, left = rng.integers(0, image_size // 2, 2)
    height, width = rng.integers(image_size // 8, image_size // 2, 2)
    masks[b, top : top + height, left : left + width] = 1
    words = int(rng.integers(1, context_length - 1))
    tokens[b, 0] = tokenizer.SOT_TOKEN
    tokens[b, 1 : words + 1] = rng.integers(1, 49000, words)
    tokens[b, words + 1] = tokenizer.EOT_TOKEN
  return {"image": images, "mask": masks, "tokens": tokens, "valid": np.ones((batch_size,), bool)}


def random_variables(abstract: Any, seed: int) -> Any:
  """NumPy variables for the shapes in `abstract` (from `summary.abstract_variables`), drawn on the host.

  The model's own initialisers are skipped on purpose: jitting `model.init` compiles one threefry expansion per
  parameter (79 s for the tiny config on 2 CPU cores). Scales keep activations finite through the deep trunk:
  normals with std 1/√fan_in for kernels, 0.02 for embeddings, ones for norm scales and variances, zeros for
  biases and means.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    shape = tuple(leaf.shape)
    if name in ("scale", "var"):
      return np.ones(shape, np.float32)
    if name in ("bias", "mean"):
      return np.zeros(shape, np.float32)
    if name in ("embedding", "positional_embedding"):
      std = 0.02
    elif len(shape) == 3 and name == "kernel":  # DenseGeneral: (in, heads, head_dim) or (heads, head_dim, out).
      parent = str(getattr(path[-2], "key", path[-2])) if len(path) > 1 else ""
      std = 1.0 / np.sqrt(shape[0] * shape[1] if parent in ("out", "c_proj") else shape[0])
    else:
      std = 1.0 / np.sqrt(max(int(np.prod(shape[:-1])), 1))
    return (rng.standard_normal(shape) * std).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def create_benchmark_state(
  config: ml_collections.ConfigDict, model: fcnet.FCNet, mesh: jax.sharding.Mesh, seed: int
) -> train.TrainState:
  """A replicated `train.TrainState` with random weights and the real optimiser (`train.create_optimizer`)."""
  variables = random_variables(summary.abstract_variables(model), seed)
  learning_rate_fn = train.create_learning_rate_fn(config, steps_per_epoch=1000, total_steps=50_000)
  tx = train.create_optimizer(config, learning_rate_fn)

  def create(params, batch_stats, rng):
    return train.TrainState.create(apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats, dropout_rng=rng)

  return jax.jit(create, out_shardings=sharding.replicated_sharding(mesh))(
    variables["params"], variables.get("batch_stats", {}), jax.random.key(seed)
  )


def model_with_dtype(config: ml_collections.ConfigDict, dtype: str) -> fcnet.FCNet:
  """The configured model computing in `dtype` (the variables stay float32)."""
  model_config = config.model.to_dict()
  model_config["dtype"] = dtype
  return fcnet.build_model(model_config)
