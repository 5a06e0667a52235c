"""How batches reach the model: the data source of the loop and the device-side inputs of one batch.

`letterbox_on_device` finishes, inside the jitted step, the batches of the input pipeline's fast training path
(`config.data.device_letterbox`): the host ships decoded images and mask crops on flat canvases
(`input_pipeline.host_decode`), and the letterbox resize runs here, reproducing the host's integer letterbox
(`input_pipeline.preprocess`) bit for bit.

`DataSource` hands the loop host-local NumPy batches (this process's rows of every global batch) and the split
sizes. By default it reads the converted TFRecord shards of `config.data.tfrecord_dir` through
`input_pipeline.pipeline`, imported lazily so that this module (and `fcnet_jax.train`) imports without TensorFlow;
with `config.data.synthetic` and no `tfrecord_dir` it first generates the synthetic refer-format dataset and
converts it with the real converter, into the workdir (once). Tests pass their own training stream.
"""

import functools
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from fcnet_jax import fileio
from fcnet_jax import image_ops
from fcnet_jax import letterbox
from fcnet_jax import tokenizer

Batch = Mapping[str, Any]
# The letterbox padding: CLIP's mean colour × 255, rounded, (123, 117, 104). The host path pads with it too.
MEAN_RGB_UINT8 = letterbox.MEAN_RGB_UINT8  # The letterbox padding: CLIP's mean colour × 255, rounded.
RAW_KEYS = ("image_raw", "mask_raw", "mask_box")  # What `letterbox_on_device` consumes.
SYNTHETIC_RAW_DIR = "synthetic_raw"
SYNTHETIC_SHARDS_DIR = "synthetic_tfrecords"


def model_inputs(batch: Batch, dtype: Any) -> Tuple[jax.Array, jax.Array]:
  """uint8 letterboxed images → normalized `dtype` images on the device (the host ships uint8), and tokens."""
  return image_ops.normalize_images(batch["image"], dtype), batch["tokens"]


def _letterbox_one(image_raw, mask_raw, mask_box, orig_hw, resized_hw, offset, image_size: int):
  """One example of `letterbox_on_device`: (S×S×3 uint8 image, S×S uint8 0/1 mask)."""
  height, width = orig_hw[0], orig_hw[1]
  rows = letterbox.bilinear_canvas_taps(image_size, height, resized_hw[0], offset[0], xp=jnp)
  cols = letterbox.bilinear_canvas_taps(image_size, width, resized_hw[1], offset[1], xp=jnp)
  inside = rows[3][:, None] & cols[3][None, :]

  def image_at(ys, xs):  # Pixel (y, x) of the row-major h×w×3 image at the start of image_raw.
    flat = (ys[:, None] * width + xs[None, :]) * 3
    return image_raw[flat[..., None] + jnp.arange(3)].astype(jnp.float32)

  top, left, box_h, box_w = (mask_box[i] for i in range(4))

  def mask_at(ys, xs):  # The crop holds the box; every pixel outside it is 0.
    ys, xs = ys - top, xs - left
    valid = ((ys >= 0) & (ys < box_h))[:, None] & ((xs >= 0) & (xs < box_w))[None, :]
    flat = jnp.where(valid, ys[:, None] * box_w + xs[None, :], 0)
    return jnp.where(valid, mask_raw[flat], 0).astype(jnp.float32)

  # Bilinear weights are convex, so the rounded values stay in [0, 255] (as on the host).
  resized = jnp.round(letterbox.bilinear_canvas(image_at, rows, cols, xp=jnp)).astype(jnp.uint8)
  image = jnp.where(inside[..., None], resized, jnp.asarray(MEAN_RGB_UINT8, jnp.uint8))
  mask = jnp.where(inside, letterbox.bilinear_canvas(mask_at, rows, cols, xp=jnp) >= 0.5, False).astype(jnp.uint8)
  return image, mask


def letterbox_on_device(batch: Batch, image_size: int) -> Batch:
  """The host path's batch from a batch of the device-letterbox path (jit-able; a no-op on host batches).

  Replaces image_raw / mask_raw / mask_box (`input_pipeline.host_decode`) with image uint8 B×S×S×3 and mask
  uint8 B×S×S, equal to what the host's integer letterbox (`input_pipeline.preprocess.letterbox`) makes of the
  same example: TensorFlow's bilinear resize (half-pixel centres, float32, its operation order), rounded, pasted
  at `offset` on the mean colour; the mask thresholded at 0.5 on a zero canvas. The train and eval steps call it
  first, so they see the same batch either way.
  """
  if "image_raw" not in batch:
    return batch
  one = functools.partial(_letterbox_one, image_size=image_size)
  image, mask = jax.vmap(one)(
    batch["image_raw"], batch["mask_raw"], batch["mask_box"], batch["orig_hw"], batch["resized_hw"], batch["offset"]
  )
  out = {key: value for key, value in batch.items() if key not in RAW_KEYS}
  out["image"], out["mask"] = image, mask
  return out


def init_inputs(image_size: int, context_length: int) -> Tuple[jax.Array, jax.Array]:
  """One blank float image and the empty sentence [SOS][EOS]: the inputs `model.init` traces its shapes with."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  tokens = jnp.zeros((1, context_length), jnp.int32).at[:, 0].set(tokenizer.SOT_TOKEN)
  return images, tokens.at[:, 1].set(tokenizer.EOT_TOKEN)


def prepare_synthetic_data(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Generates the synthetic refer-format dataset and converts it with the real converter; returns the shards.

  Both land in `workdir` and are reused when the converter's summary is already there. The refs file is named
  after `config.data.dataset` / `split_by`, so the shards' summary names them too.
  """
  from input_pipeline import convert  # pylint: disable=g-import-not-at-top
  from input_pipeline import records  # pylint: disable=g-import-not-at-top
  from input_pipeline import synthetic  # pylint: disable=g-import-not-at-top

  d = config.data
  raw, shards = os.path.join(workdir, SYNTHETIC_RAW_DIR), os.path.join(workdir, SYNTHETIC_SHARDS_DIR)
  if not fileio.as_path(shards, records.SUMMARY_FILE).exists():
    synthetic.generate(
      raw,
      seed=d.synthetic_seed,
      num_train_images=d.synthetic_train_images,
      num_eval_images=d.synthetic_eval_images,
      dataset=d.dataset,
      split_by=d.split_by,
    )
    convert.convert(raw, os.path.join(raw, "images"), d.dataset, d.split_by, shards, num_workers=1)
  return shards


class DataSource:
  """The batches of the loop and the split sizes, for one configuration.

  Attributes are read lazily: nothing touches the file system (or imports TensorFlow) until the loop asks.
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: Optional[str] = None,
    *,
    train_iter_fn: Optional[Callable[[int], Iterator[Batch]]] = None,
    split_sizes: Optional[Mapping[str, Mapping[str, int]]] = None,
  ):
    """`workdir` is where synthetic data goes (config.data.synthetic); tests replace the training stream.

    Args:
      config: the experiment configuration.
      workdir: the run's directory; needed only for synthetic data.
      train_iter_fn: start_step → iterator of host-local training batches (default: the shards).
      split_sizes: {split: {"refs", "sentences"}} (default: the shards' summary.json).
    """
    self.config, self.workdir = config, workdir
    self._train_iter_fn, self._split_sizes = train_iter_fn, split_sizes
    self._tfrecord_dir: Optional[str] = None
    self._summary: Optional[Mapping[str, Any]] = None

  @property
  def tfrecord_dir(self) -> str:
    """config.data.tfrecord_dir, or the synthetic shards in the workdir (made on first use)."""
    if self._tfrecord_dir is None:
      d = self.config.data
      if d.tfrecord_dir:
        self._tfrecord_dir = d.tfrecord_dir
      elif d.synthetic and self.workdir:
        self._tfrecord_dir = prepare_synthetic_data(self.config, self.workdir)
      else:
        raise ValueError(
          "config.data.tfrecord_dir is empty: point it at the output of `fcnet-convert` "
          "(input_pipeline.convert), or set config.data.synthetic for the embedded synthetic data"
        )
    return self._tfrecord_dir

  def _pipeline(self):
    from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top

    return pipeline

  def _info(self) -> Mapping[str, Any]:
    """The shards' summary (checked against config.data.dataset / split_by), read once."""
    if self._summary is None:
      d = self.config.data
      self._summary = self._pipeline().dataset_info(self.tfrecord_dir, dataset=d.dataset, split_by=d.split_by)
    return self._summary

  def split_sizes(self) -> Mapping[str, Mapping[str, int]]:
    """{split: {"refs", "sentences", …}}; the shards must be of config.data.dataset / split_by."""
    if self._split_sizes is None:
      self._split_sizes = self._info()["splits"]
    return self._split_sizes

  def device_letterbox(self) -> bool:
    """Whether the training batches are letterboxed on the device (`letterbox_on_device`) rather than the host.

    `config.data.device_letterbox` asks for it; it is used where it reproduces the host's letterbox: the
    "integer" letterbox on record format 2 shards. Otherwise the host letterboxes (the same batches, more host
    CPU), and the log says why.
    """
    c = self.config
    if not c.data.get("device_letterbox", False):
      return False
    try:  # The pipeline's own check of what the device letterbox needs.
      self._pipeline().metadata.check_device_letterbox(self._info(), self.tfrecord_dir, c.data.letterbox)
    except ValueError as e:
      logging.info("Training batches are letterboxed on the host: %s", e)
      return False
    return True

  def train(self, start_step: int) -> Iterator[Batch]:
    """The training stream from `start_step` on (a restarted run continues where it stopped)."""
    if self._train_iter_fn is not None:
      return self._train_iter_fn(start_step)
    c = self.config
    return self._pipeline().train_iterator(
      self.tfrecord_dir,
      c.data.train_split,
      image_size=c.model.image_size,
      context_length=c.model.context_length,
      batch_size=c.batch_size // jax.process_count(),
      seed=c.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      shuffle_buffer=c.data.shuffle_buffer,
      start_step=start_step,
      letterbox_mode=c.data.letterbox,
      # The fast path: batches that the step must pass through `letterbox_on_device` first.
      device_letterbox=self.device_letterbox(),
      canvas=c.data.eval_canvas,
    )

  def eval(self, split: str) -> Iterable[Batch]:
    """Every (ref, sentence) pair of `split` once, this process's part, padded to whole batches."""
    c = self.config
    return self._pipeline().eval_iterator(
      self.tfrecord_dir,
      split,
      image_size=c.model.image_size,
      context_length=c.model.context_length,
      batch_size=c.eval_batch_size // jax.process_count(),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      canvas=c.data.eval_canvas,
      letterbox_mode=c.data.letterbox,
    )
