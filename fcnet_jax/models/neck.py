"""Vision neck (paper sec. 3.2, eqs. 1–3; docs/model.md): fuses F_v2, F_v3, F_v4 into F_v at H/16. Vision only."""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcnet_jax.models import layers

Dtype = Any


class VisionNeck(nn.Module):
  """CRIS-style FPN without text gating. Every conv is conv + BN + ReLU.

  Attributes:
    neck_dims: (d2, d3, d4) = CRIS's (256, 512, 1024).
    hidden_dim: C, the width of F_v.
  """

  neck_dims: Sequence[int]
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, f_v2: jax.Array, f_v3: jax.Array, f_v4: jax.Array, train: bool) -> jax.Array:
    """F_v2 B×H/8×W/8×·, F_v3 B×H/16×W/16×·, F_v4 B×H/32×W/32×· → F_v B×H/16×W/16×C."""
    d2, d3, d4 = self.neck_dims
    conv = lambda f, k, name: layers.ConvBN(f, k, dtype=self.dtype, name=name)
    # Eq. 1: F_m4 = Up(σ(F_v4 W_v4)).
    f_m4 = layers.upsample2x(conv(d4, 1, "v4_proj")(f_v4, train))
    # Eq. 2: F_m3 = [σ(F_m4 W_m4), σ(F_v3 W_v3)] → 1×1 conv.
    f_m3 = jnp.concatenate([conv(d3, 3, "m4_proj")(f_m4, train), conv(d3, 3, "v3_proj")(f_v3, train)], axis=-1)
    f_m3 = conv(d3, 1, "m3_fuse")(f_m3, train)
    # Eq. 2: F'_v2 = Avg(F_v2); F_m2 = [σ(F_m3 W_m3), σ(F'_v2 W_v2)] → 1×1 conv.
    f_v2 = layers.avg_pool(f_v2, 2)
    f_m2 = jnp.concatenate([conv(d3, 3, "m3_proj")(f_m3, train), conv(d2, 3, "v2_proj")(f_v2, train)], axis=-1)
    f_m2 = conv(d3, 1, "m2_fuse")(f_m2, train)
    # Eq. 3: F_m = Conv([P2(F_m2), P3(F_m3), P4(F_m4)]) (CRIS's f4_proj* then aggregation).
    f_m = jnp.concatenate(
      [
        conv(self.hidden_dim, 3, "p2")(f_m2, train),
        conv(self.hidden_dim, 3, "p3")(f_m3, train),
        conv(self.hidden_dim, 3, "p4")(f_m4, train),
      ],
      axis=-1,
    )
    f_m = conv(self.hidden_dim, 1, "aggregate")(f_m, train)
    # Eq. 3: F_v = Conv([F_m, F_coord]), then one more 3×3 conv (CRIS CoordConv).
    b, h, w, _ = f_m.shape
    f_v = jnp.concatenate([f_m, layers.coord_features(b, h, w, f_m.dtype)], axis=-1)
    f_v = conv(self.hidden_dim, 3, "coord_conv")(f_v, train)
    return conv(self.hidden_dim, 3, "out_conv")(f_v, train)
