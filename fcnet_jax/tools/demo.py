"""A browser demo of a trained FCNet: pick or upload an image, type sentences, see what each one refers to.

    python -m fcnet_jax.tools.demo --checkpoint=/tmp/fcnet_demo [--step=best] [--host=127.0.0.1] [--port=7860]
        [--max_upload_mb=10] [--examples=8] [--threshold=0.35]

then open http://127.0.0.1:7860. `--checkpoint` is a training workdir or an exported model (anything
`predict.Predictor.from_checkpoint` reads). One sentence per line: each gets its own colour in the overlay
(`visualize.overlay`) and its own mask; the page also says how much of the image each mask covers and which
sentences were cut to the model's context length. The examples are held-out pairs of the model's evaluation data
(`showcase`: the `examples/` a training run writes, else read from its evaluation shards when they are on this
machine); an exported model without its data has none.

A Gradio app (docs/demo.md). Safe defaults: it listens on 127.0.0.1 only (`--host=0.0.0.0` opens it to the
network, with a warning: anyone who can reach the port can upload files and use the machine's accelerator), uploads
are capped at `--max_upload_mb` (Gradio refuses larger files before they are stored), images over the predictor's
decompression-bomb limits are refused, at most MAX_SENTENCES sentences are read per request, requests run one at a
time in a queue of at most QUEUE_SIZE, and Gradio's usage analytics are off (the page loads nothing from outside).
"""

import os
import tempfile
from typing import Any, List, Optional, Sequence, Tuple

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # Before gradio is imported: no calls home.

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from fcnet_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 10.0
MAX_SENTENCES = 8
QUEUE_SIZE = 16
IMAGE_HEIGHT = 360  # Pixels of the page the input and overlay images are shown in (scaled to fit).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
API_NAME = "segment"  # The endpoint the Gradio client calls: client.predict(image, text, api_name="/segment").
# System fonts only: Gradio's default theme would fetch its fonts from the internet.
FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
MONO_FONTS = ("ui-monospace", "monospace")


class DemoError(ValueError):
  """Something the user can fix (shown on the page as a message)."""


def parse_sentences(text: Optional[str]) -> List[str]:
  """One sentence per non-blank line of `text` (surrounding spaces removed)."""
  sentences = [line.strip() for line in (text or "").splitlines() if line.strip()]
  if not sentences:
    raise DemoError("type a sentence (one per line) describing what to segment")
  if len(sentences) > MAX_SENTENCES:
    raise DemoError(f"{len(sentences)} sentences: at most {MAX_SENTENCES} per request")
  return sentences


def segment(predictor: Any, image: Optional[str], text: Optional[str]) -> Tuple[np.ndarray, list, str]:
  """What the page shows for an image path and the typed sentences.

  Returns:
    (overlay uint8 H×W×3 with every mask tinted and its sentence written in its colour,
     [(mask uint8 H×W, 255 = object, sentence)] in sentence order,
     a Markdown summary: the model, and per sentence its colour, coverage and whether it was truncated).
  """
  from fcnet_jax import predict  # pylint: disable=g-import-not-at-top
  from fcnet_jax import visualize  # pylint: disable=g-import-not-at-top

  if not image:
    raise DemoError("upload an image or pick one of the examples")
  sentences = parse_sentences(text)
  pixels = predict.load_image(image)
  predictions = predictor(pixels, sentences)
  masks = [p.mask for p in predictions]
  picture = visualize.overlay(pixels, masks, sentences)
  colors = [visualize.PALETTE[i % len(visualize.PALETTE)] for i in range(len(masks))]
  lines = [
    f"Model: `{predictor.source}`, threshold {predictor.threshold:g}. Image {pixels.shape[1]}×{pixels.shape[0]}."
  ]
  for p, color in zip(predictions, colors):
    swatch = '<span style="color:#{:02x}{:02x}{:02x}">&#9632;</span>'.format(*color)
    note = f" (cut to the model's {predictor.context_length - 2} tokens)" if p.truncated else ""
    lines.append(f"- {swatch} “{p.sentence}”: {100 * p.mask.mean():.1f}% of the image{note}")
  gallery = [(p.mask.astype(np.uint8) * 255, p.sentence) for p in predictions]
  return picture, gallery, "\n".join(lines)


def find_examples(checkpoint: str, predictor: Any, count: int) -> List[Tuple[str, str]]:
  """(image path, sentence) of up to `count` held-out pairs of the model's evaluation data; [] when there are none.

  `<checkpoint>/examples/` (written by a training run) first; else the evaluation shards named by the model's
  config when they are on this machine (needs TensorFlow), copied to a temporary folder.
  """
  from fcnet_jax import showcase  # pylint: disable=g-import-not-at-top

  if count <= 0:
    return []
  entries = showcase.read_examples(checkpoint)
  if not entries:
    try:
      examples = showcase.held_out_examples(checkpoint, count, config=predictor.config)
    except Exception as e:  # pylint: disable=broad-except  (no TensorFlow here, shards moved, ...: no examples)
      logging.warning("No examples: the evaluation data could not be read (%s: %s)", type(e).__name__, e)
      return []
    if not examples:
      return []
    folder = os.path.join(tempfile.mkdtemp(prefix="fcnet_demo_"), showcase.EXAMPLES_DIR)
    showcase.save_examples(examples, folder)
    entries = showcase.read_examples(os.path.dirname(folder))
  return [(entry["image"], entry["text"]) for entry in entries[:count]]


def build_app(predictor: Any, examples: Sequence[Tuple[str, str]] = ()) -> Any:
  """The Gradio Blocks of the demo (not started: `launch` serves it)."""
  import gradio as gr  # pylint: disable=g-import-not-at-top

  def run(image: Optional[str], text: Optional[str]):
    try:
      return segment(predictor, image, text)
    except (ValueError, TypeError, OSError) as e:  # Bad input (DemoError, or the predictor's own checks).
      raise gr.Error(str(e)) from None

  with gr.Blocks(title="FCNet referring segmentation", analytics_enabled=False) as app:
    gr.Markdown(
      "## FCNet — referring image segmentation\n"
      f"Model: `{predictor.source}`. Upload an image (or pick an example), type one sentence per line "
      f"(at most {MAX_SENTENCES}) and press **Segment**: each sentence gets its own colour."
    )
    with gr.Row():
      with gr.Column():
        image = gr.Image(
          label="Image",
          type="filepath",
          image_mode=None,  # The file as uploaded: the predictor reads it (EXIF orientation, 16-bit, CMYK, ...).
          sources=["upload", "clipboard"],
          height=IMAGE_HEIGHT,
          elem_id="image",
        )
        text = gr.Textbox(
          label="Sentences (one per line)", lines=3, placeholder="the red circle on the left", elem_id="sentences"
        )
        button = gr.Button("Segment", variant="primary", elem_id="segment")
      with gr.Column():
        picture = gr.Image(
          label="Overlay", type="numpy", format="png", height=IMAGE_HEIGHT, interactive=False, elem_id="overlay"
        )
        masks = gr.Gallery(label="Masks", format="png", columns=4, height="auto", interactive=False, elem_id="masks")
        summary = gr.Markdown(elem_id="summary")
    if examples:
      gr.Examples(examples=[list(e) for e in examples], inputs=[image, text], label="Held-out examples")
    button.click(run, inputs=[image, text], outputs=[picture, masks, summary], api_name=API_NAME)
  app.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
  return app


def launch(
  app: Any,
  *,
  host: str = DEFAULT_HOST,
  port: Optional[int] = DEFAULT_PORT,
  max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
  allowed_paths: Sequence[str] = (),
  block: bool = True,
) -> str:
  """Serves `app` on host:port (port 0/None: a free one); returns the local URL. `block=False` returns at once
  (the server runs in a thread until `app.close()`)."""
  import gradio as gr  # pylint: disable=g-import-not-at-top

  if max_upload_mb <= 0:
    raise ValueError(f"--max_upload_mb={max_upload_mb}: must be positive")
  if host not in LOOPBACK_HOSTS:
    logging.warning(
      "--host=%s: the demo is reachable from other machines; anyone who can reach port %s can upload images and "
      "run the model (there is no authentication)",
      host,
      port,
    )
  if not port:
    import socket  # pylint: disable=g-import-not-at-top

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
      s.bind((host, 0))
      port = s.getsockname()[1]
  theme = gr.themes.Default(font=list(FONTS), font_mono=list(MONO_FONTS))
  _, url, _ = app.launch(
    server_name=host,
    server_port=int(port),
    share=False,
    max_file_size=int(max_upload_mb * 1024 * 1024),
    allowed_paths=list(allowed_paths),
    prevent_thread_lock=not block,
    ssr_mode=False,
    mcp_server=False,
    enable_monitoring=False,
    inbrowser=False,
    quiet=not block,  # Blocking (the CLI): Gradio prints the URL.
    footer_links=[],
    theme=theme,
  )
  return url


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The tool's flags; defined on demand so that tests and other tools can import this module."""
  flags.DEFINE_string("checkpoint", None, "A training workdir or an exported model directory.")
  flags.DEFINE_string("step", "best", "For a workdir: 'best', 'latest' or a step number.")
  flags.DEFINE_string("host", DEFAULT_HOST, "Address to listen on (default: this machine only). 0.0.0.0: network.")
  flags.DEFINE_integer("port", DEFAULT_PORT, "Port to listen on (0: a free one).")
  flags.DEFINE_float("max_upload_mb", DEFAULT_MAX_UPLOAD_MB, "Largest accepted upload, in MiB.")
  flags.DEFINE_integer("examples", 8, "Held-out examples offered on the page (0: none).")
  flags.DEFINE_float("threshold", None, "Mask threshold on probabilities (default: the model's config).")
  flags.mark_flags_as_required(["checkpoint"])


def main(argv: Sequence[str]) -> None:
  del argv  # Checked by cli.run.
  if FLAGS.max_upload_mb <= 0:  # Before the model loads: a bad flag fails at once.
    raise ValueError(f"--max_upload_mb={FLAGS.max_upload_mb}: must be positive")
  from fcnet_jax import predict  # pylint: disable=g-import-not-at-top

  step = int(FLAGS.step) if FLAGS.step.isdigit() else FLAGS.step
  predictor = predict.Predictor.from_checkpoint(FLAGS.checkpoint, step, threshold=FLAGS.threshold)
  examples = find_examples(FLAGS.checkpoint, predictor, FLAGS.examples)
  app = build_app(predictor, examples)
  print(f"FCNet demo of {predictor.source}: {len(examples)} examples", flush=True)
  launch(
    app,
    host=FLAGS.host,
    port=FLAGS.port,
    max_upload_mb=FLAGS.max_upload_mb,
    allowed_paths=sorted({os.path.dirname(path) for path, _ in examples}),
    block=True,
  )


def run() -> None:
  """Console entry point (python -m fcnet_jax.tools.demo)."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()
