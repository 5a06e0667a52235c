"""The browser demo (fcnet_jax/tools/demo.py) and what a training run shows at its end (fcnet_jax/showcase.py).

On conftest.py's `trained_tiny_workdir`, with its real Predictor:
  - the Gradio server, started in this process on a free loopback port, driven through `gradio_client`: the mask
    and overlay it returns equal the Predictor's and `visualize.overlay`'s for the same image and sentences; a bad
    request gets a clear message; an upload over the cap is refused (HTTP 413); it listens on 127.0.0.1;
  - the same server in real headless Chromium (Debian's `chromium`, driven by Playwright; every request to a
    non-loopback address is aborted and counted): upload an image, type a sentence, press Segment, read the output
    image back from its `src` and compare it with the Predictor's overlay;
  - `showcase.write_overlays` / `next_steps` on a copy of the workdir: the grid's layout and panels, the examples
    it saves, and the printed predict command run as printed, writing the Predictor's mask.
"""

import glob
import io
import os
import shlex
import subprocess
import sys
import urllib.parse
import urllib.request

import numpy as np
from PIL import Image
import pytest

import train_worker

# pycocotools / TensorFlow-era libraries warn under NumPy 2; Gradio warns about its own deprecations.
pytestmark = [
  pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
  pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

UPLOAD_MB = 0.25  # A small cap, so that the test's oversized upload stays small.
CHROMIUM = "/usr/bin/chromium"
# The flags Chromium needs as root in a closed network (no sandbox, no calls home).
CHROMIUM_ARGS = (
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
)
TIMEOUT_MS = 60_000  # Any one browser wait.


def _png(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def served(trained_tiny_workdir):
  """The demo of the trained tiny model, serving in a thread; closed after the module's tests."""
  from fcnet_jax import predict
  from fcnet_jax.tools import demo

  workdir = trained_tiny_workdir.workdir
  predictor = predict.Predictor.from_checkpoint(workdir)
  examples = demo.find_examples(workdir, predictor, 2)
  # A 4-step model puts nearly every pixel above config.mask_threshold; at the median probability of the first
  # example its masks have edges to compare.
  predictor.threshold = float(np.median(predictor(examples[0][0], examples[0][1])[0].probability))
  app = demo.build_app(predictor, examples)
  url = demo.launch(
    app,
    port=0,
    max_upload_mb=UPLOAD_MB,
    allowed_paths=sorted({os.path.dirname(path) for path, _ in examples}),
    block=False,
  )
  try:
    yield {"url": url, "app": app, "predictor": predictor, "examples": examples, "workdir": workdir}
  finally:
    app.close()


def _expected(predictor, image_path, sentences):
  from fcnet_jax import predict
  from fcnet_jax import visualize

  pixels = predict.load_image(image_path)
  masks = [p.mask for p in predictor(pixels, sentences)]
  return masks, visualize.overlay(pixels, masks, sentences)


# ------------------------------------------------------------------------------------------------------------
# The server through the Gradio client.


def test_examples_come_from_the_evaluation_data(served):
  examples = served["examples"]
  assert len(examples) == 2
  for path, sentence in examples:
    assert os.path.isfile(path) and sentence.strip()
  # Held-out pairs: the sentences of the first evaluation split, one per image, in shard order.
  from fcnet_jax import showcase

  held_out = showcase.held_out_examples(served["workdir"], 2, config=served["predictor"].config)
  assert [e.sentence for e in held_out] == [s for _, s in examples]
  for (path, _), example in zip(examples, held_out):
    with open(path, "rb") as f:
      assert f.read() == example.encoded


def test_client_gets_the_predictor_masks_and_overlay(served, tmp_path):
  import gradio_client

  from fcnet_jax.tools import demo

  image, sentence = served["examples"][0]
  other = "the large thing\n\n  the blue one  "  # Blank lines and spaces are dropped.
  client = gradio_client.Client(served["url"], verbose=False, download_files=str(tmp_path))
  for text, sentences in ((sentence, [sentence]), (other, ["the large thing", "the blue one"])):
    overlay_file, gallery, summary = client.predict(
      gradio_client.handle_file(image), text, api_name=f"/{demo.API_NAME}"
    )
    masks, overlay = _expected(served["predictor"], image, sentences)
    np.testing.assert_array_equal(np.asarray(Image.open(overlay_file).convert("RGB")), overlay)
    assert [item["caption"] for item in gallery] == sentences
    for item, mask in zip(gallery, masks):
      returned = np.asarray(Image.open(item["image"]).convert("L"))
      assert set(np.unique(returned)) <= {0, 255}
      np.testing.assert_array_equal(returned == 255, mask)
      assert 0 < mask.mean() < 1  # Not trivially all or nothing (the threshold is the median of the first).
    for s, mask in zip(sentences, masks):
      assert f"“{s}”: {100 * mask.mean():.1f}% of the image" in summary
  assert len(masks) == 2 and not np.array_equal(overlay, _expected(served["predictor"], image, sentences[:1])[1])


def test_client_bad_requests_get_clear_messages(served):
  import gradio_client

  from fcnet_jax.tools import demo

  client = gradio_client.Client(served["url"], verbose=False)
  image = served["examples"][0][0]
  cases = (
    ("   \n ", "type a sentence"),
    ("\n".join(f"shape {i}" for i in range(demo.MAX_SENTENCES + 1)), f"at most {demo.MAX_SENTENCES}"),
  )
  for text, message in cases:
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
      client.predict(gradio_client.handle_file(image), text, api_name=f"/{demo.API_NAME}")


def test_listens_on_loopback_and_caps_uploads(served):
  import httpx

  from fcnet_jax.tools import demo

  assert demo.DEFAULT_HOST == "127.0.0.1"
  assert urllib.parse.urlparse(served["url"]).hostname == "127.0.0.1"
  assert served["app"].server_name == "127.0.0.1"
  cap = int(UPLOAD_MB * 1024 * 1024)
  assert served["app"].max_file_size == cap
  upload = served["url"].rstrip("/") + "/gradio_api/upload"
  small = httpx.post(upload, files={"files": ("ok.png", b"x" * 1000)}, timeout=30)
  assert small.status_code == 200, small.text
  big = httpx.post(upload, files={"files": ("big.png", b"x" * (cap + 1))}, timeout=30)
  assert big.status_code == 413 and "maximum allowed size" in big.text


def test_cli_defaults_and_bad_flags():
  command = [sys.executable, "-m", "fcnet_jax.tools.demo"]
  env = train_worker.subprocess_env()
  shown = subprocess.run(command + ["--helpshort"], capture_output=True, text=True, timeout=120, env=env)
  assert "--host: Address to listen on" in shown.stdout and "(default: '127.0.0.1')" in shown.stdout, shown.stdout
  assert "--max_upload_mb" in shown.stdout and "(default: '10.0')" in shown.stdout
  bad = subprocess.run(
    command + ["--checkpoint=/nonexistent", "--max_upload_mb=0"], capture_output=True, text=True, timeout=120, env=env
  )
  assert bad.returncode == 1 and "--max_upload_mb=0.0: must be positive" in bad.stderr, bad.stderr


# ------------------------------------------------------------------------------------------------------------
# The page in a real browser.


def test_browser_upload_type_submit_and_read_the_overlay(served):
  from playwright.sync_api import sync_playwright

  if not os.path.exists(CHROMIUM):
    pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (`apt-get install -y chromium`, as .ci/run does)")
  image, sentence = served["examples"][0]
  masks, overlay = _expected(served["predictor"], image, [sentence])
  outside = []

  def only_loopback(route):
    host = urllib.parse.urlparse(route.request.url).hostname
    if host in ("127.0.0.1", "localhost") or route.request.url.startswith(("data:", "blob:")):
      route.continue_()
    else:
      outside.append(route.request.url)
      route.abort()

  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS), timeout=TIMEOUT_MS)
    try:
      page = browser.new_page()
      page.set_default_timeout(TIMEOUT_MS)
      page.route("**/*", only_loopback)
      page.goto(served["url"])
      page.locator("#image input[type=file]").set_input_files(image)
      page.locator("#image img").wait_for()  # The upload finished: the preview shows.
      page.locator("#sentences textarea").fill(sentence)
      page.locator("#segment").click()
      output = page.locator("#overlay img")
      output.wait_for()
      src = output.get_attribute("src")
      gallery = page.locator("#masks img")
      gallery.first.wait_for()
      captions = page.locator("#summary").inner_text()
    finally:
      browser.close()
  with urllib.request.urlopen(urllib.parse.urljoin(served["url"], src), timeout=30) as response:
    np.testing.assert_array_equal(_png(response.read()), overlay)
  assert sentence in captions and f"{100 * masks[0].mean():.1f}% of the image" in captions
  assert not outside, f"the page asked for non-loopback addresses: {outside[:5]}"


# ------------------------------------------------------------------------------------------------------------
# The end of a training run: overlays.png and the printed commands.


def test_write_overlays_and_next_steps_run_as_printed(served, trained_tiny_workdir, tmp_path):
  from fcnet_jax import showcase
  from fcnet_jax import visualize

  workdir = train_worker.copy_workdir(trained_tiny_workdir, str(tmp_path / "run"))
  predictor = served["predictor"]
  count = 3
  text = showcase.after_training(workdir, count=count, predictor=predictor)
  grid = np.asarray(Image.open(os.path.join(workdir, showcase.OVERLAYS_FILE)).convert("RGB"))
  cell, gap = showcase.CELL, showcase.GAP
  assert grid.shape == (showcase.HEADER + count * (cell + showcase.CAPTION), 3 * cell + 4 * gap, 3)

  entries = showcase.read_examples(workdir)
  examples = showcase.held_out_examples(workdir, count, config=predictor.config)
  assert [e["text"] for e in entries] == [e.sentence for e in examples]
  for row, (entry, example) in enumerate(zip(entries, examples)):
    np.testing.assert_array_equal(np.asarray(Image.open(entry["mask"])) == 255, example.mask)
    predicted = predictor(example.image, example.sentence)[0].mask
    top = showcase.HEADER + row * (cell + showcase.CAPTION)
    panels = (
      example.image,
      visualize.overlay(example.image, [example.mask], colors=[showcase.GROUND_TRUTH_COLOR]),
      visualize.overlay(example.image, [predicted], colors=[showcase.PREDICTION_COLOR]),
    )
    for column, panel in enumerate(panels):
      left = gap + column * (cell + gap)
      np.testing.assert_array_equal(grid[top : top + cell, left : left + cell], np.asarray(showcase._fit(panel)))

  assert text == showcase.next_steps(workdir) and "overlays.png" in text
  assert f"{shlex.quote(sys.executable)} -m fcnet_jax.tools.demo --checkpoint={workdir}" in text
  command = next(line for line in text.splitlines() if "fcnet_jax.tools.predict" in line)
  args = shlex.split(command)
  image = next(a.split("=", 1)[1] for a in args if a.startswith("--image="))
  sentence = next(a.split("=", 1)[1] for a in args if a.startswith("--text="))
  out = next(a.split("=", 1)[1] for a in args if a.startswith("--out="))
  assert sentence == entries[0]["text"] and open(image, "rb").read() == open(entries[0]["image"], "rb").read()
  log = str(tmp_path / "predict.log")
  # As printed, plus the fixture's threshold (at the config's, a 4-step model's mask is the whole image).
  # This process's environment: the same XLA flags, so the predictor's programs come from the compilation cache.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  train_worker.run_checked(args + [f"--threshold={predictor.threshold!r}"], log, 300, env=env)
  written = sorted(glob.glob(os.path.join(out, "*_mask.png")))
  assert len(written) == 1, os.listdir(out)
  expected = predictor(image, sentence)[0].mask
  assert 0 < expected.mean() < 1
  np.testing.assert_array_equal(np.asarray(Image.open(written[0])) > 127, expected)


def test_without_evaluation_data_no_examples_and_placeholder_commands(served, tmp_path):
  import copy
  import types

  from fcnet_jax import showcase
  from fcnet_jax.tools import demo

  config = copy.deepcopy(served["predictor"].config)
  config.data.tfrecord_dir, config.data.synthetic = str(tmp_path / "moved"), True
  assert demo.find_examples(str(tmp_path), types.SimpleNamespace(config=config), 8) == []
  text = showcase.next_steps(str(tmp_path))
  assert "--image=YOUR_IMAGE.jpg" in text and "--manifest" not in text and "overlays.png" not in text
