"""Referring segmentation of your own images: `Predictor` (docs/predict.md).

    predictor = Predictor.from_checkpoint("/tmp/fcnet_demo")          # a training workdir or an exported model
    for p in predictor("photo.jpg", ["the man on the left", "the dog"]):
      p.sentence, p.probability, p.mask, p.truncated                   # H×W float32, H×W bool at the image's size

What happens to an input is what evaluation does to a (image, sentence) pair of the converted data:
  1. `load_image`: the file (or PIL image, or uint8 array) → uint8 H×W×3 RGB; an EXIF-rotated photo is turned
     upright first, and the masks come back in that upright frame (the dataset converter, by contrast, keeps
     COCO's stored frame, which the COCO annotations are drawn in).
  2. the letterbox the checkpoint was trained with (config.data.letterbox; `letterbox.letterbox_image`, equal bit
     for bit to the input pipeline's) and tokenization as in training (`tokenizer.tokenize` at the context length:
     a longer sentence is cut, with a warning, and `Prediction.truncated`).
  3. on the device: the image encoder and the vision neck ONCE for all sentences of the image (`FCNet.encode_image`,
     `neck_features`), then per sentence the text encoder, EGM/ECM and decoder (`encode_text`, `fuse_language`,
     `decode`), the sigmoid, and the inverse letterbox of evaluation (`image_ops.inverse_letterbox`) to the
     original resolution; threshold
     config.mask_threshold (strict `>`, as evaluation), overridable.

Shapes are bucketed so that repeated calls do not recompile: sentences are padded to a count in
`SENTENCE_BUCKETS` (more are run in chunks), the original-frame canvas to a side in `CANVAS_BUCKETS`; the image
batch is always 1. The model compiles once per sentence bucket, the inverse letterbox (a small program) once per
(sentence bucket, canvas bucket). `Predictor.compilations` counts the compiled programs.

Images larger than `MAX_SIDE` pixels a side or `MAX_PIXELS` pixels (decompression-bomb limits) are refused.
This module imports without TensorFlow, clu or ml_collections at module level.
"""

import dataclasses
import functools
import io
import os
from typing import Any, List, Optional, Sequence, Tuple, Union
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageOps

from fcnet_jax import fileio
from fcnet_jax import image_ops
from fcnet_jax import letterbox
from fcnet_jax import sharding
from fcnet_jax import tokenizer
from fcnet_jax.models import fcnet

MAX_SIDE = 8192  # Longest accepted image side, pixels.
MAX_PIXELS = 40_000_000  # Accepted pixels (h·w); larger files are refused before decoding (decompression bombs).
SENTENCE_BUCKETS = (1, 2, 4, 8, 16)  # Sentence batches are padded to one of these; more run in chunks.
# Sides of the original-frame canvas the inverse letterbox writes (the image at its top-left).
CANVAS_BUCKETS = (128, 256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192)
MAX_CANVAS_ELEMENTS = 1 << 27  # Sentences × canvas² per device call (512 MiB of float32): big images take fewer.

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


@dataclasses.dataclass
class Prediction:
  """The model's answer for one sentence, at the image's original resolution (upright frame).

  Attributes:
    sentence: the sentence as given.
    probability: H×W float32 sigmoid probabilities.
    mask: H×W bool, probability > threshold.
    truncated: the sentence had more tokens than the context length and was cut (as in training).
    logits: P×P float32 logits in the letterboxed frame (P = image_size / 4), the model's raw output.
  """

  sentence: str
  probability: np.ndarray
  mask: np.ndarray
  truncated: bool
  logits: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)


# ----------------------------------------------------------------------------------------------------- images


def _name(image: Any) -> str:
  return str(image) if isinstance(image, (str, os.PathLike)) else f"the {type(image).__name__} image"


def _check_size(height: int, width: int, name: str) -> None:
  if height < 1 or width < 1:
    raise ValueError(f"{name}: empty image ({height}×{width})")
  if max(height, width) > MAX_SIDE or height * width > MAX_PIXELS:
    raise ValueError(
      f"{name}: {width}×{height} pixels is larger than fcnet_jax.predict accepts (at most {MAX_SIDE} pixels a "
      f"side and {MAX_PIXELS:,} pixels, a decompression-bomb limit); downscale it first"
    )


def _decode_jpeg_as_tensorflow(data: bytes, image: Image.Image) -> Optional[Image.Image]:
  """The JPEG's pixels as `tf.io.decode_image` gives them (libjpeg-turbo, JDCT_IFAST, fancy upsampling), in a PIL
  image carrying the file's EXIF; None where that decoder is missing or the JPEG is CMYK/YCCK (PIL decodes it).

  Training and evaluation decoded with TensorFlow, whose default DCT differs from PIL's by a few levels per pixel;
  decoding the same way makes a prediction equal what evaluation computes for the same file.
  """
  if image.format != "JPEG" or image.mode not in ("L", "RGB"):
    return None
  try:
    import simplejpeg  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  try:
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False, strict=False)
  except ValueError:
    return None  # PIL's decoder reports what is wrong.
  decoded = Image.fromarray(pixels)
  decoded.info.update({k: v for k, v in image.info.items() if k in ("exif", "xmp", "XML:com.adobe.xmp")})
  return decoded


def _open(path: Union[str, os.PathLike]) -> Image.Image:
  if not os.fspath(path).strip():
    raise ValueError("the image path is empty")
  file = fileio.as_path(path)
  if not file.exists():
    raise FileNotFoundError(f"{path}: no such image file")
  if file.is_dir():
    raise ValueError(f"{path}: is a directory, not an image file")
  data = file.read_bytes()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Our own limits below are stricter.
      image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise ValueError(f"{path}: refused as a decompression bomb ({e})") from e
  except (Image.UnidentifiedImageError, OSError) as e:
    raise ValueError(f"{path}: not an image file PIL can read ({type(e).__name__}: {e})") from e
  _check_size(image.height, image.width, str(path))
  decoded = _decode_jpeg_as_tensorflow(data, image)
  if decoded is not None:
    return decoded
  try:
    image.load()
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f"{path}: the image data is corrupt or truncated ({type(e).__name__}: {e})") from e
  return image


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
  """uint8 H×W×3 of any PIL mode: 16 bits cut to their high byte (PIL's and libpng's 16 → 8 for RGB; TensorFlow
  strips the same way), alpha dropped (as TensorFlow's decoder), CMYK and palettes converted by PIL.

  PIL's 32-bit integer mode "I" has no fixed depth (an int32 array, `convert("I")`, a 32-bit TIFF): values within
  0…255 are 8-bit grey as they are (PIL's own reading), values up to 65535 are 16-bit, anything else is refused.
  """
  if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey: the high byte, as PIL does for RGB.
    grey = (np.asarray(image, np.int64) >> 8).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)
  if image.mode == "I":
    values = np.asarray(image, np.int64)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > 65535:
      raise ValueError(
        f"{name}: a 32-bit integer image (PIL mode I) with values in [{low}, {high}] has no 8- or 16-bit reading; "
        "save it as 8-bit RGB"
      )
    grey = (values if high <= 255 else values >> 8).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)
  if image.mode == "F":
    raise ValueError(f"{name}: floating-point images (PIL mode F) are not supported; save it as 8-bit RGB")
  if image.mode in ("P", "PA"):  # A palette may carry transparency: expand it, then drop alpha.
    image = image.convert("RGBA")
  return np.asarray(image.convert("RGB"), np.uint8)


def load_image(image: ImageLike) -> np.ndarray:
  """An image as uint8 H×W×3 RGB, upright, ready for the predictor.

  Args:
    image: a path (local or gs://), a PIL image or a uint8 array (H×W×3, H×W, H×W×1 or H×W×4). Files and PIL
      images are turned upright by their EXIF orientation; grey, palette, RGBA (alpha dropped), CMYK and 16-bit
      grey images become 8-bit RGB.

  Raises:
    FileNotFoundError: the path does not exist.
    ValueError: an empty path, a directory, a URL scheme other than gs://, an unreadable or corrupt file, an
      unsupported array or PIL mode, or larger than `MAX_SIDE` / `MAX_PIXELS`.
    TypeError: not one of the accepted kinds.
  """
  name = _name(image)
  if isinstance(image, (str, os.PathLike)):
    image = _open(image)
  if isinstance(image, Image.Image):
    _check_size(image.height, image.width, name)
    return np.ascontiguousarray(_pil_to_rgb(ImageOps.exif_transpose(image), name))
  if not isinstance(image, np.ndarray):
    raise TypeError(f"image must be a path, a PIL image or a uint8 NumPy array, got {type(image).__name__}")
  if image.dtype != np.uint8:
    raise ValueError(f"image array must be uint8 (0…255), got {image.dtype}; convert it first")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
    raise ValueError(f"image array must be H×W×3 (or H×W, H×W×1, H×W×4), got shape {image.shape}")
  _check_size(image.shape[0], image.shape[1], name)
  if image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  return np.ascontiguousarray(image[..., :3])


def tokenize_sentences(
  sentences: Union[str, Sequence[str]], context_length: int, *, stacklevel: int = 2
) -> Tuple[List[str], np.ndarray, List[bool]]:
  """(sentences, N×L int32 tokens, truncated flags) as training tokenizes them; warns about truncated sentences.

  A sentence with no token once cleaned as CLIP cleans text (empty, blank, "&nbsp;", control characters) is an
  error: the model would segment for [SOS][EOS] alone.
  """
  if isinstance(sentences, str):
    sentences = [sentences]
  elif isinstance(sentences, (bytes, bytearray)):
    raise TypeError("sentences must be a str or a list of str, got bytes: decode them first")
  elif isinstance(sentences, np.ndarray) and sentences.ndim == 0:
    sentences = [sentences.item()]
  sentences = list(sentences)
  if not sentences:
    raise ValueError("no sentence given: pass a string or a non-empty list of strings")
  for i, sentence in enumerate(sentences):
    if not isinstance(sentence, str):
      raise TypeError(f"sentences[{i}] must be a str, got {type(sentence).__name__}: {sentence!r:.80}")
  capacity = context_length - 2  # [SOS] … [EOS].
  lengths = [len(ids) for ids in tokenizer.encode_batch(sentences)]
  for i, (sentence, n) in enumerate(zip(sentences, lengths)):
    if n == 0:
      raise ValueError(f"sentences[{i}] is empty (no word once cleaned as CLIP cleans text): {sentence!r:.80}")
  truncated = [n > capacity for n in lengths]
  for sentence, n, cut in zip(sentences, lengths, truncated):
    if cut:
      warnings.warn(
        f"sentence {sentence!r:.120} has {n} tokens, more than the {capacity} the model reads (context length "
        f"{context_length}); it is truncated to its first {capacity} tokens, as in training",
        stacklevel=stacklevel + 1,
      )
  return sentences, tokenizer.tokenize(sentences, context_length), truncated


def canvas_bucket(height: int, width: int) -> int:
  """The side of the original-frame canvas for an h×w image: the smallest `CANVAS_BUCKETS` entry holding it."""
  side = max(height, width)
  for bucket in CANVAS_BUCKETS:
    if side <= bucket:
      return bucket
  raise ValueError(f"image side {side} exceeds the largest canvas {CANVAS_BUCKETS[-1]} (MAX_SIDE = {MAX_SIDE})")


def sentence_chunks(count: int, canvas: int) -> List[Tuple[int, int, int]]:
  """(start, stop, padded size) of the device calls for `count` sentences on a `canvas`-sided output."""
  fits = max(1, MAX_CANVAS_ELEMENTS // (canvas * canvas))
  largest = max([b for b in SENTENCE_BUCKETS if b <= fits] or [1])
  chunks = []
  for start in range(0, count, largest):
    size = min(largest, count - start)
    chunks.append((start, start + size, min(b for b in SENTENCE_BUCKETS if b >= size)))
  return chunks


# ----------------------------------------------------------------------------------------------------- device


def _variables(state: Any) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def _encode_image(state: Any, image: jax.Array, *, model: fcnet.FCNet) -> jax.Array:
  """1×S×S×3 uint8 letterboxed image → F_v, the vision neck's output (normalized on the device, as training): all
  of the model that does not depend on the sentence, computed once per image."""
  images = image_ops.normalize_images(image, fcnet.DTYPES[model.dtype])
  variables = _variables(state)
  features = model.apply(variables, images, method=fcnet.FCNet.encode_image)
  return model.apply(variables, *features, method=fcnet.FCNet.neck_features)


def _decode(state: Any, f_v: jax.Array, tokens: jax.Array, *, model: fcnet.FCNet) -> jax.Array:
  """N sentences about one encoded image → N×P×P logits (text encoder, EGM/ECM, decoder; F_v is shared by the N
  sentences)."""
  variables = _variables(state)
  f_v = jnp.broadcast_to(f_v, (tokens.shape[0], *f_v.shape[1:]))
  text = model.apply(variables, tokens, method=fcnet.FCNet.encode_text)
  fused = model.apply(variables, f_v, *text, method=fcnet.FCNet.fuse_language)
  return model.apply(variables, *fused, method=fcnet.FCNet.decode)


def _to_original(logits: jax.Array, geometry: jax.Array, *, image_size: int, canvas: int, letterbox_mode: str):
  """N×P×P logits → N×K×K probabilities in the original frame (evaluation's sigmoid and inverse letterbox).

  `geometry` is int32 [resized h, w, top, left, h, w] of the image. A separate program from `_decode`, so that a
  new canvas size compiles only this cheap map, not the model.
  """
  geometry = jnp.broadcast_to(geometry, (logits.shape[0], 6))
  orig_hw = geometry[:, 4:]
  resized_hw, offset = letterbox.inverse_geometry(
    geometry[:, :2], geometry[:, 2:4], orig_hw, image_size, letterbox_mode, jnp
  )
  prob = jax.nn.sigmoid(logits.astype(jnp.float32))
  return image_ops.inverse_letterbox(prob, resized_hw, offset, orig_hw, canvas, image_size)


# ----------------------------------------------------------------------------------------------------- API


class Predictor:
  """A trained FCNet that segments what sentences refer to in an image (module docstring)."""

  def __init__(self, loaded: Any, threshold: Optional[float] = None):
    """`loaded`: a `pretrained.Loaded` (`pretrained.load`); threshold: default config.mask_threshold."""
    self.config, self.model = loaded.config, loaded.model
    self.step, self.source = loaded.step, loaded.source
    self.threshold = float(self.config.mask_threshold if threshold is None else threshold)
    self.letterbox_mode = letterbox.check_mode(self.config.data.letterbox)
    self._state, self._mesh = loaded.state, loaded.mesh
    replicated = sharding.replicated_sharding(loaded.mesh)
    self._traces = 0
    self._encode = jax.jit(
      self._counted(functools.partial(_encode_image, model=self.model)),
      in_shardings=replicated,
      out_shardings=replicated,
    )
    self._decode = jax.jit(self._counted(functools.partial(_decode, model=self.model)), out_shardings=replicated)
    self._to_original = jax.jit(
      self._counted(functools.partial(_to_original, image_size=self.image_size, letterbox_mode=self.letterbox_mode)),
      static_argnames=("canvas",),
      out_shardings=replicated,
    )

  def _counted(self, function: Any) -> Any:
    """`function`, counting its traces: jit traces a function once per new input signature, then compiles it."""

    @functools.wraps(function)
    def traced(*args, **kwargs):
      self._traces += 1
      return function(*args, **kwargs)

    return traced

  @classmethod
  def from_checkpoint(
    cls,
    path: fileio.PathLike,
    step: Union[str, int] = "best",
    *,
    config: Any = None,
    threshold: Optional[float] = None,
  ) -> "Predictor":
    """The predictor of a training workdir ("best", "latest" or a step number) or an exported model directory.

    `config` is needed only for workdirs written before config.json existed; when both exist they must agree
    (`pretrained.load` names the fields that differ). Runs on the first local device.
    """
    from fcnet_jax import pretrained  # pylint: disable=g-import-not-at-top  (orbax: only when loading)

    mesh = sharding.create_mesh(jax.local_devices()[:1])
    return cls(pretrained.load(path, step, config=config, mesh=mesh), threshold=threshold)

  @property
  def image_size(self) -> int:
    return int(self.model.image_size)

  @property
  def context_length(self) -> int:
    return int(self.model.context_length)

  @property
  def compilations(self) -> int:
    """Programs compiled so far for this predictor: its jitted functions' traces (each new shape traces once)."""
    return self._traces

  def tokenize(self, sentences: Union[str, Sequence[str]]) -> Tuple[List[str], np.ndarray, List[bool]]:
    """(sentences, N×L int32 tokens, truncated flags) as training tokenizes; warns about truncated sentences."""
    return tokenize_sentences(sentences, self.context_length, stacklevel=3)

  def __call__(
    self, image: ImageLike, sentences: Union[str, Sequence[str]], *, threshold: Optional[float] = None
  ) -> List[Prediction]:
    """One `Prediction` per sentence about `image` (see `load_image` for what an image may be)."""
    threshold = self.threshold if threshold is None else float(threshold)
    sentences, tokens, truncated = self.tokenize(sentences)
    pixels = load_image(image)
    height, width = pixels.shape[:2]
    canvas_image, resized_hw, offset = letterbox.letterbox_image(pixels, self.image_size, self.letterbox_mode)
    geometry = np.asarray([*resized_hw, *offset, height, width], np.int32)
    canvas = canvas_bucket(height, width)
    with sharding.use_mesh(self._mesh):
      features = self._encode(self._state, canvas_image[None])
      predictions = []
      for start, stop, padded in sentence_chunks(len(sentences), canvas):
        chunk = np.zeros((padded, self.context_length), np.int32)
        chunk[: stop - start] = tokens[start:stop]
        chunk[stop - start :] = tokens[start]  # Padding rows repeat a real sentence; their output is dropped.
        logits = self._decode(self._state, features, chunk)
        logits, prob = jax.device_get((logits, self._to_original(logits, geometry, canvas=canvas)))
        for row, i in enumerate(range(start, stop)):
          probability = np.ascontiguousarray(prob[row, :height, :width])
          predictions.append(
            Prediction(sentences[i], probability, probability > threshold, truncated[i], np.asarray(logits[row]))
          )
    return predictions
