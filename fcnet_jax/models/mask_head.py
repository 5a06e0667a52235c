"""Mask head and loss (sec. 3.4; docs/model.md): H/16 → H/4 and the final 3×3 conv to one logit; sigmoid BCE."""

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


def mask_loss(
  logits: jax.Array, target: jax.Array, weights: jax.Array | None = None, dice_weight: float = 0.0
) -> jax.Array:
  """Mean sigmoid binary cross-entropy between B×h×w logits and a {0,1} target at the same size (the paper).

  `weights` (B,) excludes examples (e.g. padding) from the mean; the mean is over the remaining pixels.
  `dice_weight` > 0 adds that multiple of the soft Dice loss (`dice_loss`), an option beyond the paper
  (config `dice_weight`, 0 by default).
  """
  per_pixel = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), target.astype(jnp.float32))
  per_example = per_pixel.mean(axis=(1, 2))
  if dice_weight:
    per_example = per_example + dice_weight * dice_loss(logits, target)
  if weights is None:
    return per_example.mean()
  weights = weights.astype(jnp.float32)
  return (per_example * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def dice_loss(logits: jax.Array, target: jax.Array, smooth: float = 1.0) -> jax.Array:
  """Per-example soft Dice loss 1 − (2·Σpt + s) / (Σp + Σt + s) on sigmoid probabilities p, shape (B,).

  It weighs a small object as much as a large one, where the pixel-mean BCE barely notices a few-pixel object;
  `smooth` keeps an empty target with an empty prediction at 0 loss.
  """
  prob = jax.nn.sigmoid(logits.astype(jnp.float32))
  target = target.astype(jnp.float32)
  intersection = (prob * target).sum(axis=(1, 2))
  return 1.0 - (2.0 * intersection + smooth) / (prob.sum(axis=(1, 2)) + target.sum(axis=(1, 2)) + smooth)
