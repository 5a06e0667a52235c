"""fcnet_jax.predict, fcnet_jax.visualize and the predict CLI (fcnet_jax/tools/predict.py), docs/predict.md.

On conftest.py's `trained_tiny_workdir` (read-only): the predictor's mask for a converted (image, sentence) pair
scores exactly the IoU that evaluation's own code computes for that pair from the real TF pipeline's batch; the
NumPy letterbox and JPEG decoding equal the pipeline's (TensorFlow) bit for bit; EXIF, grey, RGBA, CMYK and 16-bit
inputs; the errors; no recompilation within the shape buckets; the CLI's PNGs and the manifest's metrics.
"""

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib

import jax
import numpy as np
from PIL import Image
import pytest

from fcnet_jax import image_ops
from fcnet_jax import letterbox
from fcnet_jax import metrics
from fcnet_jax import predict
from fcnet_jax import visualize
from fcnet_jax.tools import predict as predict_tool
import train_worker

# pycocotools (synthetic data / converter) warns once per decoded mask under NumPy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module")
def final_eval(trained_tiny_workdir):
  """eval_val.json of the shared run: main.py's final evaluation of every val pair (the real pipeline and eval_step)."""
  with open(os.path.join(trained_tiny_workdir.workdir, "eval_val.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def predictor(trained_tiny_workdir, final_eval):
  return predict.Predictor.from_checkpoint(trained_tiny_workdir.workdir, final_eval["step"])


@pytest.fixture(scope="module")
def val_pairs(trained_tiny_workdir, predictor):
  """Every (image file, sentence, original-size ground truth) pair of the val split, from the real TF pipeline."""
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  from input_pipeline import synthetic  # pylint: disable=g-import-not-at-top

  c = predictor.config
  raw = os.path.join(os.path.dirname(trained_tiny_workdir.dataset.tfrecord_dir), "raw")
  with open(os.path.join(raw, "refcoco", "refs(unc).p"), "rb") as f:
    refs = {ref["ref_id"]: ref for ref in pickle.load(f)}
  pairs = []
  batches = pipeline.eval_iterator(
    trained_tiny_workdir.dataset.tfrecord_dir,
    "val",
    image_size=c.model.image_size,
    context_length=c.model.context_length,
    batch_size=8,
    canvas=c.data.eval_canvas,
    letterbox_mode=c.data.letterbox,
  )
  for batch in batches:
    for i in np.flatnonzero(batch["valid"]):
      ref = refs[int(batch["ref_id"][i])]
      (sentence,) = [s["sent"] for s in ref["sentences"] if s["sent_id"] == int(batch["sent_id"][i])]
      height, width = batch["orig_hw"][i]
      image = os.path.join(raw, "images", "train2014", synthetic.image_file_name(ref["image_id"]))
      pairs.append({"image": image, "text": sentence, "mask": batch["orig_mask"][i, :height, :width] != 0})
  return pairs


def _by_image(pairs):
  groups = {}
  for pair in pairs:
    groups.setdefault(pair["image"], []).append(pair)
  return groups


def _iou(prediction: np.ndarray, truth: np.ndarray) -> float:
  union = np.sum(prediction | truth)
  return float(np.float32(np.sum(prediction & truth)) / np.float32(union)) if union else 1.0


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "PNG")
  return buffer.getvalue()


def _png16_rgb(pixels: np.ndarray, claimed_hw=None) -> bytes:
  """A 16-bit RGB PNG (PIL cannot write one): IHDR bit depth 16, colour type 2, unfiltered rows. `claimed_hw`: the
  size the header states instead of the real one (a decompression bomb's header)."""

  def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

  height, width = claimed_hw or pixels.shape[:2]
  rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(pixels.shape[0]))
  header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------------------- parity


def test_predictions_score_what_evaluation_scored(predictor, val_pairs, final_eval):
  """Done-when of issue 12: the predictor's masks of the val images score what main.py's evaluation wrote.

  One call per image with all its sentences (the image encoded once). The count and Prec@X must be equal; the
  pixel totals of oIoU equal up to one pixel and mIoU up to 1e-5 (observed: exactly equal). The two programs (the
  eval step's batch of 8 pairs, the predictor's batch of one image's sentences) may round logits differently by
  ~1e-6, which could flip a pixel lying that close to the threshold; a preprocessing difference (e.g. decoding the
  JPEGs with PIL instead of TensorFlow's decoder) changes most pairs' IoU by ~1e-4 and fails.
  """
  ious, intersection, union = [], 0, 0
  for image, pairs in _by_image(val_pairs).items():
    predictions = predictor(image, [pair["text"] for pair in pairs])
    for pair, prediction in zip(pairs, predictions):
      assert prediction.sentence == pair["text"] and prediction.mask.shape == pair["mask"].shape
      np.testing.assert_array_equal(prediction.mask, prediction.probability > predictor.threshold)
      ious.append(_iou(prediction.mask, pair["mask"]))
      intersection += int(np.sum(prediction.mask & pair["mask"]))
      union += int(np.sum(prediction.mask | pair["mask"]))
  ious = np.asarray(ious, np.float32)
  assert len(ious) == final_eval["count"] == 32
  assert abs(intersection / union - final_eval["oIoU"]) <= 1 / union
  assert abs(float(np.mean(ious)) - final_eval["mIoU"]) <= 1e-5
  for threshold in metrics.PRECISION_THRESHOLDS:
    assert float(np.mean(ious > threshold)) == final_eval[f"prec@{threshold:.1f}"]
  assert 0.0 < final_eval["mIoU"] < 1.0 and np.any((ious > 0) & (ious < 1))  # Not a vacuous comparison.


def test_integer_letterbox_and_jpeg_decoding_equal_the_pipeline(tmp_path):
  from input_pipeline import import_tensorflow  # pylint: disable=g-import-not-at-top
  from input_pipeline import preprocess  # pylint: disable=g-import-not-at-top

  tf = import_tensorflow()
  rng = np.random.default_rng(0)
  for case in range(60):
    height, width = (int(v) for v in rng.integers(1, 400, 2))
    if case % 4 == 0:  # Extreme aspects: a side of a few pixels.
      height = int(rng.integers(1, 6))
    size = int(rng.choice([64, 96, 480]))
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = preprocess.letterbox(image, np.zeros((height, width), np.uint8), size)
    canvas, resized_hw, offset = letterbox.integer_letterbox(image, size)
    np.testing.assert_array_equal(canvas, expected["image"].numpy(), err_msg=f"{height}×{width} → {size}")
    assert resized_hw == tuple(expected["resized_hw"].numpy()) and offset == tuple(expected["offset"].numpy())
  for mode in ("RGB", "L"):  # JPEGs decode as tf.io.decode_image does (JDCT_IFAST), not as PIL does.
    pixels = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", quality=85)
    expected = tf.io.decode_image(buffer.getvalue(), channels=3).numpy()
    (tmp_path / f"{mode}.jpg").write_bytes(buffer.getvalue())
    np.testing.assert_array_equal(predict.load_image(str(tmp_path / f"{mode}.jpg")), expected)


@pytest.mark.parametrize("mode", ["integer", "cris"])
def test_inverse_letterbox_is_evaluations(mode):
  """The predictor's map back to the original frame (`letterbox.inverse_geometry` + `image_ops.inverse_letterbox`)
  gives the masks whose intersection and union `metrics.eval_step_outputs` counts, in both letterbox modes."""
  rng = np.random.default_rng(4)
  size, canvas = 64, 128
  orig_hw = np.asarray([[100, 37], [9, 128], [128, 128]], np.int32)
  geometry = [letterbox.integer_geometry(h, w, size) for h, w in orig_hw]
  resized_hw = np.asarray([g[0] for g in geometry], np.int32)
  offset = np.asarray([g[1] for g in geometry], np.int32)
  logits = rng.normal(0, 2, (3, size // 4, size // 4)).astype(np.float32)
  orig_mask = rng.integers(0, 2, (3, canvas, canvas)).astype(np.uint8)
  batch = {"resized_hw": resized_hw, "offset": offset, "orig_hw": orig_hw, "orig_mask": orig_mask}
  expected = jax.jit(metrics.eval_step_outputs, static_argnums=(2, 3, 4, 5))(logits, batch, 0.35, canvas, size, mode)

  @jax.jit
  def ours(logits, resized_hw, offset, orig_hw):
    hw, top_left = letterbox.inverse_geometry(resized_hw, offset, orig_hw, size, mode, jax.numpy)
    return image_ops.inverse_letterbox(jax.nn.sigmoid(logits), hw, top_left, orig_hw, canvas, size)

  prob = np.asarray(ours(logits, resized_hw, offset, orig_hw))
  for i, (h, w) in enumerate(orig_hw):
    mask, truth = prob[i, :h, :w] > 0.35, orig_mask[i, :h, :w] != 0
    assert (np.sum(mask & truth), np.sum(mask | truth)) == (expected["intersection"][i], expected["union"][i])


# ----------------------------------------------------------------------------------------------------- inputs


def test_image_kinds(tmp_path):
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
  # EXIF orientation 6 (camera turned 90° clockwise): loaded upright, i.e. rotated 90° clockwise.
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(pixels).save(tmp_path / "plain.jpg", quality=95)
  Image.fromarray(pixels).save(tmp_path / "rotated.jpg", quality=95, exif=exif)
  upright = predict.load_image(str(tmp_path / "rotated.jpg"))
  assert upright.shape == (50, 30, 3)
  np.testing.assert_array_equal(upright, np.rot90(predict.load_image(str(tmp_path / "plain.jpg")), k=-1))
  # Grey, RGBA (alpha dropped), palette, 16-bit grey and RGB PNGs (high byte), arrays.
  grey = pixels[..., 0]
  (tmp_path / "grey.png").write_bytes(_png(grey))
  np.testing.assert_array_equal(predict.load_image(str(tmp_path / "grey.png")), np.repeat(grey[..., None], 3, 2))
  rgba = np.concatenate([pixels, rng.integers(0, 256, (30, 50, 1), dtype=np.uint8)], axis=2)
  (tmp_path / "rgba.png").write_bytes(_png(rgba))
  np.testing.assert_array_equal(predict.load_image(str(tmp_path / "rgba.png")), pixels)
  palette = Image.fromarray(pixels).quantize(8)
  np.testing.assert_array_equal(predict.load_image(palette), np.asarray(palette.convert("RGB")))
  deep = rng.integers(0, 65536, (30, 50, 3)).astype(np.uint16)
  (tmp_path / "grey16.png").write_bytes(_png(deep[..., 0]))
  assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
  np.testing.assert_array_equal(predict.load_image(str(tmp_path / "grey16.png"))[..., 1], deep[..., 0] >> 8)
  (tmp_path / "rgb16.png").write_bytes(_png16_rgb(deep))
  np.testing.assert_array_equal(predict.load_image(str(tmp_path / "rgb16.png")), (deep >> 8).astype(np.uint8))
  np.testing.assert_array_equal(predict.load_image(grey), np.repeat(grey[..., None], 3, 2))
  np.testing.assert_array_equal(predict.load_image(rgba), pixels)
  # PIL's 32-bit mode "I": 8-bit values as they are (e.g. `convert("I")` of a grey image), 16-bit ones' high byte.
  np.testing.assert_array_equal(predict.load_image(Image.fromarray(grey).convert("I"))[..., 2], grey)
  deep_i = Image.fromarray(deep[..., 0].astype(np.int32))
  assert deep_i.mode == "I" and deep[..., 0].max() > 255
  np.testing.assert_array_equal(predict.load_image(deep_i)[..., 0], deep[..., 0] >> 8)
  with pytest.raises(ValueError, match=r"mode I\) with values in \[-1, 255\]"):
    predict.load_image(Image.fromarray(np.array([[-1, 255]], np.int32)))
  # CMYK JPEG: pure cyan ink is (0, 255, 255) in RGB, up to JPEG's error.
  cmyk = Image.new("CMYK", (20, 10), (255, 0, 0, 0))
  cmyk.save(tmp_path / "cmyk.jpg", quality=95)
  loaded = predict.load_image(str(tmp_path / "cmyk.jpg")).astype(int)
  assert loaded.shape == (10, 20, 3) and np.abs(loaded - [0, 255, 255]).max() <= 8


def test_bad_inputs_name_what_is_wrong(tmp_path, monkeypatch, predictor):
  with pytest.raises(FileNotFoundError, match="missing.jpg"):
    predict.load_image(str(tmp_path / "missing.jpg"))
  with pytest.raises(ValueError, match="image path is empty"):
    predict.load_image("")
  with pytest.raises(ValueError, match=f"{tmp_path}: is a directory"):
    predict.load_image(str(tmp_path))
  with pytest.raises(ValueError, match=r"https://example.com/cat.jpg: unsupported path scheme 'https://'"):
    predict.load_image("https://example.com/cat.jpg")
  (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
  with pytest.raises(ValueError, match="broken.jpg.*not an image"):
    predict.load_image(str(tmp_path / "broken.jpg"))
  noise = _png(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
  (tmp_path / "cut.png").write_bytes(noise[: len(noise) // 2])
  with pytest.raises(ValueError, match="cut.png"):
    predict.load_image(str(tmp_path / "cut.png"))
  # A decompression bomb: the header claims 9000×9000; refused before any pixel is decoded.
  (tmp_path / "bomb.png").write_bytes(_png16_rgb(np.zeros((1, 1, 3), np.uint16), claimed_hw=(9000, 9000)))
  with pytest.raises(ValueError, match=r"bomb.png: 9000×9000 pixels is larger than"):
    predict.load_image(str(tmp_path / "bomb.png"))
  monkeypatch.setattr(predict, "MAX_PIXELS", 100)
  with pytest.raises(ValueError, match="at most 8192 pixels a side and 100 pixels"):
    predict.load_image(np.zeros((20, 20, 3), np.uint8))
  monkeypatch.undo()
  with pytest.raises(ValueError, match="must be uint8"):
    predict.load_image(np.zeros((8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"sentences\[1\] is empty"):
    predictor(np.zeros((8, 8, 3), np.uint8), ["the dog", "  "])
  # Text CLIP's cleaning empties (an HTML space, control characters): no word left, so an error too.
  for blank in ("&nbsp;", "\x00", "\x01\x02"):
    with pytest.raises(ValueError, match=r"sentences\[0\] is empty \(no word once cleaned"):
      predictor(np.zeros((8, 8, 3), np.uint8), blank)
  with pytest.raises(TypeError, match="got bytes: decode them first"):
    predictor(np.zeros((8, 8, 3), np.uint8), b"the dog")
  with pytest.raises(ValueError, match="no sentence"):
    predictor(np.zeros((8, 8, 3), np.uint8), [])


def test_checkpoint_errors(trained_tiny_workdir):
  from configs import tiny  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match="99"):
    predict.Predictor.from_checkpoint(trained_tiny_workdir.workdir, 99)
  config = tiny.get_config()
  config.model.image_size = 96
  with pytest.raises(ValueError, match="model.image_size: 64 .saved. vs 96 .given."):
    predict.Predictor.from_checkpoint(trained_tiny_workdir.workdir, config=config)


# ----------------------------------------------------------------------------------------------------- shapes


def test_buckets_and_no_recompilation(predictor):
  """Sentences are padded to SENTENCE_BUCKETS, canvases to CANVAS_BUCKETS: calls within them never compile.

  The buckets used here are those of the val images (7 or 9 sentences on 129–256 and ≤ 128 pixel canvases), so
  after the parity test this test compiles nothing.
  """
  rng = np.random.default_rng(2)
  texts = [f"the {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square", "cross", "one")]

  def call(height, width, count):
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = predictor(image, texts[:count], threshold=0.5)
    assert [p.sentence for p in out] == texts[:count]
    assert all(p.probability.shape == (height, width) and p.mask.shape == (height, width) for p in out)
    np.testing.assert_array_equal(out[-1].mask, out[-1].probability > 0.5)

  lowered = []
  listener = lambda event, duration, **kwargs: lowered.append(event)  # noqa: E731
  call(200, 150, 5)  # Warm-up: (8 sentences, canvas 256) and (16, 128).
  call(100, 60, 12)
  before = predictor.compilations
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for height, width, count in ((256, 256, 8), (130, 40, 6), (40, 250, 7), (128, 128, 9), (1, 1, 16), (7, 120, 10)):
      call(height, width, count)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert predictor.compilations == before >= 3
  assert not [event for event in lowered if "compile" in event], lowered
  assert predict.canvas_bucket(129, 3) == 256 and predict.canvas_bucket(8192, 8192) == 8192
  assert predict.sentence_chunks(21, 512) == [(0, 16, 16), (16, 21, 8)]
  assert predict.sentence_chunks(3, 8192) == [(0, 2, 2), (2, 3, 1)]  # At most two 8192² maps per call.


def test_truncation_warns_and_is_reported(predictor):
  long = "the very small red circle just left of the big blue square near the top"
  fillers = [f"thing {i}" for i in range(7)]  # 9 sentences: the bucket of 16 that the val images use.
  with pytest.warns(UserWarning, match=r"truncated to its first 6 tokens"):
    out = predictor(np.zeros((16, 16, 3), np.uint8), ["the red circle", long, *fillers])
  assert [p.truncated for p in out] == [False, True] + [False] * 7


def test_overlay():
  image = np.full((100, 80, 3), 100, np.uint8)
  a = np.zeros((100, 80), bool)
  a[60:90, 10:30] = True
  b = np.zeros((100, 80), bool)
  b[60:90, 50:70] = True
  out = visualize.overlay(image, [a, b], ["first", "second"])
  assert out.shape == image.shape and out.dtype == np.uint8
  inside = lambda mask, colour: np.round(0.5 * 100 + 0.5 * np.asarray(colour))  # noqa: E731
  np.testing.assert_array_equal(out[75, 20], inside(a, visualize.PALETTE[0]))
  np.testing.assert_array_equal(out[75, 60], inside(b, visualize.PALETTE[1]))
  np.testing.assert_array_equal(out[60, 15], visualize.PALETTE[0])  # The outline.
  np.testing.assert_array_equal(out[95, 40], [100, 100, 100])  # Neither mask nor text.
  assert np.any(out[:25] != 100)  # The sentences are written at the top.
  with pytest.raises(ValueError, match="masks but 1 sentences"):
    visualize.overlay(image, [a, b], ["one"])


# ----------------------------------------------------------------------------------------------------- CLI


def test_cli_image_writes_the_predictors_masks(trained_tiny_workdir, final_eval, predictor, val_pairs, tmp_path):
  """`python -m fcnet_jax.tools.predict --image --text …` (the command main.py prints): its mask PNGs are the
  predictor's masks (those scored against evaluation above), at the original size; overlays beside them."""
  image, pairs = next(iter(_by_image(val_pairs).items()))
  texts = [pair["text"] for pair in pairs]
  command = [
    sys.executable,
    "-m",
    "fcnet_jax.tools.predict",
    f"--checkpoint={trained_tiny_workdir.workdir}",
    f"--step={final_eval['step']}",
    f"--image={image}",
    *[f"--text={text}" for text in texts],
    f"--out={tmp_path / 'out'}",
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # The persistent compilation cache of conftest.py, shared.
  done = subprocess.run(command, cwd=train_worker.REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  stem = os.path.splitext(os.path.basename(image))[0]
  for k, prediction in enumerate(predictor(image, texts)):
    mask = np.asarray(Image.open(tmp_path / "out" / f"{stem}_{k}_mask.png"))
    assert set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask != 0, prediction.mask)
    assert Image.open(tmp_path / "out" / f"{stem}_{k}_overlay.png").size == mask.shape[::-1]
  assert Image.open(tmp_path / "out" / f"{stem}_overlay.png").size == mask.shape[::-1]
  records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
  assert [r["text"] for r in records] == texts


def test_manifest_metrics_match_evaluation(predictor, val_pairs, final_eval, tmp_path, capsys):
  lines = []
  for i, pair in enumerate(val_pairs):
    (tmp_path / f"gt{i}.png").write_bytes(_png(pair["mask"].astype(np.uint8) * 255))
    entry = {"image": os.path.relpath(pair["image"], tmp_path), "text": pair["text"], "mask": f"gt{i}.png"}
    lines.append(json.dumps(entry))
  (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
  out = tmp_path / "out"
  out.mkdir()
  result = predict_tool.predict_manifest(predictor, str(tmp_path / "m.jsonl"), out)
  printed = capsys.readouterr().out
  assert "4 images, 32 sentences in" in printed and "images/s" in printed
  scores = result["metrics"]
  assert scores["count"] == 32 and abs(scores["mIoU"] - final_eval["mIoU"]) <= 1e-5
  assert abs(scores["oIoU"] - final_eval["oIoU"]) <= 1e-4 and abs(scores["cris/mIoU"] - final_eval["cris/mIoU"]) <= 1e-5
  assert f"{100 * scores['mIoU']:.2f}" in printed and "cris/mIoU" in printed
  for record, pair in zip(result["records"], val_pairs):  # Evaluation's IoU of each pair = the written mask's.
    mask = np.asarray(Image.open(out / record["mask_png"])) != 0
    assert record["iou"] == _iou(mask, pair["mask"]), record
  assert json.loads((out / "metrics.json").read_text())["metrics"]["count"] == 32
  (tmp_path / "bad.jsonl").write_text('{"image": "x.jpg", "text": "a"}\n')
  with pytest.raises(FileNotFoundError, match="line 1: image file .*x.jpg does not exist"):
    predict_tool.read_manifest(str(tmp_path / "bad.jsonl"))
