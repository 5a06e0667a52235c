"""How batches reach the model: the data source of the loop and the device-side inputs of one batch.

`DataSource` hands the loop host-local NumPy batches (this process's rows of every global batch) and the split
sizes. By default it reads the converted TFRecord shards of `config.data.tfrecord_dir` through
`input_pipeline.pipeline`, imported lazily so that this module (and `fcnet_jax.train`) imports without TensorFlow;
with `config.data.synthetic` and no `tfrecord_dir` it first generates the synthetic refer-format dataset and
converts it with the real converter, into the workdir (once). Tests pass their own training stream.
"""

import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from fcnet_jax import image_ops
from fcnet_jax import tokenizer

Batch = Mapping[str, Any]
SYNTHETIC_RAW_DIR = "synthetic_raw"
SYNTHETIC_SHARDS_DIR = "synthetic_tfrecords"


def model_inputs(batch: Batch, dtype: Any) -> Tuple[jax.Array, jax.Array]:
  """uint8 letterboxed images → normalized `dtype` images on the device (the host ships uint8), and tokens."""
  return image_ops.normalize_images(batch["image"], dtype), batch["tokens"]


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
  if not os.path.exists(os.path.join(shards, records.SUMMARY_FILE)):
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

  def split_sizes(self) -> Mapping[str, Mapping[str, int]]:
    """{split: {"refs", "sentences", …}}; the shards must be of config.data.dataset / split_by."""
    if self._split_sizes is None:
      d = self.config.data
      info = self._pipeline().dataset_info(self.tfrecord_dir, dataset=d.dataset, split_by=d.split_by)
      self._split_sizes = info["splits"]
    return self._split_sizes

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
