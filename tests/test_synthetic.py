"""Tests of input_pipeline.synthetic: refer-format fidelity, exact masks, unique referents, determinism.

The referent of every sentence is re-derived from the written files only — shape from the annotation's
category, colour from the JPEG pixels under the COCO-decoded mask, size from the mask's bounding box, position
from the mask's centroid — and must be exactly the ref's own annotation.
"""

import filecmp
import io
import os
import pickle
import re

import numpy as np
from PIL import Image
import pytest

from fixtures_refer import coco_masks
from fixtures_refer import load_instances
from fixtures_refer import load_refs
from fixtures_refer import run_module
from input_pipeline import refer
from input_pipeline import synthetic

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SIZE_OF_WORD = {w: size for size, words in synthetic.SIZE_WORDS.items() for w in words}
FILLER_WORDS = set(synthetic.NOUNS) | {"the", "on", "at"}
SIZE_THRESHOLD = 0.235  # Between the small and large bounding-box extents (fraction of the longer side).


@pytest.fixture(scope="module")
def default_root(tmp_path_factory):
  """The dataset `python -m input_pipeline.synthetic --out=...` writes with its defaults (the CLI's too)."""
  root = str(tmp_path_factory.mktemp("default"))
  summary = synthetic.generate(root)
  return root, summary


@pytest.fixture(scope="module")
def objects(default_root):
  """Per image: its PIL image and, per annotation, the attributes measured from the files."""
  root, _ = default_root
  instances = load_instances(root)
  masks = coco_masks(root)
  names = {c["id"]: c["name"] for c in instances["categories"]}
  images = {}
  for info in instances["images"]:
    with Image.open(os.path.join(root, "images", "train2014", info["file_name"])) as image:
      image.load()
    images[info["id"]] = {"info": info, "image": image, "objects": {}}
  for ann in instances["annotations"]:
    entry = images[ann["image_id"]]
    h, w = entry["info"]["height"], entry["info"]["width"]
    mask = masks[ann["id"]].astype(bool)
    ys, xs = np.nonzero(mask)
    extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / max(h, w)
    # Colour from the interior (one-pixel erosion) so JPEG ringing at the edges does not matter.
    interior = mask.copy()
    interior[1:] &= mask[:-1]
    interior[:-1] &= mask[1:]
    interior[:, 1:] &= mask[:, :-1]
    interior[:, :-1] &= mask[:, 1:]
    pixels = np.asarray(entry["image"].convert("RGB")).reshape(-1, 3)[
      (interior if interior.any() else mask).reshape(-1)
    ]
    median = np.median(pixels, axis=0)
    distances = {c: np.linalg.norm(median - np.array(rgb)) for c, rgb in synthetic.COLOURS.items()}
    entry["objects"][ann["id"]] = {
      "ann": ann,
      "mask": mask,
      "shape": names[ann["category_id"]],
      "colour": min(distances, key=distances.get),
      "colour_distance": min(distances.values()),
      "size": "large" if extent > SIZE_THRESHOLD else "small",
      "extent": extent,
      "cx": xs.mean() + 0.5,
      "cy": ys.mean() + 0.5,
      "median": median,
    }
  return images


def _matches(obj, word, height, width):
  if word in synthetic.COLOURS:
    return obj["colour"] == word
  if word in synthetic.SHAPES:
    return obj["shape"] == word
  if word in SIZE_OF_WORD:
    return obj["size"] == SIZE_OF_WORD[word]
  return {
    "left": obj["cx"] < width / 2,
    "right": obj["cx"] > width / 2,
    "top": obj["cy"] < height / 2,
    "bottom": obj["cy"] > height / 2,
  }[word]


def test_every_sentence_names_exactly_its_own_object(default_root, objects):
  root, _ = default_root
  refs = load_refs(root)
  assert len(refs) > 300
  vocabulary = (
    set(synthetic.COLOURS) | set(synthetic.SHAPES) | set(SIZE_OF_WORD) | set(synthetic.POSITION_WORDS) | FILLER_WORDS
  )
  for ref in refs:
    entry = objects[ref["image_id"]]
    h, w = entry["info"]["height"], entry["info"]["width"]
    for sentence in ref["sentences"]:
      words = sentence["sent"].split()
      assert set(words) <= vocabulary, sentence
      attribute_words = [word for word in words if word not in FILLER_WORDS]
      assert attribute_words, sentence
      if entry["image"].mode == "L":
        assert not set(words) & set(synthetic.COLOURS), f"colour word for a grayscale image: {sentence}"
      named = [
        ann_id for ann_id, obj in entry["objects"].items() if all(_matches(obj, word, h, w) for word in attribute_words)
      ]
      assert named == [ref["ann_id"]], (ref["ref_id"], sentence["sent"], named)


def test_masks_are_the_painted_shapes(objects):
  for entry in objects.values():
    h, w = entry["info"]["height"], entry["info"]["width"]
    covered = np.zeros((h, w), int)
    for obj in entry["objects"].values():
      assert obj["mask"].any()
      covered += obj["mask"]
      if entry["image"].mode == "RGB":  # The mask's pixels are the shape's colour, not background.
        assert obj["colour_distance"] < 40, (obj["ann"]["id"], obj["median"])
      else:
        luminance = {c: 0.299 * r + 0.587 * g + 0.114 * b for c, (r, g, b) in synthetic.COLOURS.items()}
        assert min(abs(obj["median"][0] - v) for v in luminance.values()) < 25
      # bbox and area are those of the decoded mask (pycocotools' own toBbox/area conventions).
      ys, xs = np.nonzero(obj["mask"])
      x, y, bw, bh = obj["ann"]["bbox"]
      assert (x, y, x + bw, y + bh) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
      assert obj["ann"]["area"] == obj["mask"].sum()
    assert covered.max() == 1, "shapes overlap"


def test_images_sizes_and_visibility_at_64(objects):
  for entry in objects.values():
    info, image = entry["info"], entry["image"]
    assert image.size == (info["width"], info["height"])
    assert image.format == "JPEG" and image.mode in ("RGB", "L")
    assert 48 <= min(image.size) and max(image.size) <= 160
    assert 3 <= len(entry["objects"]) <= 5
    for obj in entry["objects"].values():
      # Letterboxed to 64×64, every shape keeps at least ~9 pixels of extent.
      assert obj["extent"] * 64 >= 9, obj
  sizes = {entry["image"].size for entry in objects.values()}
  ratios = [max(s) / min(s) for s in sizes]
  assert len(sizes) > 20 and max(ratios) > 1.4 and min(ratios) < 1.1


def test_refer_format(default_root):
  root, summary = default_root
  with open(os.path.join(root, "refcoco", "refs(unc).p"), "rb") as f:
    assert f.read(2) == b"\x80\x02"  # Pickle protocol 2, like the refer downloads.
  refs = load_refs(root)
  instances = load_instances(root)
  anns = {a["id"]: a for a in instances["annotations"]}
  images = {i["id"]: i for i in instances["images"]}
  assert set(instances) == {"images", "annotations", "categories"}
  assert all(set(i) == {"id", "file_name", "height", "width"} for i in instances["images"])
  assert all(re.fullmatch(r"COCO_train2014_\d{12}\.jpg", i["file_name"]) for i in instances["images"])
  ref_ids, sent_ids = set(), set()
  for ref in refs:
    assert set(ref) == {"ref_id", "ann_id", "image_id", "category_id", "split", "file_name", "sent_ids", "sentences"}
    assert ref["split"] in ("train", "val", "testA", "testB")
    ann = anns[ref["ann_id"]]
    assert (ann["image_id"], ann["category_id"]) == (ref["image_id"], ref["category_id"])
    assert ref["file_name"] == images[ref["image_id"]]["file_name"][:-4] + f"_{ref['ann_id']}.jpg"
    assert 1 <= len(ref["sentences"]) <= 3
    assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
    assert len({s["sent"] for s in ref["sentences"]}) == len(ref["sentences"])
    for s in ref["sentences"]:
      assert set(s) == {"sent_id", "raw", "sent", "tokens"}
      assert s["tokens"] == s["sent"].split() and s["sent"] == s["sent"].lower()
      assert s["raw"].lower().rstrip(".") == s["sent"]
      sent_ids.add(s["sent_id"])
    ref_ids.add(ref["ref_id"])
  assert len(ref_ids) == len(refs) and len(sent_ids) == sum(len(r["sentences"]) for r in refs)
  # One split per image, as in the refer splits (split by image).
  split_of = {}
  for ref in refs:
    assert split_of.setdefault(ref["image_id"], ref["split"]) == ref["split"]
  for split, counts in summary["splits"].items():
    split_refs = [r for r in refs if r["split"] == split]
    assert counts["refs"] == len(split_refs)
    assert counts["sentences"] == sum(len(r["sentences"]) for r in split_refs)
  assert 300 <= summary["splits"]["train"]["refs"] <= 500
  assert all(80 <= summary["splits"][s]["refs"] <= 130 for s in ("val", "testA", "testB"))


def test_annotation_variety_and_language_mix(default_root):
  root, summary = default_root
  instances = load_instances(root)
  segmentations = [a["segmentation"] for a in instances["annotations"]]
  assert any(isinstance(s, list) and len(s) > 1 for s in segmentations)
  assert any(isinstance(s, dict) and isinstance(s["counts"], str) for s in segmentations)
  assert any(isinstance(s, dict) and isinstance(s["counts"], list) for s in segmentations)
  assert all(a["iscrowd"] == isinstance(a["segmentation"], dict) for a in instances["annotations"])
  modes = set()
  for info in instances["images"]:
    with Image.open(os.path.join(root, "images", "train2014", info["file_name"])) as image:
      modes.add(image.mode)
  assert modes == {"RGB", "L"}
  sentences = [s["sent"].split() for r in load_refs(root) for s in r["sentences"]]
  with_position = sum(bool(set(words) & set(synthetic.POSITION_WORDS)) for words in sentences)
  assert with_position == summary["position_sentences"]
  assert 0.02 < with_position / len(sentences) < 0.2  # A simple minority; attributes are the majority.
  # Colour-only, shape-only and size-only phrases all occur, and so do combinations.
  kinds = {
    tuple(
      sorted(
        {
          k
          for k, vocab in (("colour", synthetic.COLOURS), ("shape", synthetic.SHAPES), ("size", SIZE_OF_WORD))
          if set(words) & set(vocab)
        }
      )
    )
    for words in sentences
  }
  assert {("colour",), ("shape",), ("size",), ("colour", "shape"), ("shape", "size")} <= kinds


def test_deterministic_given_seed(tmp_path, default_root):
  small = dict(num_train_images=6, num_eval_images=2)
  first, second, other = (str(tmp_path / n) for n in ("a", "b", "c"))
  synthetic.generate(first, seed=0, **small)
  synthetic.generate(second, seed=0, **small)
  synthetic.generate(other, seed=1, **small)
  files = sorted(os.path.relpath(os.path.join(d, f), first) for d, _, fs in os.walk(first) for f in fs)
  assert len(files) == 6 + 3 * 2 + 2
  match, mismatch, errors = filecmp.cmpfiles(first, second, files, shallow=False)
  assert (mismatch, errors) == ([], []) and len(match) == len(files)
  _, mismatch, _ = filecmp.cmpfiles(first, other, files, shallow=False)
  assert len(mismatch) == len(files)
  # An image depends only on (seed, index): the small dataset's images are the default one's first images.
  default, _ = default_root
  images = [f for f in files if f.endswith(".jpg")]
  match, _, _ = filecmp.cmpfiles(first, default, images, shallow=False)
  assert match == images


@pytest.mark.parametrize("dataset,split_by", sorted(refer.SPLITS))
def test_every_dataset_and_split_by_of_the_config(tmp_path, dataset, split_by):
  # config.data.dataset / split_by reach generate(): each known combination gets its own splits.
  summary = synthetic.generate(str(tmp_path), num_train_images=1, num_eval_images=1, dataset=dataset, split_by=split_by)
  refs = load_refs(str(tmp_path), dataset, split_by)
  assert tuple(summary["splits"]) == refer.SPLITS[(dataset, split_by)]
  assert sorted({r["split"] for r in refs}) == sorted(refer.SPLITS[(dataset, split_by)])


def test_unknown_dataset_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="'refcoco\\+'.*'umd'.*known: refcoco/unc"):
    synthetic.generate(str(tmp_path), num_train_images=1, num_eval_images=1, dataset="refcoco+", split_by="umd")
  assert not os.listdir(tmp_path)


def test_command_line(tmp_path):
  done = run_module(
    "input_pipeline.synthetic", f"--out={tmp_path / 'cli'}", "--seed=3", "--num_train_images=2", "--num_eval_images=1"
  )
  assert done.returncode == 0, done.stderr
  assert '"seed": 3' in done.stdout
  with open(tmp_path / "cli" / "refcoco" / "refs(unc).p", "rb") as f:
    assert {r["split"] for r in pickle.load(f)} == {"train", "val", "testA", "testB"}
  with Image.open(
    io.BytesIO((tmp_path / "cli" / "images" / "train2014" / synthetic.image_file_name(9)).read_bytes())
  ) as image:
    assert image.format == "JPEG"
