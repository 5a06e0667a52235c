"""Training and evaluation metrics as `clu.metrics` collections (docs/data.md, "Evaluation").

Every metric is a sum or a count, so `merge` over batches, devices and hosts is exact. Use
`Collection.single_from_model_output(**outputs)` under `jit` with sharded arrays (the sums reduce over the global
batch); `gather_from_model_output` is for `pmap`/`shard_map` with a named batch axis.

  outputs = eval_step_outputs(logits, batch, config.mask_threshold, config.data.eval_canvas, config.model.image_size)
  update = EvalMetrics.single_from_model_output(**outputs)
  metrics = update if metrics is None else metrics.merge(update)
  metrics.compute()  # {"mIoU", "oIoU", "prec@0.5", …, "cris/mIoU", …, "count"}: Python floats.

`clu.metrics.Std` is not used: it is broken on current jax.
"""

from typing import Any, Dict, Mapping, Optional

from clu import metrics as clu_metrics
import flax
import jax
import jax.numpy as jnp
import numpy as np

from fcnet_jax import image_ops
from fcnet_jax import letterbox

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
_LOW_BITS = 20  # Pixel sums are kept as hi·2^20 + lo in int32 pairs (exact far past 2^31).
_SAMPLE_BITS = 16  # Per-sample counts are split at bit 16 before a batch sum (see `_batch_total`).
MAX_BATCH_FOR_COUNTS = 1 << (31 - _SAMPLE_BITS)  # Examples per batch whose split counts still sum within int32.
EVAL_BATCH_FIELDS = ("resized_hw", "offset", "orig_hw", "orig_mask")


def per_sample_iou(intersection: jax.Array, union: jax.Array) -> jax.Array:
  """B float32 IoU; an empty prediction against an empty ground truth (union 0) has IoU 1 (docs/data.md)."""
  union_f = union.astype(jnp.float32)
  return jnp.where(union > 0, intersection.astype(jnp.float32) / jnp.maximum(union_f, 1.0), 1.0)


def _model_output_mask(values: jax.Array, model_output: Mapping[str, Any]) -> Optional[jax.Array]:
  """The per-example "mask" (False = padding example) when it applies to `values` (not to a scalar loss)."""
  mask = model_output.get("mask")
  if mask is None or values.ndim == 0:
    return None
  return jnp.asarray(mask).astype(bool)


def _mean_of(name: str) -> type:
  """An `Average` of model output `name` over examples whose "mask" is True (scalars are averaged per step)."""

  @flax.struct.dataclass
  class MeanOf(clu_metrics.Average):
    @classmethod
    def from_model_output(cls, **model_output):
      values = jnp.asarray(model_output[name], jnp.float32)
      return super().from_model_output(values, mask=_model_output_mask(values, model_output))

  MeanOf.__name__ = MeanOf.__qualname__ = f"MeanOf_{name}"
  return MeanOf


def _precision_at(threshold: float, name: str = "iou") -> type:
  """Prec@X: the fraction of (unmasked) examples whose model output `name` (an IoU) is strictly greater than X."""

  @flax.struct.dataclass
  class PrecisionAt(clu_metrics.Average):
    @classmethod
    def from_model_output(cls, **model_output):
      hits = (jnp.asarray(model_output[name]) > threshold).astype(jnp.float32)
      return super().from_model_output(hits, mask=_model_output_mask(hits, model_output))

  PrecisionAt.__name__ = PrecisionAt.__qualname__ = f"PrecisionAt{int(round(threshold * 100))}_{name}"
  return PrecisionAt


def _split_count(total: jax.Array):
  return total >> _LOW_BITS, total & ((1 << _LOW_BITS) - 1)


def _batch_total(counts: jax.Array, mask: jax.Array) -> tuple:
  """Exact (hi, lo) of the sum of the unmasked int32 per-sample `counts` (each < 2^31), without int32 overflow.

  Each count is split as a·2^16 + b first: the sums of a and b fit int32 for any batch under 2^15 examples, even
  at a canvas of 6000 pixels (a sum of raw counts would wrap at ~5000 examples of 640² or ~60 of 6000²).
  """
  if counts.shape[0] >= MAX_BATCH_FOR_COUNTS:
    raise ValueError(
      f"a batch of {counts.shape[0]} examples is too large for the exact pixel counts of oIoU (at most "
      f"{MAX_BATCH_FOR_COUNTS - 1} per step): lower config.eval_batch_size"
    )
  counts = jnp.where(mask, counts.astype(jnp.int32), 0)
  a_sum = (counts >> _SAMPLE_BITS).sum()
  b_sum = (counts & ((1 << _SAMPLE_BITS) - 1)).sum()
  extra = _LOW_BITS - _SAMPLE_BITS  # a·2^16 = (a >> 4)·2^20 + (a & 15)·2^16.
  b_high, b_low = _split_count(b_sum)
  low = b_low + ((a_sum & ((1 << extra) - 1)) << _SAMPLE_BITS)  # < 2^21.
  carry, low = _split_count(low)
  return (a_sum >> extra) + b_high + carry, low


def _join_count(high: Any, low: Any) -> int:
  return int(np.asarray(high, np.int64)) * (1 << _LOW_BITS) + int(np.asarray(low, np.int64))


@flax.struct.dataclass
class OverallIoU(clu_metrics.Metric):
  """oIoU: total intersection / total union over the split (LAVT, CGFormer, ReLA).

  The two pixel sums are held exactly as int32 pairs (high·2^20 + low), which float32 cannot do past 2^24 and
  int32 alone cannot past 2^31 pixels (~5000 full 640×640 masks). Reads model outputs `intersection`, `union`
  (B int32) and the optional "mask" (B bool, False = padding example).
  """

  intersection_high: jax.Array
  intersection_low: jax.Array
  union_high: jax.Array
  union_low: jax.Array

  @classmethod
  def empty(cls) -> "OverallIoU":
    zero = jnp.array(0, jnp.int32)
    return cls(zero, zero, zero, zero)

  # The model outputs read (`CrisOverallIoU` reads the CRIS-protocol counts).
  intersection_name = "intersection"
  union_name = "union"

  @classmethod
  def from_model_output(cls, **model_output) -> "OverallIoU":
    intersection, union = model_output[cls.intersection_name], model_output[cls.union_name]
    mask = _model_output_mask(jnp.asarray(intersection), model_output)
    if mask is None:
      mask = jnp.ones(jnp.shape(intersection), bool)
    mask = jnp.broadcast_to(mask, jnp.shape(intersection))
    return cls(*_batch_total(jnp.asarray(intersection), mask), *_batch_total(jnp.asarray(union), mask))

  def merge(self, other: "OverallIoU") -> "OverallIoU":
    def add(high_a, low_a, high_b, low_b):
      carry, low = _split_count(low_a + low_b)
      return high_a + high_b + carry, low

    intersection = add(self.intersection_high, self.intersection_low, other.intersection_high, other.intersection_low)
    union = add(self.union_high, self.union_low, other.union_high, other.union_low)
    return type(self)(*intersection, *union)

  def totals(self) -> Dict[str, int]:
    """The exact pixel sums as Python ints (host side)."""
    return {
      "intersection": _join_count(self.intersection_high, self.intersection_low),
      "union": _join_count(self.union_high, self.union_low),
    }

  def compute(self) -> float:
    """Host side. An empty total union (every prediction and mask empty) gives 1, like a per-sample IoU."""
    totals = self.totals()
    return totals["intersection"] / totals["union"] if totals["union"] else 1.0


@flax.struct.dataclass
class CrisOverallIoU(OverallIoU):
  """oIoU of the CRIS-protocol maps (`cris_intersection`, `cris_union`)."""

  intersection_name = "cris_intersection"
  union_name = "cris_union"


@flax.struct.dataclass
class Count(clu_metrics.Metric):
  """The number of scored examples (those whose "mask" is True)."""

  count: jax.Array

  @classmethod
  def empty(cls) -> "Count":
    return cls(jnp.array(0, jnp.int32))

  @classmethod
  def from_model_output(cls, iou: jax.Array, **model_output) -> "Count":
    mask = _model_output_mask(jnp.asarray(iou), model_output)
    if mask is None:
      return cls(jnp.array(jnp.shape(iou)[0], jnp.int32))
    return cls(mask.astype(jnp.int32).sum())

  def merge(self, other: "Count") -> "Count":
    return type(self)(self.count + other.count)

  def compute(self) -> jax.Array:
    return self.count


def _as_floats(values: Mapping[str, Any]) -> Dict[str, float]:
  return {name: float(np.asarray(value)) for name, value in values.items()}


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  """Loss, mean per-sample IoU and Prec@0.5 at H/4 against the training target (`train_step_outputs`)."""

  loss: _mean_of("loss")
  iou: _mean_of("iou")
  prec_50: _precision_at(0.5)

  def compute(self) -> Dict[str, float]:
    """{"loss", "iou", "prec@0.5"} as Python floats (host side)."""
    values = super().compute()
    return _as_floats({"loss": values["loss"], "iou": values["iou"], "prec@0.5": values["prec_50"]})


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
  """Both protocols' metrics in the original image frame (`eval_step_outputs`); padding examples excluded."""

  miou: _mean_of("iou")
  oiou: OverallIoU
  prec_50: _precision_at(0.5)
  prec_60: _precision_at(0.6)
  prec_70: _precision_at(0.7)
  prec_80: _precision_at(0.8)
  prec_90: _precision_at(0.9)
  cris_miou: _mean_of("cris_iou")
  cris_oiou: CrisOverallIoU
  cris_prec_50: _precision_at(0.5, "cris_iou")
  cris_prec_60: _precision_at(0.6, "cris_iou")
  cris_prec_70: _precision_at(0.7, "cris_iou")
  cris_prec_80: _precision_at(0.8, "cris_iou")
  cris_prec_90: _precision_at(0.9, "cris_iou")
  count: Count

  def compute(self) -> Dict[str, float]:
    """{"mIoU", "oIoU", "prec@0.5", …, "prec@0.9", "cris/mIoU", …, "cris/prec@0.9", "count"} as Python floats.

    mIoU is the mean of per-sample IoU (the "IoU" of CRIS's and FCNet's tables), oIoU total intersection over
    total union; the unprefixed metrics are our protocol, "cris/…" the same metrics under CRIS's (docs/data.md,
    "Evaluation"). With no scored example mIoU and Prec@X are NaN.
    """
    values = super().compute()
    result = {}
    for prefix, field in (("", ""), ("cris/", "cris_")):
      result[f"{prefix}mIoU"] = values[f"{field}miou"]
      result[f"{prefix}oIoU"] = values[f"{field}oiou"]
      for threshold in PRECISION_THRESHOLDS:
        result[f"{prefix}prec@{threshold:.1f}"] = values[f"{field}prec_{int(round(threshold * 100))}"]
    result["count"] = values["count"]
    return _as_floats(result)


def train_step_outputs(logits: jax.Array, target: jax.Array, loss: jax.Array, threshold: float) -> Dict[str, jax.Array]:
  """The model outputs `TrainMetrics` consumes, at H/4 (pure, jit-friendly).

  Args:
    logits: B×P×P (or B×P×P×1) mask logits.
    target: B×P×P training target (`image_ops.downsample_mask` of the letterboxed mask), nonzero = object.
    loss: scalar loss of the step.
    threshold: probability threshold (config.mask_threshold).

  Returns:
    {"loss": scalar, "iou": B float32}.
  """
  logits = _squeeze_channel(logits)
  intersection, union = image_ops.batch_iou_terms(jax.nn.sigmoid(logits.astype(jnp.float32)), target, threshold)
  return {"loss": jnp.asarray(loss, jnp.float32), "iou": per_sample_iou(intersection, union)}


def eval_step_outputs(
  logits: jax.Array,
  batch: Mapping[str, jax.Array],
  threshold: float,
  canvas: int,
  image_size: int,
  letterbox_mode: str = "integer",
) -> Dict[str, jax.Array]:
  """The model outputs `EvalMetrics` consumes, scored in the ORIGINAL image frame under both protocols.

  Ours: sigmoid → `image_ops.inverse_letterbox` (one bilinear map, the geometry of the letterbox the batch was
  made with) → `> threshold` → intersection/union with `orig_mask`; IoU of an empty union is 1.
  CRIS's: sigmoid → `letterbox.cris_inverse` (bicubic align_corners upsampling to S, OpenCV's cubic inverse warp
  of the float affine) → `> threshold` → IoU = I / (U + ε), 0 for an empty union. Both are restricted to
  `valid_region` (the h×w image at the canvas's top-left). docs/data.md, "Evaluation".

  Args:
    logits: B×P×P or B×P×P×1 mask logits.
    batch: needs "resized_hw", "offset", "orig_hw" (B×2 int), "orig_mask" (B×K×K uint8); optional "valid"
      (B bool, False = padding example).
    threshold: probability threshold (config.mask_threshold, 0.35 as CRIS).
    canvas: K (config.data.eval_canvas); must equal orig_mask's side.
    image_size: S (config.model.image_size).
    letterbox_mode: how the batch was letterboxed (config.data.letterbox): "integer" reads the batch's rounded
      geometry; "cris" derives CRIS's float geometry from orig_hw for our protocol's inverse map.

  Returns:
    {"intersection", "union", "cris_intersection", "cris_union": B int32, "iou", "cris_iou": B float32,
     "mask": B bool}.
  """
  missing = [name for name in EVAL_BATCH_FIELDS if name not in batch]
  if missing:
    raise KeyError(f"eval batch lacks field(s) {missing}; it has {sorted(batch)}")
  orig_mask = batch["orig_mask"]
  if orig_mask.ndim != 3 or orig_mask.shape[1:] != (canvas, canvas):
    raise ValueError(
      f"batch['orig_mask'] has shape {orig_mask.shape}, expected B×{canvas}×{canvas} (config.data.eval_canvas)"
    )
  prob = jax.nn.sigmoid(_squeeze_channel(logits).astype(jnp.float32))
  orig_hw = batch["orig_hw"]
  resized_hw, offset = letterbox.inverse_geometry(
    batch["resized_hw"], batch["offset"], orig_hw, image_size, letterbox_mode, jnp
  )
  region = image_ops.valid_region(orig_hw, canvas)
  ours = image_ops.inverse_letterbox(prob, resized_hw, offset, orig_hw, canvas, image_size)
  intersection, union = image_ops.batch_iou_terms(ours, orig_mask, threshold, region)
  cris = letterbox.cris_inverse(prob, orig_hw, canvas, image_size)
  cris_intersection, cris_union = image_ops.batch_iou_terms(cris, orig_mask, threshold, region)
  # CRIS divides by U + 1e-6 in float64; in float32 that is I / U for U ≥ 1 (within 1e-6), and 0 for U = 0.
  cris_iou = jnp.where(cris_union > 0, cris_intersection / jnp.maximum(cris_union, 1).astype(jnp.float32), 0.0)
  valid = batch.get("valid")
  mask = jnp.ones(intersection.shape, bool) if valid is None else jnp.asarray(valid).astype(bool)
  return {
    "intersection": intersection,
    "union": union,
    "iou": per_sample_iou(intersection, union),
    "cris_intersection": cris_intersection,
    "cris_union": cris_union,
    "cris_iou": cris_iou.astype(jnp.float32),
    "mask": mask,
  }


def _squeeze_channel(logits: jax.Array) -> jax.Array:
  if logits.ndim == 4 and logits.shape[-1] == 1:
    return logits[..., 0]
  if logits.ndim != 3:
    raise ValueError(f"mask logits must be B×P×P or B×P×P×1, got shape {logits.shape}")
  return logits
