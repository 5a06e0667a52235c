"""TensorFlow Datasets metadata of converted shards, so that `tfds.builder_from_directory(DIR)` reads them.

The converter writes `dataset_info.json` and `features.json` next to summary.json: the features of a record
(`records`) as TFDS feature connectors, the split names with their per-shard record counts and byte sizes, and the
datasets' citations. Users then get a TFDS builder over the same files:

  builder = tfds.builder_from_directory("/data/shards/refcoco_unc")
  builder.info.splits["val"].num_examples            # refs of the split
  ds = builder.as_dataset(split="val")               # decoded images (image/encoded) and masks (mask/encoded)

`tfds.folder_dataset.write_metadata`, TFDS's tool for existing TFRecords, finds shards only directly inside the
data folder and with `{SPLIT}` once in the file template; ours live in `<split>/<split>-…` (a layout the pipeline,
the converter's resume and the tests share), so this writes the same `tfds.core.DatasetInfo` that tool writes,
with the split's `filename_template` set to our layout. The pipeline reads the per-shard counts back
(`shard_lengths`) to resume without scanning every shard; docs/data.md says what else of TFDS it does and does not
use, and why.
"""

import logging
import os
import re
from typing import Any, Dict, List, Optional

from input_pipeline import import_tensorflow
from input_pipeline import metadata
from input_pipeline import records

INFO_FILE = "dataset_info.json"
FILENAME_TEMPLATE = "{SPLIT}/{SPLIT}-{SHARD_INDEX}-of-{NUM_SHARDS}.tfrecord"  # = records.shard_name, per split.

_COCO = (
  "@inproceedings{lin2014coco, title={Microsoft {COCO}: Common Objects in Context}, author={Lin, Tsung-Yi and "
  "Maire, Michael and Belongie, Serge and Hays, James and Perona, Pietro and Ramanan, Deva and Doll{\\'a}r, Piotr "
  "and Zitnick, C. Lawrence}, booktitle={ECCV}, year={2014}}"
)
_REFCOCO = (
  "@inproceedings{yu2016refcoco, title={Modeling Context in Referring Expressions}, author={Yu, Licheng and "
  "Poirson, Patrick and Yang, Shan and Berg, Alexander C. and Berg, Tamara L.}, booktitle={ECCV}, year={2016}}\n"
  "@inproceedings{kazemzadeh2014referitgame, title={{ReferItGame}: Referring to Objects in Photographs of Natural "
  "Scenes}, author={Kazemzadeh, Sahar and Ordonez, Vicente and Matten, Mark and Berg, Tamara L.}, "
  "booktitle={EMNLP}, year={2014}}"
)
_REFCOCOG = (
  "@inproceedings{mao2016refcocog, title={Generation and Comprehension of Unambiguous Object Descriptions}, "
  "author={Mao, Junhua and Huang, Jonathan and Toshev, Alexander and Camburu, Oana and Yuille, Alan and Murphy, "
  "Kevin}, booktitle={CVPR}, year={2016}}\n"
  "@inproceedings{nagaraja2016refcocog_umd, title={Modeling Context Between Objects for Referring Expression "
  "Understanding}, author={Nagaraja, Varun K. and Morariu, Vlad I. and Davis, Larry S.}, booktitle={ECCV}, "
  "year={2016}}"
)
CITATIONS = {"refcoco": _REFCOCO, "refcoco+": _REFCOCO, "refcocog": _REFCOCOG}


def _tfds():
  import_tensorflow()  # Quiet and off the GPU before TFDS imports TensorFlow.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds


def features(format_version: int = records.FORMAT_VERSION):
  """The records' features (`records.feature_spec`) as a TFDS FeaturesDict; nested keys join with "/"."""
  tfds = _tfds()
  tf = import_tensorflow()
  scalar = lambda dtype: tfds.features.Tensor(shape=(), dtype=dtype)
  mask = {"encoded": tfds.features.Image(shape=(None, None, 1), encoding_format="png")}
  if format_version >= 2:
    mask["crop"] = scalar(tf.string)
    mask["box"] = tfds.features.Tensor(shape=(4,), dtype=tf.int64)
  return tfds.features.FeaturesDict(
    {
      "image": {
        "encoded": tfds.features.Image(shape=(None, None, 3)),
        "height": scalar(tf.int64),
        "width": scalar(tf.int64),
        "reencoded": scalar(tf.int64),
      },
      "mask": mask,
      "ref_id": scalar(tf.int64),
      "ann_id": scalar(tf.int64),
      "image_id": scalar(tf.int64),
      "category_id": scalar(tf.int64),
      "bbox": tfds.features.Tensor(shape=(4,), dtype=tf.float32),
      "sentences": {
        "sent": tfds.features.Tensor(shape=(None,), dtype=tf.string),
        "sent_id": tfds.features.Tensor(shape=(None,), dtype=tf.int64),
        "tokens": tfds.features.Tensor(shape=(None, records.STORED_CONTEXT_LENGTH), dtype=tf.int64),
      },
    }
  )


def dataset_name(dataset: str, split_by: str) -> str:
  """A valid TFDS name: "refcoco+", "unc" → "refcoco_plus_unc"."""
  return re.sub(r"[^a-z0-9_]", "_", f"{dataset.replace('+', '_plus')}_{split_by}".lower())


def write(out_dir: str, summary: Dict[str, Any]) -> None:
  """Writes the TFDS metadata of every split of `summary` (the converter's, already checked against the shards).

  Per-shard counts come from the shards' record headers (`metadata.count_records`), so the metadata describes the
  files on disk, also for splits converted by earlier runs.
  """
  tfds = _tfds()
  from tensorflow_datasets.core import dataset_info  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import naming  # pylint: disable=g-import-not-at-top

  tf = import_tensorflow()
  name = dataset_name(summary["dataset"], summary["split_by"])
  split_infos = []
  for split, entry in sorted(summary["splits"].items()):
    files = metadata.split_files(out_dir, split, entry)
    lengths = [metadata.count_records(path) for path in files]
    template = naming.ShardedFileTemplate(
      data_dir=out_dir, template=FILENAME_TEMPLATE, dataset_name=name, split=split, filetype_suffix="tfrecord"
    )
    split_infos.append(
      tfds.core.SplitInfo(
        name=split,
        shard_lengths=lengths,
        num_bytes=sum(tf.io.gfile.stat(path).length for path in files),
        filename_template=template,
      )
    )
  info = dataset_info.DatasetInfo(
    builder=dataset_info.DatasetIdentity(
      name=name, version=tfds.core.Version(f"{records.FORMAT_VERSION}.0.0"), data_dir=out_dir, module_name=""
    ),
    features=features(int(summary.get("format_version", 1))),
    description=(
      f"{summary['dataset']} ({summary['split_by']} splits) converted by fcnet_jax's fcnet-convert, record format "
      f"{summary.get('format_version', 1)}: one tf.train.Example per ref (image, referred mask, every sentence with "
      "its 77 CLIP token ids). summary.json holds the sentence counts."
    ),
    homepage="https://github.com/lichengunc/refer",
    citation="\n".join([CITATIONS.get(summary["dataset"], ""), _COCO]).strip(),
  )
  info.set_file_format("tfrecord")
  info.set_splits(tfds.core.SplitDict(split_infos))
  info.write_to_directory(out_dir)


def shard_lengths(data_dir: str, split: str, num_files: int) -> Optional[List[int]]:
  """Records per shard of `split` from the TFDS metadata; None when there is none or it does not fit the files."""
  tf = import_tensorflow()
  if not tf.io.gfile.exists(os.path.join(data_dir, INFO_FILE)):
    return None
  try:
    splits = _tfds().builder_from_directory(data_dir).info.splits
    lengths = list(splits[split].shard_lengths) if split in splits else None
  except Exception as e:  # pylint: disable=broad-except  (any unreadable metadata: count the records instead)
    logging.warning("TFDS metadata of %s unreadable (%s); counting records instead", data_dir, e)
    return None
  return lengths if lengths is not None and len(lengths) == num_files else None
