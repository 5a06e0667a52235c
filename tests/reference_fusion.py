"""Float64 NumPy reference of FCNet's fusion path, written from the paper's equations and docs/model.md.

Independent of `fcnet_jax` on purpose (this file imports only NumPy): it reads the Flax variable tree (parameter
names and shapes), but every operation is written out here — convolutions as sums over shifted windows,
attention as explicit einsums with a float64 softmax, BatchNorm from running statistics, ×2 bilinear upsampling
with PyTorch's `align_corners=False` taps. `tests/test_fusion_reference.py` compares the Flax modules with it.

Layouts: images are NHWC; a Flax `Conv` kernel is kh×kw×C_in×C_out; a `DenseGeneral` attention projection
kernel is D×heads×head_dim (the output projection heads×head_dim×D). The references reshape those kernels to
plain matrices and split the heads themselves, using the head count of the config.
"""

from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

Tree = Mapping[str, Any]
EPS = 1e-5  # LayerNorm and BatchNorm epsilon (PyTorch's default, docs/model.md).


def as_float64(tree: Any) -> Any:
  """A nested dict of arrays (e.g. Flax variables) as float64 NumPy arrays."""
  if isinstance(tree, Mapping):
    return {key: as_float64(value) for key, value in tree.items()}
  return np.asarray(tree, np.float64)


# ------------------------------------------------------------------------------------------------ primitives


def relu(x: np.ndarray) -> np.ndarray:
  return np.maximum(x, 0.0)


def conv2d(x: np.ndarray, kernel: np.ndarray, bias: Optional[np.ndarray] = None) -> np.ndarray:
  """Stride-1 convolution with zero padding k // 2 on each side: a sum over the k×k shifted windows."""
  k = kernel.shape[0]
  pad = k // 2
  b, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.zeros((b, h, w, kernel.shape[-1]))
  for dy in range(k):
    for dx in range(k):
      out += np.einsum("bhwc,cd->bhwd", padded[:, dy : dy + h, dx : dx + w], kernel[dy, dx])
  return out if bias is None else out + bias


def batch_norm(x: np.ndarray, params: Tree, stats: Tree) -> np.ndarray:
  """Inference-mode BatchNorm: running mean/variance, then the learned scale and bias."""
  return (x - stats["mean"]) / np.sqrt(stats["var"] + EPS) * params["scale"] + params["bias"]


def conv_bn_relu(x: np.ndarray, params: Tree, stats: Tree) -> np.ndarray:
  """CRIS's conv_layer: conv (no bias) → BatchNorm → ReLU."""
  return relu(batch_norm(conv2d(x, params["conv"]["kernel"]), params["bn"], stats["bn"]))


def layer_norm(x: np.ndarray, params: Tree) -> np.ndarray:
  mean = x.mean(axis=-1, keepdims=True)
  var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
  return (x - mean) / np.sqrt(var + EPS) * params["scale"] + params["bias"]


def dense(x: np.ndarray, params: Tree) -> np.ndarray:
  return x @ params["kernel"] + params["bias"]


def upsample2x(x: np.ndarray, align_corners: bool = False) -> np.ndarray:
  """×2 bilinear, PyTorch `interpolate(scale_factor=2, mode='bilinear', align_corners=False)`.

  Output index o samples source coordinate (o + 0.5) / 2 − 0.5, clamped below at 0; taps floor and floor + 1
  (clamped to the last pixel) with the fractional part as the weight of the second. `align_corners=True` (source
  o·(n − 1)/(2n − 1)) is the other convention, for showing that the tests tell them apart.
  """

  def taps(size):
    if align_corners:
      src = np.arange(2 * size) * (size - 1) / (2 * size - 1)
    else:
      src = np.maximum((np.arange(2 * size) + 0.5) / 2.0 - 0.5, 0.0)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, size - 1)
    return lo, hi, src - lo

  _, h, w, _ = x.shape
  r0, r1, rw = taps(h)
  c0, c1, cw = taps(w)
  rows = x[:, r0] * (1.0 - rw)[None, :, None, None] + x[:, r1] * rw[None, :, None, None]
  return rows[:, :, c0] * (1.0 - cw)[None, None, :, None] + rows[:, :, c1] * cw[None, None, :, None]


def avg_pool2x2(x: np.ndarray) -> np.ndarray:
  b, h, w, c = x.shape
  return x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
  shifted = np.exp(x - x.max(axis=axis, keepdims=True))
  return shifted / shifted.sum(axis=axis, keepdims=True)


def attention(
  params: Tree,
  queries: np.ndarray,
  keys: np.ndarray,
  values: np.ndarray,
  num_heads: int,
  key_mask: Optional[np.ndarray] = None,
  query_pos: Optional[np.ndarray] = None,
  key_pos: Optional[np.ndarray] = None,
) -> np.ndarray:
  """Multi-head attention (PyTorch `nn.MultiheadAttention` semantics), B×T×D_q, B×S×D_k → B×T×D_out.

  Positional encodings go into the q and k projections only; key_mask B×S is True where a key may be attended.
  """

  def project(x, p):
    kernel = p["kernel"].reshape(p["kernel"].shape[0], -1)  # D_in × (heads · head_dim).
    y = x @ kernel + p["bias"].reshape(-1)
    return y.reshape(*y.shape[:-1], num_heads, -1)  # B×T×heads×head_dim.

  q = project(queries if query_pos is None else queries + query_pos, params["query"])
  k = project(keys if key_pos is None else keys + key_pos, params["key"])
  v = project(values, params["value"])
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  if key_mask is not None:
    logits = np.where(key_mask[:, None, None, :], logits, -np.inf)
  weights = softmax(logits, axis=-1)
  heads = np.einsum("bhts,bshd->bthd", weights, v)
  heads = heads.reshape(*heads.shape[:2], -1)
  out = params["out"]
  return heads @ out["kernel"].reshape(-1, out["kernel"].shape[-1]) + out["bias"]


def sine_encoding_2d(height: int, width: int, dim: int) -> np.ndarray:
  """H·W×dim sine encoding (DETR/CRIS): channels [0, dim/2) encode the column, [dim/2, dim) the row.

  Within each half, channel 2i is sin(p·ω_i) and 2i + 1 is cos(p·ω_i), ω_i = 10000^(−2i/(dim/2)).
  """
  half = dim // 2
  pe = np.zeros((height, width, dim))
  for i in range(half // 2):
    omega = 10000.0 ** (-2.0 * i / half)
    cols, rows = np.arange(width) * omega, np.arange(height) * omega
    pe[:, :, 2 * i] = np.sin(cols)[None, :]
    pe[:, :, 2 * i + 1] = np.cos(cols)[None, :]
    pe[:, :, half + 2 * i] = np.sin(rows)[:, None]
    pe[:, :, half + 2 * i + 1] = np.cos(rows)[:, None]
  return pe.reshape(height * width, dim)


# ------------------------------------------------------------------------------------------------ modules


def vision_neck(params: Tree, stats: Tree, f_v2: np.ndarray, f_v3: np.ndarray, f_v4: np.ndarray) -> np.ndarray:
  """Eqs. 1–3: F_v2 (H/8), F_v3 (H/16), F_v4 (H/32) → F_v at H/16."""
  cbr = lambda name, x: conv_bn_relu(x, params[name], stats[name])
  f_m4 = upsample2x(cbr("v4_proj", f_v4))  # Eq. 1.
  f_m3 = cbr("m3_fuse", np.concatenate([cbr("m4_proj", f_m4), cbr("v3_proj", f_v3)], axis=-1))  # Eq. 2.
  f_m2 = cbr("m2_fuse", np.concatenate([cbr("m3_proj", f_m3), cbr("v2_proj", avg_pool2x2(f_v2))], axis=-1))
  f_m = cbr("aggregate", np.concatenate([cbr("p2", f_m2), cbr("p3", f_m3), cbr("p4", f_m4)], axis=-1))  # Eq. 3.
  b, h, w, _ = f_m.shape
  coords = np.zeros((b, h, w, 2))
  coords[..., 0] = np.linspace(-1.0, 1.0, w)[None, None, :]  # x.
  coords[..., 1] = np.linspace(-1.0, 1.0, h)[None, :, None]  # y.
  return cbr("out_conv", cbr("coord_conv", np.concatenate([f_m, coords], axis=-1)))


def emphasis_generation(
  params: Tree, stats: Tree, f_v: np.ndarray, f_t: np.ndarray, text_mask: np.ndarray, num_heads: int, layernorm: bool
) -> np.ndarray:
  """Eq. 4: F_vk = 3×3 conv C → N_k; its N_k channels (each flattened over H_v·W_v) query the words → F_e."""
  f_vk = conv_bn_relu(f_v, params["key_vision"], stats["key_vision"])
  b, h, w, n_k = f_vk.shape
  queries = np.stack([f_vk[..., i].reshape(b, h * w) for i in range(n_k)], axis=1)  # B×N_k×(H_v·W_v).
  f_e = attention(params["cross_attn"], queries, f_t, f_t, num_heads, key_mask=text_mask)
  return layer_norm(f_e, params["norm"]) if layernorm else f_e


def emphasis_calibration(
  params: Tree, f_e: np.ndarray, f_tg: np.ndarray, num_heads: int, gate: str
) -> Tuple[np.ndarray, np.ndarray]:
  """Sec. 3.3: α = Linear(MHSA([F_e, tile(F_tg)])); F_c = F_e + gate(α) ⊙ F_e. Returns (F_c, gated α)."""
  joint = np.concatenate([f_e, np.repeat(f_tg[:, None, :], f_e.shape[1], axis=1)], axis=-1)
  joint = attention(params["self_attn"], joint, joint, joint, num_heads)
  alpha = dense(joint, params["score"])[..., 0]  # B×N_k.
  if gate == "sigmoid":
    alpha = 1.0 / (1.0 + np.exp(-alpha))
  elif gate == "softmax":
    alpha = softmax(alpha, axis=-1)
  elif gate != "none":
    raise ValueError(f"unknown calibration gate {gate!r}")
  return f_e + alpha[..., None] * f_e, alpha


def decoder_layer(
  params: Tree, x: np.ndarray, memory: np.ndarray, memory_mask: Optional[np.ndarray], pos: np.ndarray, num_heads: int
) -> np.ndarray:
  """Eq. 5, pre-LN, inference (no dropout); `pos` (H·W×C) goes into the pixel queries and keys only."""
  y = layer_norm(x, params["norm1"])
  x = x + attention(params["self_attn"], y, y, y, num_heads, query_pos=pos, key_pos=pos)
  y = layer_norm(x, params["norm2"])
  x = x + attention(params["cross_attn"], y, memory, memory, num_heads, key_mask=memory_mask, query_pos=pos)
  y = relu(dense(layer_norm(x, params["norm3"]), params["ffn_in"]))
  return x + dense(y, params["ffn_out"])


def decoder(
  params: Tree, f_v: np.ndarray, memory: np.ndarray, memory_mask: Optional[np.ndarray], num_layers: int, num_heads: int
) -> np.ndarray:
  """`num_layers` decoder layers over the H_v·W_v pixel tokens, then the final LayerNorm; B×H_v×W_v×C."""
  b, h, w, c = f_v.shape
  pos = sine_encoding_2d(h, w, c)
  x = f_v.reshape(b, h * w, c)
  for i in range(num_layers):
    x = decoder_layer(params[f"layer{i}"], x, memory, memory_mask, pos, num_heads)
  return layer_norm(x, params["norm"]).reshape(b, h, w, c)


def mask_head(params: Tree, stats: Tree, x: np.ndarray) -> np.ndarray:
  """H/16 → H/4: (×2 up, 3×3 conv+BN+ReLU) twice, then a 3×3 conv with bias to one logit; B×H/4×W/4."""
  x = conv_bn_relu(upsample2x(x), params["up1"], stats["up1"])
  x = conv_bn_relu(upsample2x(x), params["up2"], stats["up2"])
  return conv2d(x, params["logit"]["kernel"], params["logit"]["bias"])[..., 0]


# ------------------------------------------------------------------------------------------------ FCNet


def fuse(
  variables: Tree,
  cfg: Mapping[str, Any],
  f_v2: np.ndarray,
  f_v3: np.ndarray,
  f_v4: np.ndarray,
  f_t: np.ndarray,
  eos: np.ndarray,
  padding_mask: np.ndarray,
) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
  """Neck → EGM → ECM (or the no-EGM word projection): (F_v, memory, memory mask or None).

  `cfg` holds the config.model fields use_egm, use_ecm, egm_layernorm, egm_heads, attention_heads and
  calibration_gate; `padding_mask` is True at padding (after [EOS]).
  """
  params, stats = variables["params"], variables["batch_stats"]
  text_mask = np.logical_not(padding_mask)
  f_v = vision_neck(params["neck"], stats["neck"], f_v2, f_v3, f_v4)
  if not cfg["use_egm"]:
    return f_v, dense(f_t, params["word_proj"]), text_mask
  memory = emphasis_generation(
    params["emphasis_generation"],
    stats["emphasis_generation"],
    f_v,
    f_t,
    text_mask,
    cfg["egm_heads"] or cfg["attention_heads"],
    cfg["egm_layernorm"],
  )
  if cfg["use_ecm"]:
    f_tg = dense(eos, params["text_global_proj"])
    memory, _ = emphasis_calibration(
      params["emphasis_calibration"], memory, f_tg, cfg["attention_heads"], cfg["calibration_gate"]
    )
  return f_v, memory, None


def decode(
  variables: Tree, cfg: Mapping[str, Any], f_v: np.ndarray, memory: np.ndarray, memory_mask: Optional[np.ndarray]
) -> np.ndarray:
  """Decoder + mask head: B×S/4×S/4 logits. `cfg` needs decoder_layers and attention_heads."""
  params, stats = variables["params"], variables["batch_stats"]
  f_q = decoder(params["decoder"], f_v, memory, memory_mask, cfg["decoder_layers"], cfg["attention_heads"])
  return mask_head(params["mask_head"], stats["mask_head"], f_q)


def forward(variables: Tree, cfg: Mapping[str, Any], *inputs: np.ndarray) -> Dict[str, Any]:
  """`fuse` then `decode`: {"f_v", "memory", "memory_mask", "logits"}."""
  f_v, memory, memory_mask = fuse(variables, cfg, *inputs)
  return {
    "f_v": f_v,
    "memory": memory,
    "memory_mask": memory_mask,
    "logits": decode(variables, cfg, f_v, memory, memory_mask),
  }
