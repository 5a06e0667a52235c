"""Helpers and fixtures for the refer-format tests (test_synthetic.py, test_convert.py).

Import the fixtures into a test module (`from fixtures_refer import synthetic_root`) to use them there; a
module-scoped fixture then generates its dataset once per test module.
"""

import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image
from pycocotools.coco import COCO
import pytest

from input_pipeline import import_tensorflow
from input_pipeline import records
from input_pipeline import synthetic

# Small enough for a fast module set-up, large enough for several shards and every annotation kind.
SMALL = {"seed": 0, "num_train_images": 30, "num_eval_images": 8}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> str:
  """A small synthetic refcoco/unc dataset: `<root>/refcoco/...`, `<root>/images/train2014/`."""
  root = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.generate(root, **SMALL)
  return root


def load_refs(root: str, dataset: str = "refcoco", split_by: str = "unc") -> List[dict]:
  with open(os.path.join(root, dataset, f"refs({split_by}).p"), "rb") as f:
    return pickle.load(f)


def load_instances(root: str, dataset: str = "refcoco") -> dict:
  with open(os.path.join(root, dataset, "instances.json")) as f:
    return json.load(f)


def coco_masks(root: str, dataset: str = "refcoco") -> Dict[int, np.ndarray]:
  """ann_id -> H×W uint8 mask through the official COCO API (`COCO.annToMask`), the independent reference."""
  with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress.
    coco = COCO(os.path.join(root, dataset, "instances.json"))
  return {ann_id: coco.annToMask(ann) for ann_id, ann in coco.anns.items()}


def read_records(paths: Sequence[str]) -> List[dict]:
  """Every record of the shards, parsed with records.feature_spec() into NumPy values.

  image/reencoded reads -1 when a record lacks it (records.feature_spec() would read 0), so tests see that it
  was written.
  """
  tf = import_tensorflow()
  spec = records.feature_spec()
  spec[records.REENCODED_FEATURE] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
  out = []
  for path in paths:
    for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
      example = tf.io.parse_single_example(serialized, spec)
      record = {}
      for key, value in example.items():
        value = tf.sparse.to_dense(value) if isinstance(value, tf.SparseTensor) else value
        record[key] = value.numpy()
      out.append(record)
  return out


def shard_paths(split_dir: str) -> List[str]:
  return sorted(os.path.join(split_dir, n) for n in os.listdir(split_dir) if n.endswith(".tfrecord"))


def decode_png(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as image:
    assert image.mode == "L", image.mode
    return np.asarray(image)


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
  """Runs `python -m <module> <args>` from the repository root, as a user would; text stdout and stderr."""
  env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
  )
