"""FCNet assembled (paper Fig. 2): encoders → vision neck → EGM → ECM → decoder → mask head.

    model = build_model(config.model)
    variables = model.init(rng, images, tokens, train=False)
    logits = model.apply(variables, images, tokens, train=False)           # B×S/4×S/4
    f_v2, f_v3, f_v4 = model.apply(variables, images, train=False, method=FCNet.encode_image)
    f_t, eos, padding_mask = model.apply(variables, tokens, method=FCNet.encode_text)
    f_v, memory, memory_mask = model.apply(variables, f_v2, f_v3, f_v4, f_t, eos, padding_mask, method=FCNet.fuse)
    logits = model.apply(variables, f_v, memory, memory_mask, method=FCNet.decode)

`__call__` is exactly encode_image → encode_text → fuse → decode, so each stage can be run (and timed) alone.

Images are normalized B×S×S×3 (NHWC); tokens are B×L CLIP ids. Intermediate features are sown into the
"intermediates" collection (`mutable=["intermediates"]`) for inspection.
"""

from typing import Any, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcnet_jax.models import decoder as decoder_lib
from fcnet_jax.models import emphasis
from fcnet_jax.models import image_encoder
from fcnet_jax.models import mask_head
from fcnet_jax.models import neck
from fcnet_jax.models import text_encoder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class FCNet(nn.Module):
  """FCNet with a CLIP ModifiedResNet image encoder.

  The fields have no defaults here: `configs/default.py` (`get_model_config`) is their one definition, with the
  meaning of each; build the model from a config with `build_model(config.model)`.
  """

  image_size: int
  context_length: int
  vision_layers: Sequence[int]
  vision_width: int
  vision_heads: int
  embed_dim: int
  vocab_size: int
  text_width: int
  text_layers: int
  text_heads: int
  text_embed_init_std: float
  neck_dims: Sequence[int]
  hidden_dim: int
  num_emphasis: int
  attention_heads: int
  decoder_layers: int
  decoder_ffn_dim: int
  dropout: float
  use_egm: bool
  use_ecm: bool
  egm_layernorm: bool
  egm_query_init_scale: float
  egm_heads: int
  calibration_gate: str
  freeze_backbone_bn: bool
  dtype: str

  def setup(self):
    dtype = DTYPES[self.dtype]
    self.image_encoder = image_encoder.ModifiedResNet(
      tuple(self.vision_layers),
      self.vision_width,
      self.vision_heads,
      self.embed_dim,
      self.image_size,
      frozen_bn=self.freeze_backbone_bn,
      dtype=dtype,
    )
    self.text_encoder = text_encoder.TextTransformer(
      self.context_length,
      self.vocab_size,
      self.text_width,
      self.text_layers,
      self.text_heads,
      self.embed_dim,
      embed_init_std=self.text_embed_init_std,
      dtype=dtype,
    )
    self.neck = neck.VisionNeck(tuple(self.neck_dims), self.hidden_dim, dtype=dtype)
    if self.use_egm:
      self.emphasis_generation = emphasis.EmphasisGeneration(
        self.num_emphasis,
        self.hidden_dim,
        self.egm_heads or self.attention_heads,
        layernorm=self.egm_layernorm,
        query_init_scale=self.egm_query_init_scale,
        dtype=dtype,
      )
      if self.use_ecm:
        self.text_global_proj = nn.Dense(self.hidden_dim, dtype=dtype)  # F_tg = Linear(EOS · text_projection).
        self.emphasis_calibration = emphasis.EmphasisCalibration(
          self.attention_heads, self.calibration_gate, dtype=dtype
        )
    else:
      self.word_proj = nn.Dense(self.hidden_dim, dtype=dtype)  # Baseline: the decoder reads the words.
    self.decoder = decoder_lib.Decoder(
      self.decoder_layers, self.hidden_dim, self.attention_heads, self.decoder_ffn_dim, self.dropout, dtype=dtype
    )
    self.mask_head = mask_head.MaskHead(self.hidden_dim, dtype=dtype)

  def check_inputs(self, images: jax.Array | None = None, tokens: jax.Array | None = None):
    """Fails clearly on inputs the model was not built for (the EGM query projection is resolution-bound)."""
    if images is not None:
      if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be B×H×W×3 (NHWC), got shape {images.shape}")
      if tuple(images.shape[1:3]) != (self.image_size, self.image_size):
        raise ValueError(
          f"image size {images.shape[1]}×{images.shape[2]} differs from config.model.image_size="
          f"{self.image_size}: FCNet's emphasis-generation query projection (H/16·W/16 → C) and the attention "
          f"pool's positional grid are bound to the configured resolution; letterbox inputs to "
          f"{self.image_size}×{self.image_size} or change the config"
        )
    if tokens is not None and (tokens.ndim != 2 or tokens.shape[1] != self.context_length):
      raise ValueError(f"tokens must be B×{self.context_length} (config.model.context_length), got {tokens.shape}")

  def encode_image(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """B×S×S×3 → (F_v2 B×S/8×S/8×·, F_v3 B×S/16×S/16×·, F_v4 B×S/32×S/32×embed_dim)."""
    self.check_inputs(images=images)
    return self.image_encoder(images, train)

  def encode_text(self, tokens: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """B×L → (F_t B×L×text_width, EOS feature B×embed_dim after text_projection, padding mask B×L)."""
    self.check_inputs(tokens=tokens)
    return self.text_encoder(tokens)

  def fuse(
    self,
    f_v2: jax.Array,
    f_v3: jax.Array,
    f_v4: jax.Array,
    f_t: jax.Array,
    eos: jax.Array,
    padding_mask: jax.Array,
    train: bool = False,
  ) -> Tuple[jax.Array, jax.Array, Optional[jax.Array]]:
    """Encoder features → (F_v, memory, memory_mask): what the decoder attends from and to.

    F_v B×S/16×S/16×C comes from the vision neck (eqs. 1–3). With EGM the memory is the M emphasis features
    F_e (eq. 4), calibrated by the sentence feature into F_c with ECM (sec. 3.3), and needs no mask; without
    EGM (the baseline) it is the projected words F_t B×L×C with the text mask (True = a real token).
    """
    text_mask = jnp.logical_not(padding_mask)
    f_v = self.neck(f_v2, f_v3, f_v4, train)
    self.sow("intermediates", "F_v", f_v)
    if not self.use_egm:
      return f_v, self.word_proj(f_t), text_mask
    memory = self.emphasis_generation(f_v, f_t, text_mask, train)
    self.sow("intermediates", "F_e", memory)
    if self.use_ecm:
      f_tg = self.text_global_proj(eos)
      memory = self.emphasis_calibration(memory, f_tg)
      self.sow("intermediates", "F_c", memory)
    return f_v, memory, None

  def decode(
    self, f_v: jax.Array, memory: jax.Array, memory_mask: Optional[jax.Array], train: bool = False
  ) -> jax.Array:
    """F_v attends to the memory through the decoder (eq. 5) → F_q; the mask head → logits B×S/4×S/4 (float32)."""
    f_q = self.decoder(f_v, memory, memory_mask, train)
    self.sow("intermediates", "F_q", f_q)
    return self.mask_head(f_q, train)

  def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> jax.Array:
    """Images B×S×S×3 (normalized), tokens B×L → mask logits B×S/4×S/4 (float32)."""
    f_v2, f_v3, f_v4 = self.encode_image(images, train)
    f_t, eos, padding_mask = self.encode_text(tokens)
    return self.decode(*self.fuse(f_v2, f_v3, f_v4, f_t, eos, padding_mask, train), train)


def check_model_config(cfg: Mapping[str, Any]) -> None:
  """Raises ValueError naming the config.model field that cannot work."""

  def fail(field, why):
    raise ValueError(f"config.model.{field}={cfg[field]!r}: {why}")

  if cfg["image_size"] % 32:
    fail("image_size", "must be divisible by 32 (the image encoder downsamples by 32)")
  if cfg["dtype"] not in DTYPES:
    fail("dtype", f"expected one of {sorted(DTYPES)}")
  if cfg["calibration_gate"] not in emphasis.CALIBRATION_GATES:
    fail("calibration_gate", f"expected one of {sorted(emphasis.CALIBRATION_GATES)}")
  if cfg["num_emphasis"] < 1:
    fail("num_emphasis", "must be ≥ 1")
  if cfg["egm_heads"] < 0 or (cfg["egm_heads"] and cfg["hidden_dim"] % cfg["egm_heads"]):
    fail("egm_heads", "must be 0 (attention_heads) or a divisor of hidden_dim")
  if not 2 <= cfg["context_length"] <= 77:
    fail("context_length", "must be in [2, 77] (CLIP has 77 positions)")
  if len(cfg["vision_layers"]) != 4:
    fail("vision_layers", "needs four stage sizes")
  if cfg["hidden_dim"] % 4 or cfg["hidden_dim"] % cfg["attention_heads"]:
    fail("hidden_dim", "must be divisible by 4 (2-D sine encoding) and by attention_heads")
  if (cfg["vision_width"] * 32) % cfg["vision_heads"]:
    fail("vision_heads", "must divide the attention-pool width vision_width·32")
  if cfg["text_width"] % cfg["text_heads"]:
    fail("text_heads", "must divide text_width")


def build_model(model_config: Mapping[str, Any]) -> FCNet:
  """FCNet from a `config.model` ConfigDict (or dict), after checking it."""
  cfg = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
  fields = set(FCNet.__annotations__) - {"parent", "name"}  # Flax adds these two.
  unknown, missing = set(cfg) - fields, fields - set(cfg)
  if unknown:
    raise ValueError(f"unknown config.model fields: {sorted(unknown)}")
  if missing:
    raise ValueError(f"config.model lacks {sorted(missing)}: start from configs/default.py get_model_config()")
  check_model_config(cfg)
  cfg["vision_layers"], cfg["neck_dims"] = tuple(cfg["vision_layers"]), tuple(cfg["neck_dims"])
  return FCNet(**cfg)
