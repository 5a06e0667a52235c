"""CLIP ModifiedResNet image encoder with CRIS's spatial attention pool (paper sec. 3.1; docs/model.md).

Outputs for an S×S image: F_v2 (B×S/8×S/8×512·w/64), F_v3 (B×S/16×S/16×1024·w/64) and
F_v4 (B×S/32×S/32×embed_dim), where w is the stem width (64 in CLIP).
"""

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fcnet_jax.models import layers

Dtype = Any


class Bottleneck(nn.Module):
  """CLIP's anti-aliased bottleneck: 1×1 → 3×3 → avg-pool(stride) → 1×1 (×4), downsample = avg-pool → 1×1 → BN."""

  planes: int
  strides: int = 1
  frozen_bn: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv_bn = lambda f, k, relu, name: layers.ConvBN(
      f, k, relu=relu, frozen_bn=self.frozen_bn, dtype=self.dtype, name=name
    )
    out = conv_bn(self.planes, 1, True, "conv1")(x, train)
    out = conv_bn(self.planes, 3, True, "conv2")(out, train)
    out = layers.avg_pool(out, self.strides)
    out = conv_bn(self.planes * 4, 1, False, "conv3")(out, train)
    identity = x
    if self.strides > 1 or x.shape[-1] != self.planes * 4:
      identity = conv_bn(self.planes * 4, 1, False, "downsample")(layers.avg_pool(x, self.strides), train)
    return nn.relu(out + identity)


class AttentionPool(nn.Module):
  """CRIS's spatial attention pool over the last stage (docs/model.md, "Image encoder"), no class token.

  Every S/32×S/32 position attends to all positions (with CLIP's positional embedding, resized to this grid by
  `resize_pos_embed` when weights are imported); the result is reshaped back to a map, a 1×1 conv + BN residual
  branch ("connect") is added, then ReLU.

  Attributes:
    grid: (H/32, W/32) spatial size the positional embedding is built for.
    num_heads: CLIP uses width·32/64 heads.
    out_dim: embed_dim (1024 for RN50, 512 for RN101).
  """

  grid: Tuple[int, int]
  num_heads: int
  out_dim: int
  frozen_bn: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    b, h, w, c = x.shape
    if (h, w) != tuple(self.grid):
      raise ValueError(f"attention pool built for a {self.grid} grid got a {h}×{w} feature map")
    residual = layers.ConvBN(self.out_dim, 1, relu=False, frozen_bn=self.frozen_bn, dtype=self.dtype, name="connect")(
      x, train
    )
    pos = self.param("positional_embedding", nn.initializers.normal(stddev=c**-0.5), (h * w, c), jnp.float32)
    tokens = x.reshape(b, h * w, c) + pos.astype(self.dtype)
    pooled = layers.MultiHeadAttention(
      self.num_heads, c, out_features=self.out_dim, out_name="c_proj", dtype=self.dtype, name="attn"
    )(tokens, tokens, tokens)
    return nn.relu(pooled.reshape(b, h, w, self.out_dim) + residual)


class ModifiedResNet(nn.Module):
  """CLIP's ModifiedResNet trunk: 3-conv stem + 2×2 avg-pool, four bottleneck stages, attention pool.

  Attributes:
    stage_sizes: blocks per stage, (3, 4, 6, 3) for RN50 and (3, 4, 23, 3) for RN101.
    width: stem width w (64).
    num_heads: attention-pool heads.
    out_dim: embed_dim.
    image_size: S; fixes the attention pool's positional grid (S/32)².
  """

  stage_sizes: Sequence[int]
  width: int
  num_heads: int
  out_dim: int
  image_size: int
  frozen_bn: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """images: B×S×S×3 normalized. Returns (F_v2, F_v3, F_v4)."""
    w = self.width
    x = images.astype(self.dtype)
    for i, (features, strides) in enumerate([(w // 2, 2), (w // 2, 1), (w, 1)], start=1):
      x = layers.ConvBN(features, 3, strides=strides, frozen_bn=self.frozen_bn, dtype=self.dtype, name=f"stem{i}")(
        x, train
      )
    x = layers.avg_pool(x, 2)
    stage_outputs = []
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = Bottleneck(
          w * 2**stage, strides, frozen_bn=self.frozen_bn, dtype=self.dtype, name=f"layer{stage + 1}_{block}"
        )(x, train)
      stage_outputs.append(x)
    grid = (self.image_size // 32, self.image_size // 32)
    f_v4 = AttentionPool(
      grid, self.num_heads, self.out_dim, frozen_bn=self.frozen_bn, dtype=self.dtype, name="attnpool"
    )(stage_outputs[3], train)
    return stage_outputs[1], stage_outputs[2], f_v4


def _torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """out×in interpolation matrix of PyTorch's bicubic resize (A = -0.75, align_corners=False, clamped taps)."""
  a = -0.75
  cubic1 = lambda t: ((a + 2) * t - (a + 3)) * t * t + 1  # |t| ≤ 1
  cubic2 = lambda t: ((a * t - 5 * a) * t + 8 * a) * t - 4 * a  # 1 < |t| < 2
  matrix = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for o in range(out_size):
    src = scale * (o + 0.5) - 0.5  # PyTorch does not clamp the cubic source coordinate; it clamps the taps.
    base = int(np.floor(src))
    t = src - base
    weights = (cubic2(t + 1), cubic1(t), cubic1(1 - t), cubic2(2 - t))
    for k, weight in enumerate(weights):
      matrix[o, min(max(base - 1 + k, 0), in_size - 1)] += weight
  return matrix


def resize_pos_embed(pos: np.ndarray, new_grid: Tuple[int, int]) -> np.ndarray:
  """Resizes a square CLIP positional grid (g²×C, class position already dropped) to new_grid (h·w×C).

  Bicubic as PyTorch's `F.interpolate(mode='bicubic', align_corners=False)` (what CRIS-style code uses), computed
  in float64. An unchanged grid is returned exactly.
  """
  pos = np.asarray(pos)
  g = int(round(np.sqrt(pos.shape[0])))
  if g * g != pos.shape[0]:
    raise ValueError(f"positional embedding with {pos.shape[0]} positions is not a square grid")
  h, w = new_grid
  if (h, w) == (g, g):
    return pos.copy()
  grid = pos.astype(np.float64).reshape(g, g, -1)
  out = np.einsum("hi,ijc,wj->hwc", _torch_bicubic_matrix(g, h), grid, _torch_bicubic_matrix(g, w))
  return out.reshape(h * w, -1).astype(pos.dtype)
