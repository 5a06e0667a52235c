"""What the input pipeline knows before reading a record: summary.json, the shard files, argument checks.

The converter's `<data_dir>/summary.json` (`input_pipeline.records`) names the dataset, its split_by, the stored
token length and per split the ref / sentence / shard counts; the pipeline checks the shards on disk and the
configuration against it, so that a wrong `--data_dir` fails before training with an error naming the file.
"""

import hashlib
import json
import os
import struct
from typing import Any, Dict, List, Optional

from input_pipeline import import_tensorflow
from input_pipeline import records

tf = import_tensorflow()


def dataset_info(data_dir: str, dataset: Optional[str] = None, split_by: Optional[str] = None) -> Dict[str, Any]:
  """Reads `<data_dir>/summary.json` written by the converter, and checks it against the configuration.

  Args:
    data_dir: the converter's output folder.
    dataset: when given, the dataset the shards must hold (config.data.dataset, e.g. "refcoco+").
    split_by: when given, the split_by the shards must have been converted with (config.data.split_by).

  Returns:
    The summary: {"dataset", "split_by", "context_length", "splits": {split: {"refs", "sentences",
    "shards"}}}.
  """
  path = os.path.join(data_dir, records.SUMMARY_FILE)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
      f"{path} not found: the data directory must be the output folder of `fcnet-convert` "
      "(python -m input_pipeline.convert)."
    )
  with tf.io.gfile.GFile(path, "r") as f:
    try:
      info = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from None
  for key in ("context_length", "splits"):
    if key not in info:
      raise ValueError(f"{path} has no field {key!r}.")
  if format_version(info) > records.FORMAT_VERSION:
    raise ValueError(
      f"{path} has format_version {format_version(info)}, newer than this code reads ({records.FORMAT_VERSION}): "
      "update fcnet_jax, or convert with this version's fcnet-convert."
    )
  wanted = {"dataset": dataset, "split_by": split_by}
  wrong = {key: value for key, value in wanted.items() if value is not None and info.get(key) != value}
  if wrong:
    found = ", ".join(f"{key}={info.get(key)!r}" for key in wanted)
    asked = ", ".join(f"{key}={value!r}" for key, value in wanted.items() if value is not None)
    raise ValueError(
      f"{path} holds {found}, but the configuration asks for {asked} (config.data.dataset / "
      "config.data.split_by): point the data directory at shards converted with those, or fix the "
      "configuration."
    )
  return info


def format_version(info: Dict[str, Any]) -> int:
  """The record format of the shards (summary.json `format_version`; absent in format 1)."""
  return int(info.get("format_version", 1))


def check_device_letterbox(info: Dict[str, Any], data_dir: str, letterbox_mode: str) -> None:
  """The device letterbox needs format 2's mask crops and letterboxes like the host's "integer" mode only."""
  if letterbox_mode != "integer":
    raise ValueError(
      f"the device letterbox reproduces the 'integer' letterbox only; config.data.letterbox={letterbox_mode!r} "
      "letterboxes on the host (turn the device letterbox off)"
    )
  if format_version(info) < 2:
    raise ValueError(
      f"{data_dir} holds record format {format_version(info)} shards (summary.json has no format_version 2): "
      "the device letterbox needs format 2's mask crops. Convert again into a new folder "
      "(fcnet-convert ... --out=NEW_DIR) and point config.data.tfrecord_dir at it, or letterbox on the host."
    )


def split_info(info: Dict[str, Any], data_dir: str, split: str) -> Dict[str, Any]:
  """The summary entry of `split`; an error naming summary.json when it is absent or incomplete."""
  splits = info["splits"]
  if split not in splits:
    raise ValueError(f"split {split!r} is not in {data_dir}/{records.SUMMARY_FILE}; it has {sorted(splits)}.")
  for key in ("refs", "sentences"):
    if key not in splits[split]:
      raise ValueError(f"{data_dir}/{records.SUMMARY_FILE}: splits[{split!r}] has no field {key!r}.")
  return splits[split]


def split_files(data_dir: str, split: str, info_of_split: Dict[str, Any]) -> List[str]:
  """The shard files of a split in their fixed (sorted) order, checked against the summary's shard count."""
  pattern = os.path.join(data_dir, split, f"{split}-*-of-*.tfrecord")
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise FileNotFoundError(f"no shards match {pattern}.")
  expected = info_of_split.get("shards")
  if expected is not None and expected != len(files):
    raise ValueError(
      f"{data_dir}/{records.SUMMARY_FILE} says split {split!r} has {expected} shards, but {len(files)} match {pattern}."
    )
  return files


def count_records(path: str) -> int:
  """Counts the records of a TFRecord file from its length headers, without reading the payloads.

  TFRecord framing: uint64 length, uint32 CRC of the length, `length` bytes, uint32 CRC of the data.
  """
  size = tf.io.gfile.stat(path).length
  count, position = 0, 0
  with tf.io.gfile.GFile(path, "rb") as f:
    while position < size:
      f.seek(position)
      header = f.read(8)
      if len(header) < 8:
        break
      position += 8 + 4 + struct.unpack("<Q", header)[0] + 4
      count += 1
  if position != size:
    raise ValueError(f"{path} is truncated or not a TFRecord file.")
  return count


def mix_seed(*values: Any) -> int:
  """A stable non-negative int63 hash of `values` (Python's `hash` is salted per process)."""
  digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") & (2**63 - 1)


def check_process(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f"need 0 <= process_index < process_count; got process_index={process_index}, process_count={process_count}."
    )


def check_sizes(image_size: int, context_length: int, batch_size: int, stored_length: int) -> None:
  if image_size < 1:
    raise ValueError(f"image_size must be positive; got {image_size}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  if not 2 <= context_length <= stored_length:
    raise ValueError(
      f"context_length must be in [2, {stored_length}] (the stored token length of summary.json); got {context_length}."
    )
