"""Emphasis Generation (vision-guided fusion, sec. 3.2 eq. 4) and Emphasis Calibration (language-guided, sec. 3.3)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcnet_jax.models import layers

Dtype = Any
# How α gates the emphasis features: plain scalars (the paper), a sigmoid, or a softmax over the N_k tokens.
CALIBRATION_GATES = {
  "none": lambda alpha: alpha,
  "sigmoid": jax.nn.sigmoid,
  "softmax": lambda alpha: jax.nn.softmax(alpha.astype(jnp.float32), axis=-1).astype(alpha.dtype),
}


class EmphasisGeneration(nn.Module):
  """EGM (eq. 4): key vision features query the words, giving N_k emphasis features F_e.

  F_vk = Conv3×3(F_v) (C → N_k, + BN + ReLU); each of the N_k channels, flattened over H_v·W_v, is one query
  token, projected H_v·W_v → C — so the module is bound to its input resolution. The N_k×L attention map weighs
  each word for each key vision feature.

  Attributes:
    num_emphasis: N_k.
    hidden_dim: C.
    num_heads: cross-attention heads.
    layernorm: LayerNorm on F_e (config `egm_layernorm`).
    query_init_scale: init scale of the H_v·W_v → C query projection (config `egm_query_init_scale`).
  """

  num_emphasis: int
  hidden_dim: int
  num_heads: int
  layernorm: bool = True
  query_init_scale: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, f_v: jax.Array, f_t: jax.Array, text_mask: jax.Array, train: bool) -> jax.Array:
    """F_v B×H_v×W_v×C, F_t B×L×D_t, text_mask B×L (True = real token) → F_e B×N_k×C."""
    f_vk = layers.ConvBN(self.num_emphasis, 3, dtype=self.dtype, name="key_vision")(f_v, train)
    b, h, w, n_k = f_vk.shape
    key_vision = f_vk.reshape(b, h * w, n_k).transpose(0, 2, 1)  # F'_vk: B×N_k×(H_v·W_v)
    f_e = layers.MultiHeadAttention(
      self.num_heads, self.hidden_dim, query_init_scale=self.query_init_scale, dtype=self.dtype, name="cross_attn"
    )(key_vision, f_t, f_t, key_mask=text_mask)
    if self.layernorm:
      f_e = layers.LayerNorm(dtype=self.dtype, name="norm")(f_e)
    return f_e


class EmphasisCalibration(nn.Module):
  """ECM (sec. 3.3, Fig. 3): the global sentence feature scores each emphasis feature; F_c = F_e + α ⊙ F_e.

  [F_e, tile(F_tg)] (B×N_k×2C) → multi-head self-attention → Linear 2C → 1 gives α (B×N_k).

  Attributes:
    num_heads: self-attention heads over the N_k tokens (width 2C).
    gate: "none" (plain scalars, the paper), "sigmoid", or "softmax" over N_k (config `calibration_gate`).
  """

  num_heads: int
  gate: str = "none"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, f_e: jax.Array, f_tg: jax.Array) -> jax.Array:
    """F_e B×N_k×C, F_tg B×C → F_c B×N_k×C."""
    gate = CALIBRATION_GATES[self.gate]  # config.model.calibration_gate, checked by fcnet.check_model_config.
    b, n_k, c = f_e.shape
    joint = jnp.concatenate([f_e, jnp.broadcast_to(f_tg[:, None, :], (b, n_k, c)).astype(f_e.dtype)], axis=-1)
    joint = layers.MultiHeadAttention(self.num_heads, 2 * c, dtype=self.dtype, name="self_attn")(joint, joint, joint)
    alpha = gate(nn.Dense(1, dtype=self.dtype, name="score")(joint)[..., 0])  # B×N_k
    self.sow("intermediates", "alpha", alpha)
    return f_e + alpha[..., None] * f_e
