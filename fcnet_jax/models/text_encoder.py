"""CLIP text transformer (paper sec. 3.1; docs/model.md): causal, pre-LN, QuickGELU, final LN, EOS global feature."""

from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcnet_jax.models import layers

Dtype = Any


class ResidualAttentionBlock(nn.Module):
  """x + Attn(LN(x)), then x + MLP(LN(x)) with a ×4 QuickGELU MLP (CLIP)."""

  width: int
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = layers.LayerNorm(dtype=self.dtype, name="ln_1")(x)
    x = x + layers.MultiHeadAttention(self.num_heads, self.width, dtype=self.dtype, name="attn")(
      y, y, y, is_causal=True
    )
    y = layers.LayerNorm(dtype=self.dtype, name="ln_2")(x)
    y = nn.Dense(self.width * 4, dtype=self.dtype, name="c_fc")(y)
    y = y * jax.nn.sigmoid(1.702 * y)  # QuickGELU, as CLIP was trained with.
    return x + nn.Dense(self.width, dtype=self.dtype, name="c_proj")(y)


class TextTransformer(nn.Module):
  """CLIP's text encoder over L tokens.

  Attributes:
    context_length: L; the positional embedding holds the first L of CLIP's 77 positions.
    vocab_size: 49408.
    width, num_layers, num_heads: 512, 12, 8 in CLIP.
    embed_dim: width of `text_projection`'s output (512 RN101, 1024 RN50).
    embed_init_std: std of the token-embedding init (CLIP: 0.02).
  """

  context_length: int
  vocab_size: int
  width: int
  num_layers: int
  num_heads: int
  embed_dim: int
  embed_init_std: float = 0.02
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """tokens: B×L int ids ([SOS] … [EOS], zero padding).

    Returns:
      F_t: B×L×width per-token features after the final LayerNorm.
      eos: B×embed_dim, the [EOS] feature (position of the largest id, as CLIP) times `text_projection`.
      padding_mask: B×L bool, True at the padding after [EOS]. (CLIP pads with id 0, which is also the real
        token "!"; positions after the [EOS] position are padding whatever their id.)
    """
    b, length = tokens.shape
    if length != self.context_length:
      raise ValueError(
        f"tokens have length {length} but the text encoder is built for "
        f"context_length={self.context_length} (config.model.context_length)"
      )
    embed = nn.Embed(
      self.vocab_size, self.width, embedding_init=nn.initializers.normal(self.embed_init_std), name="token_embedding"
    )
    pos = self.param("positional_embedding", nn.initializers.normal(0.01), (self.context_length, self.width))
    x = (embed(tokens) + pos).astype(self.dtype)
    # CLIP attends causally only; padding after [EOS] cannot reach earlier positions, so no key mask is needed.
    for i in range(self.num_layers):
      x = ResidualAttentionBlock(self.width, self.num_heads, dtype=self.dtype, name=f"resblocks_{i}")(x)
    x = layers.LayerNorm(dtype=self.dtype, name="ln_final")(x)
    projection = self.param("text_projection", nn.initializers.normal(self.width**-0.5), (self.width, self.embed_dim))
    eos_position = jnp.argmax(tokens, axis=-1)
    eos = jnp.dot(x[jnp.arange(b), eos_position], projection.astype(self.dtype))
    return x, eos, jnp.arange(length)[None, :] > eos_position[:, None]
