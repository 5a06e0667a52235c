"""Tests of the converter (input_pipeline.convert, .refer, .shards) on the synthetic refer dataset.

References are independent of the converter: ref counts from the refs pickle, masks from the official COCO API
(`COCO.annToMask`), image bytes from the files, token ids from `fcnet_jax.tokenizer.tokenize`, decoded images
from TensorFlow / PIL.
"""

import io
import json
import math
import os
import re
import shutil

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import pytest

from fcnet_jax import tokenizer
from fixtures_refer import coco_masks
from fixtures_refer import decode_png
from fixtures_refer import load_instances
from fixtures_refer import load_refs
from fixtures_refer import read_records
from fixtures_refer import run_module
from fixtures_refer import shard_paths
from fixtures_refer import synthetic_root  # noqa: F401  (a pytest fixture, used by its name)
from input_pipeline import convert
from input_pipeline import import_tensorflow
from input_pipeline import records
from input_pipeline import refer
from input_pipeline import synthetic

tf = import_tensorflow()

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SHARD_SIZE = 32
ALL_SPLITS = ("train", "val", "testA", "testB")


def _convert(root, out, images=None, **kwargs):
  kwargs.setdefault("num_workers", 1)
  kwargs.setdefault("shard_size", SHARD_SIZE)
  return convert.convert(root, images or os.path.join(root, "images"), "refcoco", "unc", str(out), **kwargs)


@pytest.fixture(scope="module")
def converted(synthetic_root, tmp_path_factory):
  out = tmp_path_factory.mktemp("converted")
  summary = _convert(synthetic_root, out)
  return str(out), summary


@pytest.fixture
def images_copy(synthetic_root, tmp_path):
  """A private copy of the image folder (the JPEGs themselves, without the train2014/ level)."""
  target = str(tmp_path / "train2014_copy")
  shutil.copytree(os.path.join(synthetic_root, "images", "train2014"), target)
  return target


def _refs_of(root, split):
  return [r for r in load_refs(root) if r["split"] == split]


def _val_images(root, mode=None):
  """instances.json entries of the val images, optionally only those whose JPEG has the PIL `mode`."""
  images = {i["id"]: i for i in load_instances(root)["images"]}
  ids = sorted({r["image_id"] for r in _refs_of(root, "val")})
  out = []
  for image_id in ids:
    with Image.open(os.path.join(root, "images", "train2014", images[image_id]["file_name"])) as image:
      if mode is None or image.mode == mode:
        out.append(images[image_id])
  return out


def _refs_of_image(root, image_id, split="val"):
  return [r for r in _refs_of(root, split) if r["image_id"] == image_id]


def test_summary_counts_match_refs(synthetic_root, converted):
  out, summary = converted
  with open(os.path.join(out, records.SUMMARY_FILE)) as f:
    assert json.load(f) == summary
  assert (summary["dataset"], summary["split_by"], summary["context_length"]) == ("refcoco", "unc", 77)
  assert sorted(summary["splits"]) == sorted(ALL_SPLITS)
  for split in ALL_SPLITS:
    refs = _refs_of(synthetic_root, split)
    entry = summary["splits"][split]
    assert entry == {
      "refs": len(refs),
      "sentences": sum(len(r["sentences"]) for r in refs),
      "shards": math.ceil(len(refs) / SHARD_SIZE),
      "skipped_refs": 0,
      "reencoded_refs": 0,
    }
    paths = shard_paths(os.path.join(out, split))
    assert [os.path.basename(p) for p in paths] == [
      records.shard_name(split, i, entry["shards"]) for i in range(entry["shards"])
    ]
    assert sum(1 for p in paths for _ in tf.data.TFRecordDataset(p)) == len(refs)
  assert not [n for _, _, files in os.walk(out) for n in files if n.startswith(".")]  # No temporary files left.


def test_records_equal_their_sources(synthetic_root, converted):
  out, _ = converted
  masks = coco_masks(synthetic_root)
  instances = load_instances(synthetic_root)
  anns = {a["id"]: a for a in instances["annotations"]}
  images = {i["id"]: i for i in instances["images"]}
  refs = {r["ref_id"]: r for r in load_refs(synthetic_root)}
  kinds = set()
  for split in ALL_SPLITS:
    written = read_records(shard_paths(os.path.join(out, split)))
    assert sorted(int(r["ref_id"]) for r in written) == sorted(i for i, r in refs.items() if r["split"] == split)
    for record in written:
      ref = refs[int(record["ref_id"])]
      ann, image = anns[ref["ann_id"]], images[ref["image_id"]]
      kinds.add("polygons" if isinstance(ann["segmentation"], list) else type(ann["segmentation"]["counts"]))
      assert (record["ann_id"], record["image_id"], record["category_id"]) == (
        ref["ann_id"],
        ref["image_id"],
        ref["category_id"],
      )
      assert (record["image/height"], record["image/width"]) == (image["height"], image["width"])
      np.testing.assert_array_equal(record["bbox"], np.float32(ann["bbox"]))
      with open(os.path.join(synthetic_root, "images", "train2014", image["file_name"]), "rb") as f:
        assert record["image/encoded"] == f.read()
      assert record["image/reencoded"] == 0
      mask = decode_png(record["mask/encoded"])
      assert mask.dtype == np.uint8 and mask.shape == (image["height"], image["width"])
      np.testing.assert_array_equal(mask, masks[ref["ann_id"]])  # Bit for bit, 0/1.
      top, left, height, width = box = record["mask/box"].tolist()  # Format 2: the crop, placed back.
      placed = np.zeros_like(mask)
      placed[top : top + height, left : left + width] = records.decode_mask_crop(record["mask/crop"], box)
      np.testing.assert_array_equal(placed, mask)
      assert box == list(records.mask_box(mask))
      sents = [s["sent"] for s in ref["sentences"]]
      assert [s.decode() for s in record["sentences/sent"]] == sents
      assert record["sentences/sent_id"].tolist() == [s["sent_id"] for s in ref["sentences"]]
      np.testing.assert_array_equal(record["sentences/tokens"].reshape(len(sents), 77), tokenizer.tokenize(sents, 77))
  assert kinds == {"polygons", str, list}  # Polygon lists, compressed and uncompressed RLE all went through.


def test_tfds_builder_from_directory_reads_the_shards(converted):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  out, summary = converted
  assert summary["format_version"] == records.FORMAT_VERSION == 2
  builder = tfds.builder_from_directory(out)
  assert builder.info.name == "refcoco_unc" and sorted(builder.info.splits) == sorted(ALL_SPLITS)
  assert "Modeling Context in Referring Expressions" in builder.info.citation and "COCO" in builder.info.citation
  for split in ALL_SPLITS:
    paths = shard_paths(os.path.join(out, split))
    assert builder.info.splits[split].num_examples == summary["splits"][split]["refs"]
    assert builder.info.splits[split].shard_lengths == [len(read_records([p])) for p in paths]
  written = {int(r["ref_id"]): r for r in read_records(shard_paths(os.path.join(out, "val")))}
  examples = list(builder.as_dataset(split="val").as_numpy_iterator())
  assert sorted(int(e["ref_id"]) for e in examples) == sorted(written)  # Each ref once.
  for example in examples[:3]:  # Features decode as TFDS connectors: images and masks to arrays.
    record = written[int(example["ref_id"])]
    image = tf.io.decode_image(record["image/encoded"], channels=3, expand_animations=False).numpy()
    np.testing.assert_array_equal(example["image"]["encoded"], image)
    np.testing.assert_array_equal(example["mask"]["encoded"][..., 0], decode_png(record["mask/encoded"]))
    np.testing.assert_array_equal(example["sentences"]["tokens"].reshape(-1), record["sentences/tokens"])
    assert example["mask"]["crop"] == record["mask/crop"]


def test_records_decode_in_the_pipeline(converted):
  out, _ = converted
  for record in read_records(shard_paths(os.path.join(out, "val"))):
    image = tf.io.decode_image(record["image/encoded"], channels=3, expand_animations=False)
    mask = tf.io.decode_png(record["mask/encoded"], channels=1)
    assert image.shape == (record["image/height"], record["image/width"], 3)
    assert mask.shape == (record["image/height"], record["image/width"], 1)
    assert set(np.unique(mask.numpy())) <= {0, 1}


def test_grayscale_cmyk_exif_and_undecodable_formats(synthetic_root, images_copy, tmp_path):
  gray = _val_images(synthetic_root, "L")
  colour = _val_images(synthetic_root, "RGB")
  assert gray and len(colour) >= 3
  cmyk, rotated, tiff = colour[:3]
  for info, save in (
    (cmyk, lambda im, p: im.convert("CMYK").save(p, "JPEG", quality=95)),
    (rotated, lambda im, p: im.save(p, "JPEG", quality=95, exif=_orientation(6))),
    (tiff, lambda im, p: im.save(p, "TIFF")),
  ):  # TIFF under a .jpg name: TF cannot decode it.
    path = os.path.join(images_copy, info["file_name"])
    with Image.open(path) as image:
      image = image.convert("RGB")
    save(image, path)
  assert rotated["height"] != rotated["width"]  # Otherwise an applied rotation would go unnoticed.

  summary = _convert(synthetic_root, tmp_path / "out", images=images_copy, splits=["val"])
  written = {int(r["image_id"]): r for r in read_records(shard_paths(str(tmp_path / "out" / "val")))}
  for info in [cmyk, rotated, tiff] + gray:
    record = written[info["id"]]
    with open(os.path.join(images_copy, info["file_name"]), "rb") as f:
      original = f.read()
    decoded = tf.io.decode_image(record["image/encoded"], channels=3, expand_animations=False).numpy()
    assert decoded.shape == (info["height"], info["width"], 3)
    if info is tiff:
      assert record["image/reencoded"] == 1 and record["image/encoded"].startswith(b"\x89PNG")
      with Image.open(io.BytesIO(original)) as image:
        np.testing.assert_array_equal(decoded, np.asarray(image.convert("RGB")))  # Lossless.
    else:
      assert record["image/reencoded"] == 0 and record["image/encoded"] == original
    if info is cmyk:  # TF's CMYK conversion agrees with PIL's (up to JPEG decoder differences).
      with Image.open(io.BytesIO(original)) as image:
        assert image.mode == "CMYK"
        reference = np.asarray(image.convert("RGB")).astype(int)
      assert np.abs(decoded.astype(int) - reference).mean() < 2
  assert summary["splits"]["val"]["reencoded_refs"] == len(_refs_of_image(synthetic_root, tiff["id"]))


def _orientation(value):
  exif = Image.Exif()
  exif[0x0112] = value
  return exif.tobytes()


def test_truncated_and_missing_images_fail_naming_the_file(synthetic_root, images_copy, tmp_path):
  first, second = _val_images(synthetic_root)[:2]
  truncated = os.path.join(images_copy, first["file_name"])
  with open(truncated, "rb") as f:
    data = f.read()
  with open(truncated, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(refer.BadImageError, match=f"{re.escape(truncated)} is corrupt or truncated"):
    _convert(synthetic_root, tmp_path / "a", images=images_copy, splits=["val"])
  assert not os.path.exists(tmp_path / "a" / records.SUMMARY_FILE)
  assert not [n for n in os.listdir(tmp_path / "a" / "val") if "val-00000" in n]  # No shard, no temporary file.

  with open(truncated, "wb") as f:
    f.write(data)
  missing = os.path.join(images_copy, second["file_name"])
  os.remove(missing)
  with pytest.raises(refer.BadImageError, match=f"{re.escape(missing)} is missing"):
    _convert(synthetic_root, tmp_path / "b", images=images_copy, splits=["val"])


def test_skip_bad_images_skips_and_counts(synthetic_root, images_copy, tmp_path):
  first, second = _val_images(synthetic_root)[:2]
  with open(os.path.join(images_copy, first["file_name"]), "r+b") as f:
    f.truncate(300)
  os.remove(os.path.join(images_copy, second["file_name"]))
  bad_refs = {r["ref_id"] for info in (first, second) for r in _refs_of_image(synthetic_root, info["id"])}
  val_refs = _refs_of(synthetic_root, "val")
  out = tmp_path / "out"
  summary = _convert(synthetic_root, out, images=images_copy, splits=["val"], skip_bad_images=True)
  entry = summary["splits"]["val"]
  assert entry["skipped_refs"] == len(bad_refs) > 0
  assert entry["refs"] == len(val_refs) - len(bad_refs)
  assert entry["sentences"] == sum(len(r["sentences"]) for r in val_refs if r["ref_id"] not in bad_refs)
  written = {int(r["ref_id"]) for r in read_records(shard_paths(str(out / "val")))}
  assert written == {r["ref_id"] for r in val_refs} - bad_refs
  # Resuming keeps the count; resuming without the flag refuses the incomplete shards.
  assert _convert(synthetic_root, out, images=images_copy, splits=["val"], skip_bad_images=True) == summary
  with pytest.raises(RuntimeError, match="--skip_bad_images"):
    _convert(synthetic_root, out, images=images_copy, splits=["val"])


def test_wrong_image_size_is_an_error(synthetic_root, images_copy, tmp_path):
  info = next(i for i in _val_images(synthetic_root, "RGB") if i["height"] != i["width"])
  path = os.path.join(images_copy, info["file_name"])
  with Image.open(path) as image:
    image.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG")  # What applying EXIF rotation would do.
  with pytest.raises(refer.BadImageError, match=f"{re.escape(path)} decodes to {info['width']}×{info['height']}"):
    _convert(synthetic_root, tmp_path / "out", images=images_copy, splits=["val"])


def test_bad_arguments_give_clear_errors(synthetic_root, tmp_path):
  images = os.path.join(synthetic_root, "images")
  with pytest.raises(ValueError, match="'refclef'.*known: refcoco/unc"):
    convert.convert(synthetic_root, images, "refclef", "unc", str(tmp_path))
  with pytest.raises(ValueError, match="--split_by='umd'"):
    convert.convert(synthetic_root, images, "refcoco", "umd", str(tmp_path))
  with pytest.raises(ValueError, match=r"unknown split\(s\) \['testC'\].*refcoco/unc"):
    _convert(synthetic_root, tmp_path, splits=["val", "testC"])
  with pytest.raises(FileNotFoundError, match=r"refcocog/refs\(umd\)\.p not found"):
    convert.convert(synthetic_root, images, "refcocog", "umd", str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"refcoco/refs\(google\)\.p not found"):
    convert.convert(synthetic_root, images, "refcoco", "google", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="--coco_images=.*nowhere is not a directory"):
    convert.convert(synthetic_root, str(tmp_path / "nowhere"), "refcoco", "unc", str(tmp_path))
  with pytest.raises(ValueError, match="--shard_size must be >= 1"):
    _convert(synthetic_root, tmp_path, splits=["val"], shard_size=0)
  assert not os.path.exists(tmp_path / records.SUMMARY_FILE)


def test_interrupted_conversion_resumes(synthetic_root, tmp_path):
  out = tmp_path / "out"
  first = _convert(synthetic_root, out, splits=["train"], shard_size=16)
  paths = shard_paths(str(out / "train"))
  assert len(paths) >= 5
  contents = {p: open(p, "rb").read() for p in paths}
  stats = {p: os.stat(p) for p in paths}
  # An interrupted run: one shard missing, no summary, a corrupt partial shard left behind (the temporary name
  # fileio.atomic_output gives it).
  lost = paths[2]
  os.remove(lost)
  os.remove(out / records.SUMMARY_FILE)
  partial = os.path.join(os.path.dirname(lost), f".{os.path.basename(lost)}.tmp-0123abcd")
  with open(partial, "wb") as f:
    f.write(b"\x00garbage" * 100)

  second = _convert(synthetic_root, out, splits=["train"], shard_size=16)
  assert second == first
  assert shard_paths(str(out / "train")) == paths and not os.path.exists(partial)
  for path in paths:
    assert open(path, "rb").read() == contents[path]  # Deterministic: the rewritten shard is byte-equal.
    kept = (os.stat(path).st_ino, os.stat(path).st_mtime_ns) == (stats[path].st_ino, stats[path].st_mtime_ns)
    assert kept == (path != lost), path  # Only the lost shard was written again.
  # Another shard size would mix two layouts: refused, naming the flag.
  with pytest.raises(ValueError, match="--shard_size"):
    _convert(synthetic_root, out, splits=["train"], shard_size=8)


def test_splits_converted_separately_merge_into_one_summary(synthetic_root, tmp_path):
  out = tmp_path / "out"
  _convert(synthetic_root, out, splits=["val"])
  summary = _convert(synthetic_root, out, splits=["testA"])
  assert sorted(summary["splits"]) == ["testA", "val"]
  for split in ("val", "testA"):
    assert summary["splits"][split]["refs"] == len(_refs_of(synthetic_root, split))
  # A summary of another dataset/split_by in --out is refused before any work.
  google_root = tmp_path / "refer"
  os.makedirs(google_root / "refcoco")
  shutil.copy(os.path.join(synthetic_root, "refcoco", "instances.json"), google_root / "refcoco")
  shutil.copy(os.path.join(synthetic_root, "refcoco", "refs(unc).p"), google_root / "refcoco" / "refs(google).p")
  with pytest.raises(ValueError, match=f"{re.escape(str(out / records.SUMMARY_FILE))} has split_by='unc'"):
    convert.convert(
      str(google_root), os.path.join(synthetic_root, "images"), "refcoco", "google", str(out), splits=["val"]
    )


def test_a_folder_of_format_1_is_refused_with_the_upgrade(synthetic_root, tmp_path):
  out = tmp_path / "old"
  os.makedirs(out)
  old = {"dataset": "refcoco", "split_by": "unc", "context_length": 77, "splits": {"val": {"refs": 1}}}
  (out / records.SUMMARY_FILE).write_text(json.dumps(old))
  with pytest.raises(ValueError, match=r"record format 1; this converter writes format 2 .*new --out folder"):
    _convert(synthetic_root, out, splits=["testB"])
  assert json.loads((out / records.SUMMARY_FILE).read_text()) == old


def test_every_dataset_and_split_by(tmp_path):
  root = str(tmp_path / "refer")
  for (dataset, split_by), splits in refer.SPLITS.items():
    synthetic.generate(root, num_train_images=2, num_eval_images=1, dataset=dataset, split_by=split_by)
    out = str(tmp_path / f"{dataset}_{split_by}")
    summary = convert.convert(root, os.path.join(root, "images", "train2014"), dataset, split_by, out, num_workers=1)
    refs = load_refs(root, dataset, split_by)
    assert tuple(summary["splits"]) == splits
    for split in splits:
      assert summary["splits"][split]["refs"] == sum(r["split"] == split for r in refs) > 0
  synthetic.generate(
    root, num_train_images=2, num_eval_images=1, dataset="refcoco", split_by="google", splits=("train", "val")
  )
  with pytest.raises(ValueError, match=r"refs\(google\)\.p has no refs of split\(s\) \['test'\]"):
    convert.convert(root, os.path.join(root, "images"), "refcoco", "google", str(tmp_path / "x"), splits=["test"])


def test_a_spawned_worker_writes_the_same_shards(synthetic_root, tmp_path):
  # One shard, so one spawned process (each pays TensorFlow's import); the same as converting in-process.
  inline = _convert(synthetic_root, tmp_path / "inline", splits=["val"], shard_size=128)
  spawned = _convert(synthetic_root, tmp_path / "spawned", splits=["val"], shard_size=128, num_workers=2)
  assert spawned == inline and inline["splits"]["val"]["shards"] == 1
  name = records.shard_name("val", 0, 1)
  with open(tmp_path / "inline" / "val" / name, "rb") as f, open(tmp_path / "spawned" / "val" / name, "rb") as g:
    assert f.read() == g.read()


def test_command_line(synthetic_root, tmp_path):
  usage = run_module("input_pipeline.convert", "--help").stdout  # absl's --help exits with status 1.
  assert "pickle" in usage and "TFDS" in usage and "--shard_size" in usage, usage
  assert "pickle" in convert.__doc__ and "TFDS builder" in convert.__doc__
  out = tmp_path / "out"
  done = run_module(
    "input_pipeline.convert",
    f"--refer_root={synthetic_root}",
    f"--coco_images={synthetic_root}/images",
    "--dataset=refcoco",
    "--split_by=unc",
    f"--out={out}",
    "--splits=val,testB",
    "--num_workers=1",
    "--shard_size=64",
  )
  assert done.returncode == 0, done.stderr
  assert "Traceback" not in done.stderr
  summary = json.loads(done.stdout)
  assert summary == json.loads((out / records.SUMMARY_FILE).read_text())
  assert sorted(summary["splits"]) == ["testB", "val"]
  assert summary["splits"]["val"]["shards"] == math.ceil(len(_refs_of(synthetic_root, "val")) / 64)
  missing = run_module("input_pipeline.convert", f"--refer_root={synthetic_root}")  # Required flags absent.
  assert missing.returncode != 0 and "--coco_images" in missing.stderr and "Traceback" not in missing.stderr


# What TensorFlow's C++ runtime prints at import on CPUs where its oneDNN kernels apply, before absl's logging is
# initialised and so whatever TF_CPP_MIN_LOG_LEVEL says (TensorFlow 2.21); not ours to silence.
TENSORFLOW_BANNER = re.compile(
  r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
  r"|I\d{4} [\d:.]+ +\d+ port\.cc:\d+\] oneDNN custom operations are on\."
)


def test_command_line_corrupt_image_is_one_error_line(synthetic_root, images_copy, tmp_path):
  # Spawned workers (two shards of one image's refs) decode the image: neither they nor the main process may
  # print a traceback or libjpeg's own messages; the one line names the file and the ref.
  info = next(i for i in _val_images(synthetic_root) if len(_refs_of_image(synthetic_root, i["id"])) >= 2)
  path = os.path.join(images_copy, info["file_name"])
  with open(path, "r+b") as f:
    f.truncate(400)
  done = run_module(
    "input_pipeline.convert",
    f"--refer_root={synthetic_root}",
    f"--coco_images={images_copy}",
    "--dataset=refcoco",
    "--split_by=unc",
    f"--out={tmp_path / 'out'}",
    "--splits=val",
    "--num_workers=2",
    "--shard_size=1",
  )
  assert done.returncode != 0
  lines = [line for line in done.stderr.strip().splitlines() if not TENSORFLOW_BANNER.match(line)]
  assert len(lines) == 1, done.stderr
  assert "Traceback" not in done.stderr and path in lines[0] and "BadImageError" in lines[0], lines[0]
  assert re.search(r"corrupt or truncated .*\(image_id=\d+, ref_id=\d+\)", lines[0]), lines[0]
  assert not (tmp_path / "out" / records.SUMMARY_FILE).exists()


def test_python2_pickles_with_utf8_byte_strings(tmp_path):
  # Python 2 pickled `str` as bytes (opcode U); refer files were written so. b"caf\xc3\xa9" is UTF-8 "café".
  path = tmp_path / "refs(unc).p"
  path.write_bytes(
    b"\x80\x02]q\x00}q\x01(U\x06ref_idK\x07U\x06ann_idK\x01U\x08image_idK\x02U\x0bcategory_id"
    b"K\x03U\x05splitU\x05trainU\tsentences]q\x02}q\x03U\x04sentU\x05caf\xc3\xa9saua."
  )
  refs = refer.load_refs(str(path))
  assert refs == [
    {"ref_id": 7, "ann_id": 1, "image_id": 2, "category_id": 3, "split": "train", "sentences": [{"sent": "café"}]}
  ]


def test_python2_pickles_keep_unicode_objects_and_non_utf8_bytes(tmp_path):
  # Beside UTF-8 byte strings, a Python 2 `unicode` object (opcode X) holding "Ã©" must stay "Ã©" (it is already
  # text: re-decoding it would turn it into "é"), and bytes that are not UTF-8 are read as latin-1.
  data = (
    b"\x80\x02]q\x00}q\x01(U\x06ref_idK\x07U\x06ann_idK\x01U\x08image_idK\x02U\x0bcategory_idK\x03U\x05split"
    b"U\x03valU\tsentences]q\x02}q\x03(U\x04sentX\x04\x00\x00\x00\xc3\x83\xc2\xa9U\x03rawU\x05caf\xc3\xa9"
    b"U\x06tokens]q\x04U\x02\xe9tauaua."
  )
  path = tmp_path / "refs(umd).p"
  path.write_bytes(data)
  (ref,) = refer.load_refs(str(path))
  assert ref["sentences"] == [{"sent": "Ã©", "raw": "café", "tokens": ["ét"]}]
  assert ref["split"] == "val" and ref["ref_id"] == 7


def test_decode_annotation_mask_polygons_match_pycocotools():
  """Random polygon lists equal refer's getMask (frPyObjects + decode, summed, > 0); a first polygon of 4
  coordinates (two points), which frPyObjects takes for a bounding box and fails on, is still a polygon."""
  rng = np.random.default_rng(0)
  for _ in range(200):
    h, w = (int(v) for v in rng.integers(1, 60, 2))
    polygons = [list(rng.uniform(-5, 70, 2 * rng.integers(3, 8))) for _ in range(rng.integers(1, 4))]
    expected = mask_utils.decode(mask_utils.frPyObjects(polygons, h, w)).sum(axis=2) > 0
    got = refer.decode_annotation_mask(polygons, h, w)
    assert got.dtype == np.uint8 and got.shape == (h, w)
    np.testing.assert_array_equal(got.astype(bool), expected)
  polygons = [[1.0, 1.0, 10.0, 10.0], [2.0, 2.0, 20.0, 2.0, 20.0, 20.0, 2.0, 20.0]]
  expected = mask_utils.decode(mask_utils.frPyObjects(polygons[::-1], 30, 30)).sum(axis=2) > 0
  np.testing.assert_array_equal(refer.decode_annotation_mask(polygons, 30, 30).astype(bool), expected)
  with pytest.raises(ValueError, match=r"annotation 5 \(ref_id=2\): cannot decode its segmentation"):
    refer.decode_annotation_mask([["a", "b", "c", "d", "e", "f"]], 30, 30, where="annotation 5 (ref_id=2)")


def test_decode_annotation_mask_rejects_mismatched_rle():
  rle = {"size": [4, 5], "counts": [3, 2, 15]}
  np.testing.assert_array_equal(
    refer.decode_annotation_mask(rle, 4, 5).reshape(-1, order="F"), [0] * 3 + [1] * 2 + [0] * 15
  )
  with pytest.raises(ValueError, match=r"annotation 9: RLE size \[4, 5\] differs"):
    refer.decode_annotation_mask(rle, 5, 4, where="annotation 9")
  with pytest.raises(ValueError, match="empty segmentation"):
    refer.decode_annotation_mask([], 5, 4)
