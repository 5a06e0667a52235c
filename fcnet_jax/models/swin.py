"""Swin Transformer image encoder (Liu et al. 2021) for FCNet's Swin-B configuration (paper sec. 3.1; docs/model.md).

Patch embedding (4×4 conv + LayerNorm), four stages of pre-LN transformer blocks with window attention (W-MSA and
shifted SW-MSA alternating, a learned relative-position bias per head), patch merging between stages, stochastic depth
(drop-path) by config. Outputs, as LAVT feeds its decoder: stages 2–4 before their patch merging, each through its own
LayerNorm: F_v2 (B×S/8×S/8×2D), F_v3 (B×S/16×S/16×4D), F_v4 (B×S/32×S/32×8D) for embed width D (128 in Swin-B).

Stage sizes that are not multiples of the window follow `transformers`' SwinModel (the reference of tests/test_swin.py):
after the block's first LayerNorm the map is zero-padded at the bottom/right to whole windows; padded tokens are not
masked (only the shifted-window regions are); the output is cropped back. A stage no larger than the window uses no
shift and one window of the stage's size (`transformers` and Microsoft's classification Swin clamp the same way). Where
LAVT's backbone differs: it always shifts (at 384×384 its 12×12 stage 4 is shifted and masked, here it is not); at 416
and 480 (stage 4 of 13 and 15) both shift, pad and mask identically. A stage strictly smaller than the window (e.g.
S = 320 with window 12) uses the relative-position biases of the window's table for the offsets it has (the central
part); `transformers` fails on such inputs and Microsoft's code rebuilds a smaller table.

Everything is NHWC; windows are folded into the batch axis and attend in one batched `jax.nn.dot_product_attention`
(relative-position bias as `bias`, the shifted-window region mask as a boolean `mask`; the reference adds -100 to
masked logits, which changes an fp32 softmax by < 1e-40). Compute in `dtype`, parameters float32.
"""

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fcnet_jax.models import layers

Dtype = Any


def relative_position_index(window: int, table_window: int) -> np.ndarray:
  """window²×window² indices into a (2·table_window − 1)² relative-position table (Swin's row-major (dy, dx) order).

  With table_window > window (a stage smaller than the configured window) the indices address the central
  (2·window − 1)² part of the larger table: the same relative offsets.
  """
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + (table_window - 1)  # 2×T×T, offsets shifted to ≥ 0
  return rel[0] * (2 * table_window - 1) + rel[1]


def shifted_window_regions(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """H×W region ids of the cyclically shifted map: tokens attend only within their region (Swin's SW-MSA mask)."""

  def axis_regions(n):
    idx = np.arange(n)
    return (idx >= n - window).astype(np.int32) + (idx >= n - shift).astype(np.int32)

  return axis_regions(height)[:, None] * 3 + axis_regions(width)[None, :]


def window_partition(x: jax.Array, window: int) -> jax.Array:
  """B×H×W×C (H, W multiples of window) → B·nW×window²×C, windows in row-major order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window * window, c)


def window_reverse(windows: jax.Array, window: int, height: int, width: int) -> jax.Array:
  """Inverse of `window_partition`: B·nW×window²×C → B×H×W×C."""
  c = windows.shape[-1]
  x = windows.reshape(-1, height // window, width // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, height, width, c)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows with Swin's relative-position bias (fused qkv, output `proj`).

  Attributes:
    num_heads: heads; the width must be divisible by it.
    window_size: the configured window; fixes the (2·window_size − 1)²×heads bias table.
  """

  num_heads: int
  window_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, windows: jax.Array, window: int, region_mask: jax.Array | None) -> jax.Array:
    """windows: B·nW×window²×C; region_mask: nW×window²×window² bool (True = attend) or None."""
    n, tokens, c = windows.shape
    if c % self.num_heads:
      raise ValueError(f"Swin width {c} is not divisible by {self.num_heads} heads")
    table = self.param(
      "relative_position_bias_table",
      nn.initializers.truncated_normal(0.02),
      ((2 * self.window_size - 1) ** 2, self.num_heads),
      jnp.float32,
    )
    index = relative_position_index(window, self.window_size)
    bias = table[index.reshape(-1)].reshape(tokens, tokens, self.num_heads).transpose(2, 0, 1)[None]  # 1×N×T×T
    qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(windows)
    q, k, v = jnp.split(qkv.reshape(n, tokens, 3 * self.num_heads, c // self.num_heads), 3, axis=2)
    mask = None
    if region_mask is not None:  # Same mask for every image: broadcast over the batch, then fold like the windows.
      num_windows = region_mask.shape[0]
      mask = jnp.broadcast_to(region_mask[None], (n // num_windows,) + region_mask.shape)
      mask = mask.reshape(n, 1, tokens, tokens)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), mask=mask)  # B·nW×T×N×h
    return nn.Dense(c, dtype=self.dtype, name="proj")(out.reshape(n, tokens, c))


class SwinBlock(nn.Module):
  """x + DropPath((S)W-MSA(LN(x))), then x + DropPath(MLP(LN(x))) with a ×mlp_ratio exact-GELU MLP.

  Attributes:
    num_heads, window_size: as `WindowAttention`.
    shift: True for the odd blocks of a stage (SW-MSA); skipped when the stage is no larger than the window.
    mlp_ratio: hidden width / width (4).
    drop_path: probability of dropping this block's residual branches per example in training.
  """

  num_heads: int
  window_size: int
  shift: bool
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    b, h, w, c = x.shape
    window = min(self.window_size, h, w)
    shift = window // 2 if self.shift and min(h, w) > self.window_size else 0
    drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), deterministic=not train or self.drop_path == 0.0)

    y = layers.LayerNorm(dtype=self.dtype, name="norm1")(x)
    pad_h, pad_w = (-h) % window, (-w) % window
    y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    region_mask = None
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
      regions = shifted_window_regions(hp, wp, window, shift)
      regions = np.asarray(window_partition(regions[None, :, :, None], window))[..., 0]  # nW×T
      region_mask = jnp.asarray(regions[:, :, None] == regions[:, None, :])
    y = WindowAttention(self.num_heads, self.window_size, dtype=self.dtype, name="attn")(
      window_partition(y, window), window, region_mask
    )
    y = window_reverse(y, window, hp, wp)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    x = x + drop(y[:, :h, :w, :])

    y = layers.LayerNorm(dtype=self.dtype, name="norm2")(x)
    y = nn.Dense(int(c * self.mlp_ratio), dtype=self.dtype, name="fc1")(y)
    y = nn.Dense(c, dtype=self.dtype, name="fc2")(nn.gelu(y, approximate=False))
    return x + drop(y)


class PatchMerging(nn.Module):
  """2×2 neighbourhoods concatenated (order (0,0), (1,0), (0,1), (1,1) as (row, col)) → LayerNorm(4C) → Linear 2C."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    x = layers.LayerNorm(dtype=self.dtype, name="norm")(x)
    return nn.Dense(2 * c, use_bias=False, dtype=self.dtype, name="reduction")(x)


class SwinStage(nn.Module):
  """`depth` blocks (W-MSA, SW-MSA, …), then patch merging unless it is the last stage.

  Returns (the stage's map before merging, the merged map or None).
  """

  depth: int
  num_heads: int
  window_size: int
  mlp_ratio: float
  drop_paths: Tuple[float, ...]
  downsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> Tuple[jax.Array, jax.Array | None]:
    for j in range(self.depth):
      x = SwinBlock(
        self.num_heads,
        self.window_size,
        shift=j % 2 == 1,
        mlp_ratio=self.mlp_ratio,
        drop_path=self.drop_paths[j],
        dtype=self.dtype,
        name=f"blocks_{j}",
      )(x, train)
    merged = PatchMerging(dtype=self.dtype, name="downsample")(x) if self.downsample else None
    return x, merged


class SwinTransformer(nn.Module):
  """Swin trunk → (F_v2, F_v3, F_v4), each through its LayerNorm (`norm1`–`norm3`, LAVT's names).

  Parameter names follow Microsoft's release (what LAVT loads; `fcnet_jax/weights/swin.py` maps them and timm's):
  `patch_embed_{proj,norm}`, `layers_{i}/blocks_{j}/{norm1,attn/{qkv,proj,relative_position_bias_table},norm2,fc1,
  fc2}`, `layers_{i}/downsample/{norm,reduction}` at the end of stages 0–2.

  Attributes:
    embed_dim: D, the width of stage 1 (Swin-T/S 96, B 128, L 192); stage i has D·2^i channels.
    depths: blocks per stage (T 2-2-6-2; S, B, L 2-2-18-2).
    num_heads: heads per stage (B 4-8-16-32).
    window_size: window side (12 for the 384-pretrained Swin-B).
    patch_size: side of the patch embedding (4).
    mlp_ratio: MLP hidden width / width (4).
    drop_path_rate: stochastic depth of the last block; block k of n drops with rate·k/(n−1) (Swin's schedule).
  """

  embed_dim: int
  depths: Sequence[int]
  num_heads: Sequence[int]
  window_size: int
  patch_size: int = 4
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """images: B×S×S×3 normalized → (F_v2, F_v3, F_v4)."""
    p = self.patch_size
    x = images.astype(self.dtype)
    x = jnp.pad(x, ((0, 0), (0, (-x.shape[1]) % p), (0, (-x.shape[2]) % p), (0, 0)))
    x = nn.Conv(self.embed_dim, (p, p), strides=p, padding="VALID", dtype=self.dtype, name="patch_embed_proj")(x)
    x = layers.LayerNorm(dtype=self.dtype, name="patch_embed_norm")(x)
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    outputs = []
    for i, depth in enumerate(self.depths):
      start = sum(self.depths[:i])
      stage_out, x = SwinStage(
        depth,
        self.num_heads[i],
        self.window_size,
        self.mlp_ratio,
        tuple(rates[start : start + depth]),
        downsample=i < len(self.depths) - 1,
        dtype=self.dtype,
        name=f"layers_{i}",
      )(x, train)
      if i >= 1:
        outputs.append(layers.LayerNorm(dtype=self.dtype, name=f"norm{i}")(stage_out))
    return tuple(outputs)
