"""Pictures of predictions: the image enlarged, the predicted boxes drawn, the texts below.

Used for TensorBoard image summaries and the `predictions.png` of `evaluate_and_report`.
Boxes are parsed from `<loc>` strings (`pali.evaluation.detection_metrics.parse_detections`):
predicted boxes in red with their label, target boxes in thin green.
"""
from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pali.evaluation.detection_metrics import parse_detections

PRED_COLOR = (230, 30, 30)
TARGET_COLOR = (30, 200, 60)
_LINE_HEIGHT = 12
_CHARS_PER_LINE_PER_PX = 1 / 6.2  # the default bitmap font is about 6 px per character


def _font():
  return ImageFont.load_default()


def _draw_boxes(draw: ImageDraw.ImageDraw, text: str, size: int, color, width: int,
                label: bool) -> int:
  objects = parse_detections(text)
  for box, name in objects:
    y1, x1, y2, x2 = (float(v) * (size - 1) for v in box)
    draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
    if label:
      draw.text((x1 + 2, max(y1 - _LINE_HEIGHT, 0)), name, fill=color, font=_font())
  return len(objects)


def draw_prediction(image: np.ndarray, *, prediction: str, target: str = "",
                    input_text: str = "", size: int = 256, max_lines: int = 6) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size + text panel, size, 3]: the image resized to `size`
  (nearest, so small synthetic images stay crisp), boxes of target and prediction, and the
  input / prediction / target texts written underneath."""
  img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  img = img.resize((size, size), Image.NEAREST)
  draw = ImageDraw.Draw(img)
  _draw_boxes(draw, target, size, TARGET_COLOR, 1, label=False)
  _draw_boxes(draw, prediction, size, PRED_COLOR, 2, label=True)

  width = max(int(size * _CHARS_PER_LINE_PER_PX), 10)
  lines = []
  for head, text in (("in", input_text), ("pred", prediction), ("target", target)):
    wrapped = textwrap.wrap(f"{head}: {text}", width=width) or [f"{head}:"]
    lines.extend(wrapped[:2])
  lines = lines[:max_lines]
  panel = Image.new("RGB", (size, _LINE_HEIGHT * max_lines + 4), (255, 255, 255))
  pdraw = ImageDraw.Draw(panel)
  for i, line in enumerate(lines):
    color = PRED_COLOR if line.startswith("pred") else (0, 0, 0)
    pdraw.text((2, 2 + i * _LINE_HEIGHT), line, fill=color, font=_font())
  out = Image.new("RGB", (size, img.height + panel.height))
  out.paste(img, (0, 0))
  out.paste(panel, (0, img.height))
  return np.asarray(out)


def grid(pictures: Sequence[np.ndarray], columns: int = 4, pad: int = 4,
         titles: Sequence[str] | None = None) -> np.ndarray:
  """Tiles equal-sized uint8 pictures into rows of `columns` (white padding); an optional
  title is written above each picture."""
  if not pictures:
    raise ValueError("grid() needs at least one picture.")
  h, w = pictures[0].shape[:2]
  title_h = _LINE_HEIGHT + 2 if titles else 0
  cols = min(columns, len(pictures))
  rows = -(-len(pictures) // cols)
  canvas = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + title_h + pad) + pad),
                     (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i, pic in enumerate(pictures):
    r, c = divmod(i, cols)
    x, y = pad + c * (w + pad), pad + r * (h + title_h + pad)
    if titles:
      draw.text((x, y), str(titles[i])[: int(w * _CHARS_PER_LINE_PER_PX)], fill=(0, 0, 0),
                font=_font())
    canvas.paste(Image.fromarray(np.asarray(pic, np.uint8)), (x, y + title_h))
  return np.asarray(canvas)


def save_png(path: str, picture: np.ndarray) -> None:
  import tensorflow as tf  # gfile: works for local paths and gs:// alike
  import io
  buf = io.BytesIO()
  Image.fromarray(np.asarray(picture, np.uint8)).save(buf, format="PNG")
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(buf.getvalue())
