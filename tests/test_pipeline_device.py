"""The fast training path (`device_letterbox=True`: host_decode + fcnet_jax.data.letterbox_on_device) against the
host path it replaces: the same stream and resume, images within 1 grey level, masks and every other key equal.

Shards are written here with `records.make_example` (JPEG, grayscale and CMYK JPEG, PNG images; sizes from 1×1 to
extreme aspect ratios), so the comparison covers every decode branch and the letterbox edge cases.
"""

import io
import os

import jax
import numpy as np
import PIL.Image
import PIL.ImageFilter
import pytest

from fcnet_jax import data as data_lib
from fcnet_jax import fileio
from input_pipeline import host_decode
from input_pipeline import import_tensorflow
from input_pipeline import pipeline
from input_pipeline import records
from input_pipeline import tfds_metadata

tf = import_tensorflow()
CANVAS = 200
# (height, width, format, PIL mode): every decode branch of host_decode, and aspect ratios up to 1:100.
IMAGES = [
  (150, 200, "JPEG", "RGB"),
  (200, 133, "JPEG", "L"),  # Grayscale JPEG: libjpeg-turbo expands it, as TensorFlow does.
  (90, 120, "JPEG", "CMYK"),  # CMYK: left to tf.io.decode_image.
  (37, 53, "PNG", "RGB"),  # A re-encoded record.
  (1, 1, "PNG", "RGB"),
  (2, 200, "JPEG", "RGB"),
  (200, 7, "JPEG", "RGB"),
  (64, 64, "JPEG", "RGB"),
  (120, 90, "JPEG", "RGB"),
  (33, 199, "JPEG", "RGB"),
]


def _encode(image: np.ndarray, fmt: str, mode: str) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).convert(mode).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
  return buffer.getvalue()


def _mask(rng: np.random.Generator, height: int, width: int, index: int) -> np.ndarray:
  if index == 0:
    return np.zeros((height, width), np.uint8)  # An empty mask: an empty crop.
  mask = np.zeros((height, width), np.uint8)
  for _ in range(3):  # A few blobs, some touching the border.
    top, left = rng.integers(0, height), rng.integers(0, width)
    mask[top : top + rng.integers(1, height + 1), left : left + rng.integers(1, width + 1)] = 1
  return mask


def _write(data_dir: str, format_version: int = 2, refs_per_shard: int = 4) -> None:
  rng = np.random.default_rng(0)
  examples = []
  for index, (height, width, fmt, mode) in enumerate(IMAGES * 2):
    noise = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = np.asarray(PIL.Image.fromarray(noise).filter(PIL.ImageFilter.GaussianBlur(2)))
    sentences = int(rng.integers(1, 4))
    tokens = np.zeros((sentences, records.STORED_CONTEXT_LENGTH), np.int64)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 49406, rng.integers(1, 400, (sentences, 3)), 49407
    examples.append(
      records.make_example(
        image=_encode(image, fmt, mode),
        height=height,
        width=width,
        mask=_mask(rng, height, width, index),
        ref_id=index,
        ann_id=index,
        image_id=index,
        category_id=1,
        bbox=[0, 0, width, height],
        sents=[f"s{k}" for k in range(sentences)],
        sent_ids=[10 * index + k for k in range(sentences)],
        tokens=tokens,
        reencoded=fmt == "PNG",
        format_version=format_version,
      )
    )
  shards = [examples[i : i + refs_per_shard] for i in range(0, len(examples), refs_per_shard)]
  for index, shard in enumerate(shards):
    path = os.path.join(data_dir, "train", records.shard_name("train", index, len(shards)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
      for example in shard:
        writer.write(example)
  summary = {"dataset": "refcoco", "split_by": "unc", "context_length": records.STORED_CONTEXT_LENGTH}
  if format_version > 1:
    summary["format_version"] = format_version
  summary["splits"] = {"train": {"refs": len(examples), "sentences": 0, "shards": len(shards)}}
  fileio.write_json(os.path.join(data_dir, records.SUMMARY_FILE), summary)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  out = str(tmp_path_factory.mktemp("device"))
  _write(out)
  return out


_LETTERBOX = {}


def _letterbox(batch, image_size):
  if image_size not in _LETTERBOX:
    _LETTERBOX[image_size] = jax.jit(lambda b: data_lib.letterbox_on_device(b, image_size))
  return jax.device_get(_LETTERBOX[image_size](batch))


def _pair(data_dir, steps, **kwargs):
  kwargs = {"context_length": 5, "batch_size": 4, "seed": 1, "shuffle_buffer": 8, "threads": 1, **kwargs}
  host = pipeline.train_iterator(data_dir, "train", **kwargs)
  device = pipeline.train_iterator(data_dir, "train", device_letterbox=True, canvas=CANVAS, **kwargs)
  return [(next(host), next(device)) for _ in range(steps)]


def _assert_same(host, device, image_size):
  assert "image" not in device and device["image_raw"].shape == (4, CANVAS * CANVAS * 3)
  out = _letterbox(device, image_size)
  assert sorted(out) == sorted(host)
  for key in host:
    if key != "image":
      np.testing.assert_array_equal(out[key], host[key], err_msg=key)
  difference = np.abs(out["image"].astype(np.int32) - host["image"])
  assert difference.max() <= 1, difference.max()
  assert (difference > 0).mean() < 1e-3  # Rare float rounding differences only.
  return host


@pytest.mark.parametrize("image_size", [32, 96, 480])  # Down- and upsampling of every image.
def test_device_letterbox_equals_host_path_over_an_epoch(data_dir, image_size):
  seen = []
  for host, device in _pair(data_dir, steps=5, image_size=image_size):  # 20 examples: one epoch of the 20 refs.
    seen += _assert_same(host, device, image_size)["ref_id"].tolist()
  assert sorted(seen) == list(range(2 * len(IMAGES)))


def test_device_letterbox_resumes_like_the_host_path(data_dir):
  uninterrupted = _pair(data_dir, steps=7, image_size=32, process_index=1, process_count=2)
  resumed = _pair(data_dir, steps=3, image_size=32, process_index=1, process_count=2, start_step=4)
  for (host, device), (_, expected) in zip(resumed, uninterrupted[4:]):
    for key in expected:
      np.testing.assert_array_equal(device[key], expected[key], err_msg=key)
    _assert_same(host, device, 32)


def test_resume_reads_shard_lengths_from_tfds_metadata(data_dir, tmp_path, monkeypatch):
  out = str(tmp_path / "copy")
  _write(out)
  info = pipeline.dataset_info(out)
  tfds_metadata.write(out, info)
  files = sorted(tf.io.gfile.glob(os.path.join(out, "train", "*.tfrecord")))
  assert tfds_metadata.shard_lengths(out, "train", len(files)) == [4, 4, 4, 4, 4]
  assert tfds_metadata.shard_lengths(out, "train", len(files) + 1) is None  # Does not fit the files: not used.
  expected = [d for _, d in _pair(data_dir, steps=6, image_size=32)][5]
  monkeypatch.setattr(pipeline.metadata, "count_records", lambda path: pytest.fail("scanned " + path))
  host, device = _pair(out, steps=1, image_size=32, start_step=5)[0]
  for key in expected:
    np.testing.assert_array_equal(device[key], expected[key], err_msg=key)


def test_decoder_equals_tensorflow_on_every_branch():
  rng = np.random.default_rng(3)
  image = np.asarray(PIL.Image.fromarray(rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)))
  for fmt, mode, extra in [
    ("JPEG", "RGB", {}),
    ("JPEG", "L", {}),
    ("JPEG", "CMYK", {}),
    ("JPEG", "RGB", {"progressive": True}),
    ("JPEG", "RGB", {"subsampling": 0}),
    ("PNG", "RGB", {}),
  ]:
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).convert(mode).save(buffer, format=fmt, **extra)
    encoded = buffer.getvalue()
    expected = tf.io.decode_image(encoded, channels=3, expand_animations=False).numpy()
    out = np.full(61 * 83 * 3, 7, np.uint8)
    host_decode.decode_image_into(encoded, out, 61, 83, reencoded=fmt == "PNG", ref_id=5)
    np.testing.assert_array_equal(out.reshape(61, 83, 3), expected, err_msg=f"{fmt} {mode} {extra}")
    with pytest.raises(ValueError, match=r"ref_id 5: image/height,width = \(61, 84\)"):
      host_decode.decode_image_into(encoded, np.zeros(61 * 84 * 3, np.uint8), 61, 84, fmt == "PNG", 5)


def test_mask_crop_round_trip():
  mask = np.zeros((7, 9), np.uint8)
  assert records.mask_box(mask) == (0, 0, 0, 0)
  crop, box = records.encode_mask_crop(mask)
  assert records.decode_mask_crop(crop, box).shape == (0, 0)
  mask[2:4, 3] = 1
  mask[5, 7] = 1
  crop, box = records.encode_mask_crop(mask)
  assert box == (2, 3, 4, 5)
  np.testing.assert_array_equal(records.decode_mask_crop(crop, box), mask[2:6, 3:8])
  with pytest.raises(ValueError, match="ref_id 9: mask/crop holds 20 pixels but mask/box is 4×4"):
    records.decode_mask_crop(crop, (2, 3, 4, 4), where="ref_id 9")


def test_clear_errors(data_dir, tmp_path):
  old = str(tmp_path / "format1")
  _write(old, format_version=1)
  kwargs = {"image_size": 32, "context_length": 5, "batch_size": 4, "seed": 0, "device_letterbox": True}
  with pytest.raises(ValueError, match=r"record format 1 .*fcnet-convert .*--out=NEW_DIR"):
    pipeline.train_iterator(old, "train", **kwargs)
  with pytest.raises(ValueError, match="reproduces the 'integer' letterbox only"):
    pipeline.train_iterator(data_dir, "train", letterbox_mode="cris", **kwargs)
  with pytest.raises(ValueError, match="larger than the canvas 100"):
    next(pipeline.train_iterator(data_dir, "train", canvas=100, shuffle_buffer=1, **kwargs))
  newer = str(tmp_path / "newer")
  _write(newer)
  summary = fileio.read_json(os.path.join(newer, records.SUMMARY_FILE))
  fileio.write_json(os.path.join(newer, records.SUMMARY_FILE), {**summary, "format_version": 3})
  with pytest.raises(ValueError, match="format_version 3, newer than this code reads"):
    pipeline.train_iterator(newer, "train", **kwargs)


def test_throughput_compares_both_paths_in_one_process(data_dir):
  from input_pipeline import throughput  # pylint: disable=g-import-not-at-top

  kwargs = {"image_size": 32, "context_length": 5, "batch_size": 4, "steps": 2, "warmup_steps": 1, "threads": 1}
  results = throughput.compare(1, data_dir=data_dir, split="train", shuffle_buffer=4, canvas=CANVAS, **kwargs)
  assert [len(results["old"]), len(results["new"])] == [1, 1]
  for result in results["old"] + results["new"]:
    assert result["examples_per_s"] > 0 and result["examples_per_cpu_s"] > 0 and result["cores"] == 1
  assert throughput.device_letterbox_seconds(batch_size=2, image_size=32, canvas=CANVAS, repeats=1) > 0


def test_data_source_letterboxes_on_the_device_where_it_reproduces_the_host(data_dir, tmp_path):
  """config.data.device_letterbox (on by default) is used for the integer letterbox on format 2 shards; a "cris"
  run or format 1 shards letterbox on the host, and the batches then hold `image` (no `image_raw`)."""
  from configs import tiny  # pylint: disable=g-import-not-at-top

  old = str(tmp_path / "format1")
  _write(old, format_version=1)

  def source(tfrecord_dir, **data):
    config = tiny.get_config()
    config.data.update(tfrecord_dir=tfrecord_dir, eval_canvas=CANVAS, shuffle_buffer=4, **data)
    config.update(batch_size=4)
    return data_lib.DataSource(config)

  assert tiny.get_config().data.device_letterbox is True
  cases = [(data_dir, {}, True), (data_dir, {"letterbox": "cris"}, False), (old, {}, False)]
  cases.append((data_dir, {"device_letterbox": False}, False))
  for tfrecord_dir, data, expected in cases:
    batch = next(iter(source(tfrecord_dir, **data).train(0)))
    assert source(tfrecord_dir, **data).device_letterbox() is expected, data
    assert ("image_raw" in batch, "image" in batch) == (expected, not expected), data
