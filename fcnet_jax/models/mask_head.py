"""Mask head and loss (sec. 3.4, model.md §7): H/16 → H/4 and the final 3×3 conv to one logit; sigmoid BCE."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fcnet_jax.models import layers

Dtype = Any


class MaskHead(nn.Module):
  """×2 up → 3×3 conv C→C, ×2 up → 3×3 conv C→C/2 (conv + BN + ReLU, as CRIS), final 3×3 conv → 1 logit."""
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """B×H/16×W/16×C → B×H/4×W/4 float32 logits."""
    x = layers.ConvBN(self.hidden_dim, 3, dtype=self.dtype, name="up1")(layers.upsample2x(x), train)
    x = layers.ConvBN(self.hidden_dim // 2, 3, dtype=self.dtype, name="up2")(layers.upsample2x(x), train)
    x = nn.Conv(1, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="logit")(x)
    return x[..., 0].astype(jnp.float32)


def mask_loss(logits: jax.Array, target: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Mean sigmoid binary cross-entropy between B×h×w logits and a {0,1} target at the same size.

  `weights` (B,) excludes examples (e.g. padding) from the mean; the mean is over the remaining pixels.
  """
  per_pixel = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), target.astype(jnp.float32))
  per_example = per_pixel.mean(axis=(1, 2))
  if weights is None:
    return per_example.mean()
  weights = weights.astype(jnp.float32)
  return (per_example * weights).sum() / jnp.maximum(weights.sum(), 1.0)
