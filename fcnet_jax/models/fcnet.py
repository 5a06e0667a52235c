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
from fcnet_jax.models import swin
from fcnet_jax.models import text_encoder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


BACKBONES = ("clip_resnet", "swin")  # config.model.backbone: the image encoder.
TEXT_BACKBONES = ("clip",)  # config.model.text_backbone: the text encoder.


class FCNet(nn.Module):
  """FCNet with a CLIP ModifiedResNet or Swin Transformer image encoder and CLIP's text transformer.

  The fields have no defaults here: `configs/default.py` (`get_model_config`) is their one definition, with the
  meaning of each; build the model from a config with `build_model(config.model)`.
  """

  image_size: int
  context_length: int
  backbone: str
  text_backbone: str
  vision_layers: Sequence[int]
  vision_width: int
  vision_heads: int
  embed_dim: int
  swin_embed_dim: int
  swin_depths: Sequence[int]
  swin_heads: Sequence[int]
  swin_window: int
  swin_patch_size: int
  swin_mlp_ratio: float
  swin_drop_path_rate: float
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
    if self.backbone == "swin":
      self.image_encoder = swin.SwinTransformer(
        self.swin_embed_dim,
        tuple(self.swin_depths),
        tuple(self.swin_heads),
        self.swin_window,
        patch_size=self.swin_patch_size,
        mlp_ratio=self.swin_mlp_ratio,
        drop_path_rate=self.swin_drop_path_rate,
        dtype=dtype,
      )
    else:
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
          f"pool's positional grid (CLIP ResNets) are bound to the configured resolution; letterbox inputs to "
          f"{self.image_size}×{self.image_size} or change the config"
        )
    if tokens is not None and (tokens.ndim != 2 or tokens.shape[1] != self.context_length):
      raise ValueError(f"tokens must be B×{self.context_length} (config.model.context_length), got {tokens.shape}")

  def encode_image(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """B×S×S×3 → (F_v2 B×S/8×S/8×·, F_v3 B×S/16×S/16×·, F_v4 B×S/32×S/32×·).

    CLIP ResNet: stages 2 and 3 (512·w/64, 1024·w/64 channels) and the attention pool over stage 4 (embed_dim).
    Swin: stages 2, 3, 4 (2D, 4D, 8D channels), each through a LayerNorm; stage 4 is not pooled.
    """
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
    return self.fuse_language(self.neck_features(f_v2, f_v3, f_v4, train), f_t, eos, padding_mask, train)

  def neck_features(self, f_v2: jax.Array, f_v3: jax.Array, f_v4: jax.Array, train: bool = False) -> jax.Array:
    """The vision neck (eqs. 1–3): encoder features → F_v B×S/16×S/16×C. Vision only, so one image's F_v serves
    every sentence about it (`fcnet_jax.predict`)."""
    f_v = self.neck(f_v2, f_v3, f_v4, train)
    self.sow("intermediates", "F_v", f_v)
    return f_v

  def fuse_language(
    self, f_v: jax.Array, f_t: jax.Array, eos: jax.Array, padding_mask: jax.Array, train: bool = False
  ) -> Tuple[jax.Array, jax.Array, Optional[jax.Array]]:
    """`fuse` after the neck: F_v and the text features → (F_v, memory, memory_mask)."""
    text_mask = jnp.logical_not(padding_mask)
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
  if cfg["backbone"] not in BACKBONES:
    fail("backbone", f"expected one of {list(BACKBONES)}")
  if cfg["text_backbone"] not in TEXT_BACKBONES:
    fail("text_backbone", f"expected one of {list(TEXT_BACKBONES)}")
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
  if cfg["backbone"] == "swin":
    _check_swin_config(cfg, fail)
  elif len(cfg["vision_layers"]) != 4:
    fail("vision_layers", "needs four stage sizes")
  if cfg["hidden_dim"] % 4 or cfg["hidden_dim"] % cfg["attention_heads"]:
    fail("hidden_dim", "must be divisible by 4 (2-D sine encoding) and by attention_heads")
  if cfg["backbone"] == "clip_resnet" and (cfg["vision_width"] * 32) % cfg["vision_heads"]:
    fail("vision_heads", "must divide the attention-pool width vision_width·32")
  if cfg["text_width"] % cfg["text_heads"]:
    fail("text_heads", "must divide text_width")


def _check_swin_config(cfg: Mapping[str, Any], fail) -> None:
  """The swin_* fields: four stages, heads dividing every stage width, a patch size that keeps S/32 maps."""
  if len(cfg["swin_depths"]) != 4 or min(cfg["swin_depths"]) < 1:
    fail("swin_depths", "needs four stage sizes ≥ 1 (F_v2..F_v4 are stages 2–4)")
  if len(cfg["swin_heads"]) != 4:
    fail("swin_heads", "needs four head counts, one per stage")
  for i, heads in enumerate(cfg["swin_heads"]):
    if heads < 1 or (cfg["swin_embed_dim"] * 2**i) % heads:
      fail(
        "swin_heads",
        f"stage {i + 1} has width swin_embed_dim·2^{i} = {cfg['swin_embed_dim'] * 2**i}, not "
        f"divisible by {heads} heads",
      )
  if cfg["swin_window"] < 1:
    fail("swin_window", "must be ≥ 1")
  if cfg["swin_patch_size"] != 4:
    fail("swin_patch_size", "must be 4: stages 2–4 must be at S/8, S/16, S/32 (the neck's scales)")
  if not 0.0 <= cfg["swin_drop_path_rate"] < 1.0:
    fail("swin_drop_path_rate", "must be in [0, 1)")


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
  for field in ("vision_layers", "neck_dims", "swin_depths", "swin_heads"):
    cfg[field] = tuple(cfg[field])
  return FCNet(**cfg)
