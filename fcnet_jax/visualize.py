"""Pictures of predictions: masks tinted over the image, each with its sentence written in the same colour.

    overlay(image, [mask_a, mask_b], ["the red circle", "the man on the left"])  # uint8 H×W×3

Used by the predict CLI (`fcnet_jax.tools.predict`), the demo and main.py's overlays.png.
"""

from typing import Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

Color = Tuple[int, int, int]
# Distinct, saturated colours (Okabe–Ito-like order first: distinguishable with colour-vision deficiencies).
PALETTE: Tuple[Color, ...] = (
  (230, 25, 75),
  (60, 180, 75),
  (0, 130, 200),
  (245, 130, 48),
  (145, 30, 180),
  (70, 240, 240),
  (240, 50, 230),
  (255, 225, 25),
  (0, 128, 128),
  (170, 110, 40),
)
ALPHA = 0.5  # Weight of the tint on mask pixels.
BORDER = 2  # Pixels of solid colour along each mask's edge (at least 1 on small images).


def _as_masks(masks: Union[np.ndarray, Sequence[np.ndarray]], shape: Tuple[int, int]) -> np.ndarray:
  masks = np.asarray(masks)
  if masks.ndim == 2:
    masks = masks[None]
  if masks.ndim != 3 or masks.shape[1:] != shape:
    raise ValueError(f"masks must be H×W or N×H×W with H×W = {shape} (the image's), got shape {masks.shape}")
  return masks.astype(bool)


def _edge(mask: np.ndarray, width: int) -> np.ndarray:
  """Pixels of `mask` within `width` pixels of a non-mask pixel (4-neighbourhood steps)."""
  inner = mask.copy()
  for _ in range(width):
    padded = np.pad(inner, 1, constant_values=False)
    inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
  return mask & ~inner


def _font(height: int) -> ImageFont.ImageFont:
  """PIL's default font at a size that reads on the image (FreeType when available, else the bitmap font)."""
  size = int(np.clip(height // 24, 11, 48))
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError, ImportError):  # Old Pillow or no FreeType: the fixed bitmap font.
    return ImageFont.load_default()


def overlay(
  image: np.ndarray,
  masks: Union[np.ndarray, Sequence[np.ndarray]],
  sentences: Optional[Sequence[str]] = None,
  colors: Optional[Sequence[Color]] = None,
) -> np.ndarray:
  """The image with each mask tinted in its colour and outlined, and the sentences written in those colours.

  Args:
    image: uint8 H×W×3.
    masks: one H×W mask or N of them (bool, or nonzero = object).
    sentences: N sentences, written top-left one per line on a dark band (omitted when None).
    colors: N RGB colours; default `PALETTE` in order (repeating).

  Returns:
    uint8 H×W×3.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"image must be uint8 H×W×3, got {image.dtype} {image.shape}")
  masks = _as_masks(masks, image.shape[:2])
  colors = list(colors) if colors is not None else [PALETTE[i % len(PALETTE)] for i in range(len(masks))]
  if len(colors) < len(masks):
    raise ValueError(f"{len(masks)} masks but {len(colors)} colours")
  if sentences is not None and len(sentences) != len(masks):
    raise ValueError(f"{len(masks)} masks but {len(sentences)} sentences")
  out = image.astype(np.float32)
  border = max(1, min(BORDER, min(image.shape[:2]) // 100))
  for mask, color in zip(masks, colors):
    color = np.asarray(color, np.float32)
    out[mask] = (1.0 - ALPHA) * out[mask] + ALPHA * color
    out[_edge(mask, border)] = color
  out = np.clip(np.round(out), 0, 255).astype(np.uint8)
  if not sentences:
    return out
  picture = Image.fromarray(out)
  draw = ImageDraw.Draw(picture, "RGBA")
  font = _font(image.shape[0])
  x, y = 4, 4
  for sentence, color in zip(sentences, colors):
    left, top, right, bottom = draw.textbbox((x, y), sentence, font=font)
    draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(0, 0, 0, 160))
    draw.text((x, y), sentence, fill=tuple(int(c) for c in color), font=font)
    y = bottom + 6
  return np.asarray(picture.convert("RGB"), np.uint8)
