"""Tests of input_pipeline.pipeline against NumPy implementations of the preprocessing in docs/data.md.

The shards are written here from PIL images with `records.make_example`, so the tests do not depend on the
converter; token truncation is checked against `fcnet_jax.tokenizer.tokenize` on real sentences.
"""

import collections
import io
import os
import re
from typing import Optional

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter
import pytest

from fcnet_jax import fileio
from fcnet_jax import tokenizer
from fixtures_refer import coco_masks
from fixtures_refer import load_refs
from fixtures_refer import run_module
from input_pipeline import convert
from input_pipeline import import_tensorflow
from input_pipeline import metadata
from input_pipeline import pipeline
from input_pipeline import records
from input_pipeline import synthetic

tf = import_tensorflow()
SOT, EOT = tokenizer.SOT_TOKEN, tokenizer.EOT_TOKEN
STORED = records.STORED_CONTEXT_LENGTH
MEAN = np.array([123, 117, 104], np.uint8)


# ------------------------------------------------------------------------------------------------------------
# Writing small shards in the records.py format.


def _encode(array: np.ndarray, fmt: str, mode: Optional[str] = None) -> bytes:
  buffer = io.BytesIO()
  image = PIL.Image.fromarray(array)
  if mode:
    image = image.convert(mode)
  image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buffer.getvalue()


def _polygon_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A random star-shaped polygon around a random centre, rasterized by PIL."""
  cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
  angles = np.sort(rng.uniform(0, 2 * np.pi, size=rng.integers(5, 10)))
  radius = rng.uniform(0.2, 0.33, size=angles.shape)
  points = [(cx + r * width * np.cos(a), cy + r * height * np.sin(a)) for a, r in zip(angles, radius)]
  canvas = PIL.Image.new("L", (width, height), 0)
  PIL.ImageDraw.Draw(canvas).polygon(points, fill=1)
  return np.array(canvas, np.uint8)


def _sentence_tokens(rng: np.random.Generator, length: int) -> np.ndarray:
  row = np.zeros(STORED, np.int64)
  words = rng.integers(1, 49405, size=length)
  row[: length + 2] = [SOT, *words, EOT][:STORED]
  if length + 2 > STORED:
    row[-1] = EOT
  return row


def _np_truncate(tokens: np.ndarray, length: int) -> np.ndarray:
  """CLIP's truncation of [SOS] … [EOS] 0… rows to `length`: a row with no [EOS] in its first ids ends with one."""
  out = np.array(tokens[..., :length])
  overflow = ~(out == EOT).any(axis=-1)
  out[..., length - 1] = np.where(overflow, EOT, out[..., length - 1])
  return out


def _make_ref(rng, ref_id, height, width, num_sentences, fmt="PNG", mode=None, word_counts=None):
  image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
  if fmt == "JPEG":  # Smooth content, on which JPEG decoders (TF's libjpeg, PIL) agree to a few levels.
    image = np.asarray(PIL.Image.fromarray(image).filter(PIL.ImageFilter.GaussianBlur(3)))
  mask = _polygon_mask(rng, height, width)
  if word_counts is None:
    word_counts = rng.integers(1, 20, size=num_sentences)
  tokens = np.stack([_sentence_tokens(rng, int(n)) for n in word_counts])
  encoded = _encode(image, fmt, mode)
  if fmt == "PNG" and mode is None:
    decoded = image
  else:  # Lossy or converted: the reference is what PIL decodes.
    decoded = np.asarray(PIL.Image.open(io.BytesIO(encoded)).convert("RGB"))
  return {
    "ref_id": ref_id,
    "image": decoded,
    "encoded": encoded,
    "mask": mask,
    "tokens": tokens,
    "sent_ids": [ref_id * 10 + k for k in range(len(tokens))],
  }


def _example_bytes(ref) -> bytes:
  height, width = ref["mask"].shape
  return records.make_example(
    image=ref["encoded"],
    height=height,
    width=width,
    mask=ref["mask"],
    ref_id=ref["ref_id"],
    ann_id=ref["ref_id"] + 1000,
    image_id=ref["ref_id"] + 2000,
    category_id=1,
    bbox=[0.0, 0.0, width, height],
    sents=ref.get("sents", [f"sentence {s}" for s in ref["sent_ids"]]),
    sent_ids=ref["sent_ids"],
    tokens=ref["tokens"],
  )


def _write_split(data_dir: str, split: str, shards, summary_sentences=None):
  """Writes `shards` (a list of lists of refs) as the split's TFRecord files and updates summary.json."""
  os.makedirs(os.path.join(data_dir, split), exist_ok=True)
  for index, refs in enumerate(shards):
    path = os.path.join(data_dir, split, records.shard_name(split, index, len(shards)))
    with tf.io.TFRecordWriter(path) as writer:
      for ref in refs:
        writer.write(_example_bytes(ref))
  summary_path = os.path.join(data_dir, records.SUMMARY_FILE)
  summary = {"dataset": "refcoco", "split_by": "unc", "context_length": STORED, "splits": {}}
  if os.path.exists(summary_path):
    summary = fileio.read_json(summary_path)
  sentences = sum(len(r["sent_ids"]) for refs in shards for r in refs)
  summary["splits"][split] = {
    "refs": sum(len(refs) for refs in shards),
    "sentences": sentences if summary_sentences is None else summary_sentences,
    "shards": len(shards),
  }
  fileio.write_json(summary_path, summary)


EXTREME_SIZES = [
  (640, 40),
  (30, 640),
  (1, 1),
  (480, 640),
  (427, 640),
  (640, 427),
  (100, 120),
  (333, 500),
  (2, 3),
  (640, 640),
  (37, 53),
  (200, 7),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Splits: train (24 refs in 4 uneven shards), val (11 refs in 3 shards), shapes (letterbox cases)."""
  rng = np.random.default_rng(0)
  data_dir = str(tmp_path_factory.mktemp("refs"))
  train = [_make_ref(rng, 100 + i, *rng.integers(20, 90, size=2), num_sentences=1 + i % 3) for i in range(24)]
  train_shards = [train[:7], train[7:12], train[12:18], train[18:]]
  _write_split(data_dir, "train", train_shards)
  val = [_make_ref(rng, 500 + i, *rng.integers(20, 90, size=2), num_sentences=1 + (i * 7) % 3) for i in range(11)]
  val_shards = [val[:4], val[4:5], val[5:]]
  _write_split(data_dir, "val", val_shards)
  shapes = [_make_ref(rng, 900 + i, h, w, 1) for i, (h, w) in enumerate(EXTREME_SIZES)]
  shapes[2]["mask"][:] = 1  # 1×1: a full mask (a polygon cannot be drawn on one pixel).
  shapes += [
    _make_ref(rng, 950, 120, 90, 1, fmt="JPEG"),  # Lossy JPEG.
    _make_ref(rng, 951, 64, 80, 1, fmt="JPEG", mode="L"),  # Grayscale JPEG.
    _make_ref(rng, 952, 50, 70, 1, fmt="JPEG", mode="CMYK"),
    _make_ref(rng, 953, 40, 30, 2, word_counts=[40, 1]),
  ]  # Long and short sentences.
  _write_split(data_dir, "shapes", [shapes])
  return {
    "dir": data_dir,
    "train": train,
    "train_shards": train_shards,
    "val": val,
    "val_shards": val_shards,
    "shapes": shapes,
  }


# ------------------------------------------------------------------------------------------------------------
# NumPy references.


def _np_letterbox_params(height, width, size):
  scale = min(size / height, size / width)
  resized = (max(int(np.round(height * scale)), 1), max(int(np.round(width * scale)), 1))
  offset = ((size - resized[0]) // 2, (size - resized[1]) // 2)
  return resized, offset, scale


def _np_bilinear(array, coords_y, coords_x):
  """Samples array (H×W or H×W×C) at float pixel-index coordinates, clamped to the edges (float64)."""
  array = array.astype(np.float64)
  cy = np.clip(coords_y, 0, array.shape[0] - 1)
  cx = np.clip(coords_x, 0, array.shape[1] - 1)
  y0, x0 = np.floor(cy).astype(int), np.floor(cx).astype(int)
  y1, x1 = np.minimum(y0 + 1, array.shape[0] - 1), np.minimum(x0 + 1, array.shape[1] - 1)
  wy, wx = (cy - y0)[:, None], (cx - x0)[None, :]
  if array.ndim == 3:
    wy, wx = wy[..., None], wx[..., None]
  top = array[y0][:, x0] * (1 - wx) + array[y0][:, x1] * wx
  bottom = array[y1][:, x0] * (1 - wx) + array[y1][:, x1] * wx
  return top * (1 - wy) + bottom * wy


def _np_resize(array, out_h, out_w):
  """Half-pixel-centre bilinear resize without antialias (TF2 `tf.image.resize` semantics)."""
  ys = (np.arange(out_h) + 0.5) * array.shape[0] / out_h - 0.5
  xs = (np.arange(out_w) + 0.5) * array.shape[1] / out_w - 0.5
  return _np_bilinear(array, ys, xs)


def _np_inverse_letterbox(canvas_mask, height, width, resized, offset):
  """Maps an S×S letterboxed mask back to h×w: float64 bilinear of the inverse affine map, ≥ 0.5."""
  (nh, nw), (top, left) = resized, offset
  valid = canvas_mask[top : top + nh, left : left + nw]
  ys = (np.arange(height) + 0.5) * nh / height - 0.5
  xs = (np.arange(width) + 0.5) * nw / width - 0.5
  return _np_bilinear(valid, ys, xs) >= 0.5


def _iou(a, b):
  union = np.logical_or(a, b).sum()
  return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def _all_batches(iterator):
  return [dict(b) for b in iterator]


def _unbatch(batches):
  return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["valid"]))]


# ------------------------------------------------------------------------------------------------------------
# Letterbox, masks, tokens.


@pytest.fixture(scope="module")
def shape_examples(data):
  batches = _all_batches(
    pipeline.eval_iterator(data["dir"], "shapes", image_size=480, context_length=5, batch_size=4, canvas=640)
  )
  examples = [e for e in _unbatch(batches) if e["valid"]]
  by_key = {(int(e["ref_id"]), int(e["sent_id"])): e for e in examples}
  assert len(by_key) == len(examples) == sum(len(r["sent_ids"]) for r in data["shapes"])
  return by_key


def test_letterbox_fields_match_numpy(data, shape_examples):
  for ref in data["shapes"]:
    example = shape_examples[(ref["ref_id"], ref["sent_ids"][0])]
    height, width = ref["mask"].shape
    resized, offset, scale = _np_letterbox_params(height, width, 480)
    assert tuple(example["orig_hw"]) == (height, width)
    assert tuple(example["resized_hw"]) == resized, (height, width)
    assert tuple(example["offset"]) == offset, (height, width)
    assert example["scale"] == np.float32(scale)
    for key, dtype, shape in [
      ("image", np.uint8, (480, 480, 3)),
      ("mask", np.uint8, (480, 480)),
      ("tokens", np.int32, (5,)),
      ("orig_hw", np.int32, (2,)),
      ("resized_hw", np.int32, (2,)),
      ("offset", np.int32, (2,)),
      ("scale", np.float32, ()),
      ("ref_id", np.int64, ()),
      ("sent_id", np.int64, ()),
      ("valid", np.bool_, ()),
      ("orig_mask", np.uint8, (640, 640)),
    ]:
      assert example[key].dtype == dtype and example[key].shape == shape, key


def test_letterbox_image_and_padding(data, shape_examples):
  for ref in data["shapes"]:
    example = shape_examples[(ref["ref_id"], ref["sent_ids"][0])]
    (nh, nw), (top, left) = example["resized_hw"], example["offset"]
    inside = np.zeros((480, 480), bool)
    inside[top : top + nh, left : left + nw] = True
    np.testing.assert_array_equal(example["image"][~inside], np.broadcast_to(MEAN, (np.sum(~inside), 3)))
    assert not example["mask"][~inside].any()
    expected = np.round(_np_resize(ref["image"], nh, nw))
    got = example["image"][top : top + nh, left : left + nw].astype(np.float64)
    # JPEG decoders (libjpeg in TF vs PIL) differ by a few levels; PNG must match up to float32 rounding.
    is_png = ref["encoded"][:4] == b"\x89PNG"
    assert np.abs(got - expected).max() <= (1 if is_png else 5), ref["mask"].shape
    assert np.abs(got - expected).mean() < (0.5 if is_png else 2), ref["mask"].shape


def test_mask_letterbox_matches_numpy_and_inverts(data, shape_examples):
  for ref in data["shapes"]:
    example = shape_examples[(ref["ref_id"], ref["sent_ids"][0])]
    height, width = ref["mask"].shape
    (nh, nw), (top, left) = example["resized_hw"], example["offset"]
    forward = _np_resize(ref["mask"], nh, nw) >= 0.5
    got = example["mask"][top : top + nh, left : left + nw]
    # float32 (TF) vs float64 (NumPy) interpolation may disagree on pixels that sit at 0.5 exactly.
    assert np.mean(got != forward) < 1e-3, (height, width)
    back = _np_inverse_letterbox(example["mask"].astype(np.float64), height, width, (nh, nw), (top, left))
    iou = _iou(back, ref["mask"].astype(bool))
    # Thresholding on the S-grid moves the edge by up to half a resized pixel, so thin masks lose more.
    rows, cols = np.nonzero(ref["mask"])
    extent = min(np.ptp(rows) + 1, np.ptp(cols) + 1) * float(example["scale"]) if rows.size else 0
    non_tiny = rows.size >= 400 and extent >= 32 or (height, width) == (1, 1)
    assert iou >= (0.99 if non_tiny else 0.9), (height, width, iou)


def test_orig_mask_is_stored_mask_on_canvas(data, shape_examples):
  for ref in data["shapes"]:
    example = shape_examples[(ref["ref_id"], ref["sent_ids"][0])]
    height, width = ref["mask"].shape
    expected = np.zeros((640, 640), np.uint8)
    expected[:height, :width] = ref["mask"]
    np.testing.assert_array_equal(example["orig_mask"], expected)


def test_tokens_truncated_with_eos_last(data, shape_examples):
  ref = data["shapes"][-1]
  long, short = (shape_examples[(ref["ref_id"], s)]["tokens"] for s in ref["sent_ids"])
  stored_long, stored_short = ref["tokens"]
  np.testing.assert_array_equal(long, [SOT, *stored_long[1:4], EOT])
  np.testing.assert_array_equal(short, [SOT, stored_short[1], EOT, 0, 0])
  np.testing.assert_array_equal(np.stack([long, short]), _np_truncate(ref["tokens"], 5))


def test_truncate_tokens_matches_clip_rule():
  rng = np.random.default_rng(3)
  rows = np.stack([_sentence_tokens(rng, n) for n in range(0, 80, 3)])
  for length in (2, 5, 17, 22, 77):
    got = records.truncate_tokens(rows, length).numpy()
    np.testing.assert_array_equal(got, _np_truncate(rows, length))
    assert got.dtype == np.int32
    for row in rows:  # One row at a time, as the pipeline calls it.
      np.testing.assert_array_equal(records.truncate_tokens(row, length).numpy(), _np_truncate(row, length))


# Real sentences whose CLIP BPE holds id 0: "!" that does not end a word, inside a run of punctuation ("dog!;"
# is [SOS] dog 0 ; [EOS]). _BANG_WORDS[:k] + "!;" puts the 0 at index k + 1.
_BANG_WORDS = (
  "the man in the red shirt on the left side of the picture next to the tall woman holding a small white dog"
).split()
BANG_LENGTHS = (2, 3, 5, 8, 17, 22)  # L values at which the 0 lands exactly at index L.


def _bang_sentences():
  texts = ["!~", "dog!;", "the dog!;", "left cat!/", "the bird!~ on top", "man on the left!=right"]
  texts += [" ".join(_BANG_WORDS[: length - 1]) + "!;" for length in BANG_LENGTHS]
  return texts


def test_bang_sentences_put_id_0_at_index_l():
  # The premise of the truncation tests below, from the tokenizer itself.
  texts = _bang_sentences()
  tokens = tokenizer.tokenize(texts, STORED)
  covered = set()
  for text, row in zip(texts, tokens):
    eos = int(np.flatnonzero(row == EOT)[0])
    bangs = {int(i) for i in np.flatnonzero(row[:eos] == 0)}
    assert bangs, text
    covered |= {length for length in BANG_LENGTHS if length in bangs}
  assert covered == set(BANG_LENGTHS)


def test_truncation_of_sentences_containing_id_0_agrees_with_the_tokenizer():
  texts = _bang_sentences()
  stored = tokenizer.tokenize(texts, STORED)
  for length in range(2, 26):
    np.testing.assert_array_equal(
      records.truncate_tokens(stored, length).numpy(), tokenizer.tokenize(texts, length), err_msg=f"L={length}"
    )


@pytest.fixture(scope="module")
def bang_data(tmp_path_factory):
  """A split whose refs carry the id-0 sentences, written as real records (sentences, stored 77 ids)."""
  rng = np.random.default_rng(7)
  data_dir = str(tmp_path_factory.mktemp("bang"))
  texts = _bang_sentences()
  refs = []
  for i in range(0, len(texts), 2):
    ref = _make_ref(rng, 700 + i, 12, 16, 1)
    ref["sents"] = texts[i : i + 2]
    ref["sent_ids"] = [7000 + i + k for k in range(len(ref["sents"]))]
    ref["tokens"] = np.asarray(tokenizer.tokenize(ref["sents"], STORED))
    refs.append(ref)
  _write_split(data_dir, "bang", [refs])
  return data_dir, {s: t for ref in refs for s, t in zip(ref["sent_ids"], ref["sents"])}


@pytest.mark.parametrize("length", BANG_LENGTHS)
def test_pipeline_batches_of_sentences_containing_id_0_end_with_eos(bang_data, length):
  data_dir, text_of = bang_data
  examples = [
    e
    for e in _unbatch(
      _all_batches(
        pipeline.eval_iterator(data_dir, "bang", image_size=8, context_length=length, batch_size=4, canvas=16)
      )
    )
    if e["valid"]
  ]
  assert sorted(int(e["sent_id"]) for e in examples) == sorted(text_of)
  for e in examples:
    text = text_of[int(e["sent_id"])]
    np.testing.assert_array_equal(e["tokens"], tokenizer.tokenize(text, length)[0], err_msg=text)
    assert EOT in e["tokens"], text  # The text encoder reads the sentence feature at [EOS].
  # The training stream cuts the tokens the same way.
  batch = next(
    pipeline.train_iterator(
      data_dir, "bang", image_size=8, context_length=length, batch_size=len(text_of) // 2, seed=0, shuffle_buffer=8
    )
  )
  for tokens, sent_id in zip(batch["tokens"], batch["sent_id"]):
    np.testing.assert_array_equal(tokens, tokenizer.tokenize(text_of[int(sent_id)], length)[0])


# ------------------------------------------------------------------------------------------------------------
# Letterbox at extreme aspect ratios: a resized side of 1–3 pixels, under the model's stride of 4.

THIN_SIZES = [(2000, 3), (3, 2000), (2000, 50), (50, 2000), (2000, 80), (1500, 2)]


def _thin_ref(ref_id, height, width):
  """A vertical (or horizontal) colour ramp, the mask the middle half of the long side across the short side."""
  ramp = np.linspace(0, 255, max(height, width))
  grey = np.broadcast_to(ramp[:, None] if height > width else ramp[None, :], (height, width))
  image = np.stack([grey, 255 - grey, np.full_like(grey, 60)], -1).round().astype(np.uint8)
  mask = np.zeros((height, width), np.uint8)
  if height > width:
    mask[height // 4 : 3 * height // 4] = 1
  else:
    mask[:, width // 4 : 3 * width // 4] = 1
  return {
    "ref_id": ref_id,
    "image": image,
    "encoded": _encode(image, "PNG"),
    "mask": mask,
    "tokens": tokenizer.tokenize(["thin"], STORED),
    "sent_ids": [ref_id],
  }


def test_letterbox_of_extreme_aspect_ratios(tmp_path):
  size = 64
  refs = [_thin_ref(800 + i, h, w) for i, (h, w) in enumerate(THIN_SIZES)]
  _write_split(str(tmp_path), "thin", [refs])
  batch = next(
    pipeline.train_iterator(
      str(tmp_path), "thin", image_size=size, context_length=5, batch_size=len(refs), seed=0, shuffle_buffer=1
    )
  )
  short_sides = set()
  for i, ref_id in enumerate(batch["ref_id"]):
    ref = refs[int(ref_id) - 800]
    height, width = ref["mask"].shape
    resized, offset, scale = _np_letterbox_params(height, width, size)
    assert tuple(batch["resized_hw"][i]) == resized and tuple(batch["offset"][i]) == offset, (height, width)
    assert batch["scale"][i] == np.float32(scale)
    (nh, nw), (top, left) = resized, offset
    short_sides.add(min(nh, nw))
    assert max(nh, nw) == size
    inside = np.zeros((size, size), bool)
    inside[top : top + nh, left : left + nw] = True
    # Padding: the mean colour around the strip, no foreground there; the strip is centred.
    np.testing.assert_array_equal(batch["image"][i][~inside], np.broadcast_to(MEAN, (np.sum(~inside), 3)))
    assert not batch["mask"][i][~inside].any()
    assert abs((size - nh - top) - top) <= 1 and abs((size - nw - left) - left) <= 1
    got = batch["image"][i][top : top + nh, left : left + nw].astype(np.float64)
    assert np.abs(got - np.round(_np_resize(ref["image"], nh, nw))).max() <= 1, (height, width)
    # The mask keeps the middle half of the long side over the whole short side.
    strip = batch["mask"][i][top : top + nh, left : left + nw]
    np.testing.assert_array_equal(strip, _np_resize(ref["mask"], nh, nw) >= 0.5, err_msg=str((height, width)))
    profile = strip.min(axis=1) if nh > nw else strip.min(axis=0)
    assert np.array_equal(profile, strip.max(axis=1) if nh > nw else strip.max(axis=0))
    assert profile.sum() == size // 2 and profile[size // 4 : 3 * size // 4].all(), (height, width)
  assert short_sides == {1, 2, 3}


# ------------------------------------------------------------------------------------------------------------
# Training stream.


def _train(data, **kwargs):
  args = dict(image_size=32, context_length=8, batch_size=4, seed=0, shuffle_buffer=8)
  args.update(kwargs)
  return pipeline.train_iterator(data["dir"], "train", **args)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_train_same_seed_same_stream_other_seed_differs(data):
  first = _take(_train(data), 13)
  _assert_same_batches(first, _take(_train(data), 13))
  other = _take(_train(data, seed=1), 13)
  assert [list(b["ref_id"]) for b in first] != [list(b["ref_id"]) for b in other]
  batch = first[0]
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["tokens"].shape == (4, 8) and batch["tokens"].dtype == np.int32
  assert batch["valid"].all() and "orig_mask" not in batch


@pytest.mark.parametrize("process_index,process_count", [(1, 2), (2, 5)])
def test_train_resume_continues_stream(data, process_index, process_count):
  kwargs = dict(process_index=process_index, process_count=process_count, batch_size=2)
  uninterrupted = _take(_train(data, **kwargs), 16)
  for start in (4, 13):  # In the first epoch, and a few epochs (of 11 or 5 refs) later.
    _assert_same_batches(uninterrupted[start:], _take(_train(data, start_step=start, **kwargs), 16 - start))


def _expected_process_refs(data, process_index, process_count):
  shards = data["train_shards"]
  if len(shards) >= process_count:
    return {r["ref_id"] for shard in shards[process_index::process_count] for r in shard}
  flat = [r["ref_id"] for shard in shards for r in shard]
  return set(flat[process_index::process_count])


@pytest.mark.parametrize("process_count", [3, 5])  # Uneven files per process; fewer files than processes.
def test_train_epochs_cover_disjoint_process_parts(data, process_count):
  union, reshuffled = [], []
  for process_index in range(process_count):
    expected = _expected_process_refs(data, process_index, process_count)
    stream = _train(data, process_index=process_index, process_count=process_count, batch_size=1)
    seen = [int(b["ref_id"][0]) for b in _take(stream, 2 * len(expected))]
    # Every epoch of this process visits each of its refs exactly once.
    assert sorted(seen[: len(expected)]) == sorted(expected)
    assert sorted(seen[len(expected) :]) == sorted(expected)
    reshuffled.append(seen[: len(expected)] != seen[len(expected) :])
    union += seen[: len(expected)]
  assert sorted(union) == sorted(r["ref_id"] for r in data["train"])
  assert any(reshuffled)  # Each epoch has its own order.


def test_train_samples_random_sentences_with_matching_tokens(data):
  refs = {r["ref_id"]: r for r in data["train"]}
  chosen = collections.defaultdict(collections.Counter)
  for batch in _take(_train(data, batch_size=8), 30):  # 10 epochs.
    for ref_id, sent_id, tokens in zip(batch["ref_id"], batch["sent_id"], batch["tokens"]):
      ref = refs[int(ref_id)]
      k = ref["sent_ids"].index(int(sent_id))
      np.testing.assert_array_equal(tokens, _np_truncate(ref["tokens"][k], 8))
      chosen[int(ref_id)][k] += 1
  multi = [ref_id for ref_id, r in refs.items() if len(r["sent_ids"]) > 1]
  assert all(len(chosen[ref_id]) > 1 for ref_id in multi)


def test_train_example_content_matches_numpy(data):
  refs = {r["ref_id"]: r for r in data["train"]}
  batch = _take(_train(data, image_size=48), 1)[0]
  for i, ref_id in enumerate(batch["ref_id"]):
    ref = refs[int(ref_id)]
    resized, offset, _ = _np_letterbox_params(*ref["mask"].shape, 48)
    (top, left), (nh, nw) = offset, resized
    expected = np.round(_np_resize(ref["image"], nh, nw))
    got = batch["image"][i, top : top + nh, left : left + nw].astype(np.float64)
    assert np.abs(got - expected).max() <= 1
    assert tuple(batch["orig_hw"][i]) == ref["mask"].shape


# ------------------------------------------------------------------------------------------------------------
# Evaluation.


def _expected_pairs(data, split):
  return [(r["ref_id"], s) for shard in data[split + "_shards"] for r in shard for s in r["sent_ids"]]


@pytest.mark.parametrize("batch_size", [1, 4, 40])  # 21 pairs: 11 and 10 per process.
def test_eval_every_pair_once_across_processes(data, batch_size):
  pairs = _expected_pairs(data, "val")
  first_pair = pairs[0]
  got, counts = [], []
  for process_index in range(2):
    batches = _all_batches(
      pipeline.eval_iterator(
        data["dir"],
        "val",
        image_size=32,
        context_length=8,
        batch_size=batch_size,
        process_index=process_index,
        process_count=2,
        canvas=96,
      )
    )
    counts.append(len(batches))
    assert all(b["image"].shape == (batch_size, 32, 32, 3) for b in batches)
    examples = _unbatch(batches)
    valid = [(int(e["ref_id"]), int(e["sent_id"])) for e in examples if e["valid"]]
    assert valid == pairs[process_index::2]  # Fixed order: file, ref, sentence.
    padding = [e for e in examples if not e["valid"]]
    assert len(padding) == counts[-1] * batch_size - len(valid)
    for e in padding:  # A copy of a real example, flagged.
      assert (int(e["ref_id"]), int(e["sent_id"])) == first_pair and e["mask"].any()
    got += valid
  assert counts[0] == counts[1] == pipeline.eval_num_batches(len(pairs), batch_size, 2)
  assert sorted(got) == sorted(pairs)


def test_eval_single_process_order_and_orig_mask(data):
  examples = _unbatch(
    _all_batches(pipeline.eval_iterator(data["dir"], "val", image_size=32, context_length=8, batch_size=5, canvas=96))
  )
  pairs = _expected_pairs(data, "val")
  assert [(int(e["ref_id"]), int(e["sent_id"])) for e in examples[: len(pairs)]] == pairs
  assert not any(e["valid"] for e in examples[len(pairs) :])
  refs = {r["ref_id"]: r for r in data["val"]}
  for e in examples[: len(pairs)]:
    mask = refs[int(e["ref_id"])]["mask"]
    assert not e["orig_mask"][mask.shape[0] :].any() and not e["orig_mask"][:, mask.shape[1] :].any()
    np.testing.assert_array_equal(e["orig_mask"][: mask.shape[0], : mask.shape[1]], mask)


@pytest.mark.parametrize("claimed_offset", [-1, 1])
def test_eval_pair_count_mismatch_raises(data, tmp_path, claimed_offset):
  data_dir = str(tmp_path)
  _write_split(
    data_dir, "val", data["val_shards"], summary_sentences=len(_expected_pairs(data, "val")) + claimed_offset
  )
  with pytest.raises(tf.errors.InvalidArgumentError, match="summary.json says"):
    _all_batches(pipeline.eval_iterator(data_dir, "val", image_size=16, context_length=8, batch_size=4, canvas=96))


def test_eval_image_larger_than_canvas_raises(data):
  with pytest.raises(tf.errors.InvalidArgumentError, match="larger than the evaluation canvas"):
    _all_batches(pipeline.eval_iterator(data["dir"], "val", image_size=16, context_length=8, batch_size=4, canvas=32))


# ------------------------------------------------------------------------------------------------------------
# Metadata and bad input.


def test_dataset_info_and_errors(data, tmp_path):
  info = pipeline.dataset_info(data["dir"])
  assert info["splits"]["train"] == {
    "refs": 24,
    "sentences": sum(len(r["sent_ids"]) for r in data["train"]),
    "shards": 4,
  }
  with pytest.raises(FileNotFoundError, match="summary.json"):
    pipeline.dataset_info(str(tmp_path))
  with pytest.raises(ValueError, match="'nope'.*has"):
    pipeline.train_dataset(data["dir"], "nope", image_size=32, context_length=8, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="context_length"):
    pipeline.train_dataset(data["dir"], "train", image_size=32, context_length=78, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="process_index"):
    pipeline.eval_dataset(
      data["dir"], "val", image_size=32, context_length=8, batch_size=2, process_index=2, process_count=2
    )


def test_dataset_info_checks_dataset_and_split_by(data):
  path = os.path.join(data["dir"], records.SUMMARY_FILE)
  assert pipeline.dataset_info(data["dir"], "refcoco", "unc")["dataset"] == "refcoco"
  assert pipeline.dataset_info(data["dir"], dataset="refcoco")["split_by"] == "unc"
  # A RefCOCO+ configuration pointed at RefCOCO shards: the error names both datasets and the file.
  with pytest.raises(
    ValueError,
    match=(
      f"{re.escape(path)} holds dataset='refcoco', split_by='unc', but the configuration asks for dataset='refcoco\\+'"
    ),
  ):
    pipeline.dataset_info(data["dir"], "refcoco+", "unc")
  with pytest.raises(ValueError, match="holds dataset='refcoco', split_by='unc'.*asks for split_by='google'"):
    pipeline.dataset_info(data["dir"], split_by="google")


def test_count_records_reads_headers_and_rejects_truncated_files(data, tmp_path):
  for index, shard in enumerate(data["train_shards"]):
    path = os.path.join(data["dir"], "train", records.shard_name("train", index, 4))
    assert metadata.count_records(path) == len(shard)
  with open(path, "rb") as f:
    truncated = f.read()[:-3]
  (tmp_path / "cut.tfrecord").write_bytes(truncated)
  with pytest.raises(ValueError, match="truncated"):
    metadata.count_records(str(tmp_path / "cut.tfrecord"))


# ------------------------------------------------------------------------------------------------------------
# End to end: synthetic refer data → converter → pipeline.


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on NumPy 2.
def test_end_to_end_from_synthetic_refer_data(tmp_path):
  root, out = str(tmp_path / "refer"), str(tmp_path / "tfrecords")
  synthetic.generate(root, seed=0, num_train_images=6, num_eval_images=3, splits=("train", "val"))
  convert.convert(
    root, os.path.join(root, "images"), "refcoco", "unc", out, splits=["train", "val"], num_workers=1, shard_size=8
  )
  refs = {r["ref_id"]: r for r in load_refs(root)}
  masks = coco_masks(root)  # The official COCO API, independent of the converter.
  got = []
  for process_index in range(2):
    for batch in pipeline.eval_iterator(
      out,
      "val",
      image_size=64,
      context_length=8,
      batch_size=4,
      process_index=process_index,
      process_count=2,
      canvas=160,
    ):
      for e in _unbatch([batch]):
        if not e["valid"]:
          continue
        ref = refs[int(e["ref_id"])]
        sentence = next(s for s in ref["sentences"] if s["sent_id"] == int(e["sent_id"]))
        np.testing.assert_array_equal(e["tokens"], tokenizer.tokenize(sentence["sent"], 8)[0])
        mask = masks[ref["ann_id"]]
        np.testing.assert_array_equal(e["orig_mask"][: mask.shape[0], : mask.shape[1]], mask)
        assert e["mask"].any()
        got.append((ref["ref_id"], sentence["sent_id"]))
  expected = [(r["ref_id"], s["sent_id"]) for r in refs.values() if r["split"] == "val" for s in r["sentences"]]
  assert sorted(got) == sorted(expected)
  batch = next(pipeline.train_iterator(out, "train", image_size=64, context_length=8, batch_size=8, seed=0))
  assert all(refs[int(i)]["split"] == "train" for i in batch["ref_id"]) and batch["mask"].any(axis=(1, 2)).all()


# ------------------------------------------------------------------------------------------------------------
# The throughput tool.


def test_throughput_command_line_smoke(tmp_path):
  done = run_module(
    "input_pipeline.throughput",
    f"--data_dir={tmp_path}",
    "--write_fake=3",
    "--steps=1",
    "--warmup_steps=0",
    "--batch_size=2",
    "--image_size=32",
    "--shuffle_buffer=2",
  )
  assert done.returncode == 0, done.stderr
  assert re.search(r"[0-9.]+ examples/s on \d+ core\(s\)", done.stdout), done.stdout
  info = pipeline.dataset_info(str(tmp_path))
  assert info["splits"]["train"]["refs"] == 3 and info["splits"]["train"]["shards"] == 1
  assert metadata.count_records(os.path.join(tmp_path, "train", records.shard_name("train", 0, 1))) == 3
