"""Transformer decoder (sec. 3.4, eq. 5): pixel tokens self-attend, then cross-attend to the calibrated features."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcnet_jax.models import layers

Dtype = Any


class DecoderLayer(nn.Module):
  """One layer of eq. 5 (pre-LN):
    F'_v = MHSA(LN(F_v)) + F_v;  F'_q = MHCA(LN(F'_v), F_c) + F'_v;  F_q = MLP(LN(F'_q)) + F'_q.

  The 2-D sine encoding is added to the pixel queries and keys (CRIS), none to F_c. Dropout acts on each
  residual branch and inside the MLP.
  """

  dim: int
  num_heads: int
  ffn_dim: int
  dropout: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, f_v: jax.Array, memory: jax.Array, memory_mask: Optional[jax.Array], pos: jax.Array, train: bool
  ) -> jax.Array:
    drop = lambda x: nn.Dropout(self.dropout, deterministic=not train)(x)
    y = layers.LayerNorm(dtype=self.dtype, name="norm1")(f_v)
    y = layers.MultiHeadAttention(self.num_heads, self.dim, dtype=self.dtype, name="self_attn")(
      y, y, y, query_pos=pos, key_pos=pos
    )
    f_v = f_v + drop(y)
    y = layers.LayerNorm(dtype=self.dtype, name="norm2")(f_v)
    y = layers.MultiHeadAttention(self.num_heads, self.dim, dtype=self.dtype, name="cross_attn")(
      y, memory, memory, key_mask=memory_mask, query_pos=pos
    )
    f_q = f_v + drop(y)
    y = layers.LayerNorm(dtype=self.dtype, name="norm3")(f_q)
    y = drop(nn.relu(nn.Dense(self.ffn_dim, dtype=self.dtype, name="ffn_in")(y)))
    y = nn.Dense(self.dim, dtype=self.dtype, name="ffn_out")(y)
    return f_q + drop(y)


class Decoder(nn.Module):
  """`num_layers` decoder layers over the H_v·W_v pixel tokens, then a final LayerNorm."""

  num_layers: int
  dim: int
  num_heads: int
  ffn_dim: int
  dropout: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, f_v: jax.Array, memory: jax.Array, memory_mask: Optional[jax.Array], train: bool) -> jax.Array:
    """F_v B×H_v×W_v×C, memory B×M×C (F_c, or the words when EGM is off), memory_mask B×M → B×H_v×W_v×C."""
    b, h, w, c = f_v.shape
    pos = jnp.asarray(layers.sine_position_encoding_2d(h, w, c), self.dtype)[None]
    x = f_v.reshape(b, h * w, c)
    for i in range(self.num_layers):
      x = DecoderLayer(self.dim, self.num_heads, self.ffn_dim, self.dropout, dtype=self.dtype, name=f"layer{i}")(
        x, memory, memory_mask, pos, train
      )
    x = layers.LayerNorm(dtype=self.dtype, name="norm")(x)
    return x.reshape(b, h, w, c)
