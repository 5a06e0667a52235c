"""Building blocks shared by the FCNet modules: conv+BN+ReLU, multi-head attention, resizing, encodings.

All image tensors are NHWC. Every module takes a compute `dtype` (bf16 or fp32); parameters stay float32.
Epsilons follow PyTorch's defaults (1e-5) so converted CLIP/CRIS weights reproduce the reference numerics.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
LN_EPS = 1e-5
BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # PyTorch momentum 0.1 == Flax momentum 0.9.

LayerNorm = functools.partial(nn.LayerNorm, epsilon=LN_EPS)


def _pad(kernel_size: int):
  # Explicit symmetric padding like PyTorch's `padding=k // 2`; "SAME" would pad a stride-2 conv asymmetrically.
  p = kernel_size // 2
  return ((p, p), (p, p))


class ConvBN(nn.Module):
  """Conv (no bias) → BatchNorm → optional ReLU: CRIS's `conv_layer` and the CLIP stem convs.

  Attributes:
    features: output channels.
    kernel_size: square kernel size; padding is kernel_size // 2 on each side.
    strides: convolution stride.
    relu: apply ReLU after the BatchNorm.
    frozen_bn: always use running statistics (the config's `freeze_backbone_bn`).
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  relu: bool = True
  frozen_bn: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(
      self.features,
      (self.kernel_size,) * 2,
      strides=self.strides,
      padding=_pad(self.kernel_size),
      use_bias=False,
      dtype=self.dtype,
      name="conv",
    )(x)
    x = nn.BatchNorm(
      use_running_average=not train or self.frozen_bn, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=self.dtype, name="bn"
    )(x)
    return nn.relu(x) if self.relu else x


class MultiHeadAttention(nn.Module):
  """Multi-head attention with separate q/k/v/output projections (PyTorch `nn.MultiheadAttention` semantics).

  Queries and keys/values may have different input widths (the EGM query is a flattened H_v·W_v map).
  Uses `jax.nn.dot_product_attention` (its XLA implementation, the default in jax 0.10/0.11).

  Attributes:
    num_heads: number of heads; `features` must be divisible by it.
    features: width of the projected q/k/v.
    out_features: width of the output projection (defaults to `features`).
    out_name: parameter name of the output projection ("out"; "c_proj" in CLIP's attention pool).
    query_init_scale: the query projection's LeCun-normal init is multiplied by this (1.0: the default init).
  """

  num_heads: int
  features: int
  out_features: Optional[int] = None
  out_name: str = "out"
  query_init_scale: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    *,
    key_mask: Optional[jax.Array] = None,
    query_pos: Optional[jax.Array] = None,
    key_pos: Optional[jax.Array] = None,
    is_causal: bool = False,
  ) -> jax.Array:
    """queries B×T×Dq, keys/values B×S×Dk, key_mask B×S (True = attend). Returns B×T×out_features.

    Positional encodings (if given) are added to the inputs of the q and k projections only (DETR/CRIS style).
    """
    if self.features % self.num_heads:
      raise ValueError(f"features={self.features} is not divisible by num_heads={self.num_heads}")
    head_dim = self.features // self.num_heads
    dense = functools.partial(nn.DenseGeneral, features=(self.num_heads, head_dim), dtype=self.dtype)
    q_in = queries if query_pos is None else queries + query_pos
    k_in = keys if key_pos is None else keys + key_pos
    q_init = nn.initializers.variance_scaling(self.query_init_scale**2, "fan_in", "truncated_normal")
    q = dense(name="query", kernel_init=q_init)(q_in)
    k = dense(name="key")(k_in)
    v = dense(name="value")(values)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)  # B×T×N×h
    return nn.DenseGeneral(self.out_features or self.features, axis=(-2, -1), dtype=self.dtype, name=self.out_name)(out)


def upsample2x(x: jax.Array) -> jax.Array:
  """×2 bilinear upsampling of B×H×W×C, equal to PyTorch `interpolate(scale_factor=2, mode='bilinear')`."""
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), method="bilinear").astype(x.dtype)


def avg_pool(x: jax.Array, size: int) -> jax.Array:
  """size×size average pooling with stride `size` (PyTorch `nn.AvgPool2d(size)`, floor mode)."""
  if size == 1:
    return x
  return nn.avg_pool(x, (size, size), strides=(size, size), padding="VALID")


def coord_features(batch: int, height: int, width: int, dtype: Dtype) -> jax.Array:
  """B×H×W×2 coordinates (x, y), each linearly spaced in [-1, 1] (CRIS CoordConv, eq. 3's F_coord)."""
  x = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, width)[None, :], (height, width))
  y = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, height)[:, None], (height, width))
  return jnp.broadcast_to(jnp.stack([x, y], axis=-1)[None], (batch, height, width, 2)).astype(dtype)


def sine_position_encoding_2d(height: int, width: int, dim: int) -> np.ndarray:
  """H·W×dim fixed 2-D sine/cosine encoding (CRIS `pos2d`): first half encodes x, second half y.

  Channels [0, dim/2) alternate sin/cos of the column index, [dim/2, dim) of the row index, with frequencies
  10000^(-2i/(dim/2)).
  """
  if dim % 4:
    raise ValueError(f"2-D sine encoding needs a width divisible by 4, got {dim}")
  half = dim // 2
  freqs = np.exp(np.arange(0, half, 2, dtype=np.float64) * -(np.log(10000.0) / half))  # half/2
  pe = np.zeros((height, width, dim), np.float64)
  xs = np.arange(width, dtype=np.float64)[:, None] * freqs  # W×half/2
  ys = np.arange(height, dtype=np.float64)[:, None] * freqs  # H×half/2
  pe[:, :, 0:half:2] = np.sin(xs)[None, :, :]
  pe[:, :, 1:half:2] = np.cos(xs)[None, :, :]
  pe[:, :, half::2] = np.sin(ys)[:, None, :]
  pe[:, :, half + 1 :: 2] = np.cos(ys)[:, None, :]
  return pe.reshape(height * width, dim).astype(np.float32)
