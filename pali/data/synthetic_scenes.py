"""Shapes scenes: 1-4 coloured shapes on varied backgrounds, with boxes, class names, a
caption and counting / colour questions. Deterministic: example `i` of a split is a pure
function of (split, i); the train and validation splits never share a scene (a scene belongs
to the split given by a hash of its description, and is redrawn until it matches).

Rendering uses Pillow at the requested size (the stage resolution), so no resize is needed.
"""
import functools
import hashlib
import math
from typing import Any, Dict, List, Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220),
    "yellow": (240, 220, 30), "orange": (250, 140, 20), "purple": (140, 40, 180),
    "pink": (250, 120, 190), "cyan": (30, 210, 220),
}
COLOR_NAMES = tuple(COLORS)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
SPLIT_IDS = {"train": 0, "validation": 1}
VALIDATION_PERCENT = 5
MAX_SHAPES = 4
_SEED = 20240607


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> List[tuple]:
  if kind == "square":
    n, radii, a0 = 4, [r], math.pi / 4
  elif kind == "diamond":
    n, radii, a0 = 4, [r], 0.0
  elif kind == "triangle":
    n, radii, a0 = 3, [r], -math.pi / 2
  elif kind == "hexagon":
    n, radii, a0 = 6, [r], 0.0
  elif kind == "star":
    n, radii, a0 = 10, [r, 0.45 * r], -math.pi / 2
  else:
    raise ValueError(kind)
  pts = []
  for k in range(n):
    a = a0 + angle + 2 * math.pi * k / n
    rr = radii[k % len(radii)]
    pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
  return pts


def _outline(obj: Dict[str, Any]) -> List[tuple]:
  if obj["shape"] == "circle":
    cx, cy, r = obj["cx"], obj["cy"], obj["r"]
    return [(cx - r, cy - r), (cx + r, cy + r)]
  return _polygon(obj["shape"], obj["cx"], obj["cy"], obj["r"], obj["angle"])


def _box(obj) -> List[float]:
  pts = np.array(_outline(obj))
  (xmin, ymin), (xmax, ymax) = pts.min(0), pts.max(0)
  return [float(np.clip(v, 0, 1)) for v in (ymin, xmin, ymax, xmax)]


def _iou(a, b) -> float:
  ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ih * iw
  area = lambda x: (x[2] - x[0]) * (x[3] - x[1])
  return inter / max(1e-9, area(a) + area(b) - inter)


def _draw_spec(rng: np.random.Generator, max_shapes: int = MAX_SHAPES) -> Dict[str, Any]:
  n = int(rng.integers(1, max_shapes + 1))
  bg = [int(v) for v in rng.integers(60, 200) + rng.integers(-25, 26, size=3)]
  spec = {"bg": bg, "bg_kind": int(rng.integers(0, 3)),  # 0 plain, 1 gradient, 2 noise
          "bg2": [int(v) for v in rng.integers(40, 220, size=3)],
          "noise": float(rng.uniform(0, 12)), "noise_seed": int(rng.integers(1 << 30)),
          "objects": []}
  for _ in range(n):
    for _attempt in range(20):
      r = float(rng.uniform(0.07, 0.2))
      obj = {"shape": SHAPES[int(rng.integers(len(SHAPES)))],
             "color": COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))],
             "cx": float(rng.uniform(r, 1 - r)), "cy": float(rng.uniform(r, 1 - r)), "r": r,
             "angle": float(rng.uniform(-0.3, 0.3))}
      obj["box"] = _box(obj)
      if all(_iou(obj["box"], o["box"]) < 0.1 for o in spec["objects"]):
        spec["objects"].append(obj)
        break
  return spec


def _spec_split(spec) -> str:
  key = repr([(o["shape"], o["color"], round(o["cx"], 4), round(o["cy"], 4), round(o["r"], 4))
              for o in spec["objects"]]) + repr(spec["bg"])
  h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
  return "validation" if h % 100 < VALIDATION_PERCENT else "train"


def scene_spec(split: str, index: int, max_shapes: int = MAX_SHAPES) -> Dict[str, Any]:
  """The description of scene `index` of `split` (deterministic); 1 to `max_shapes` shapes."""
  rng = np.random.default_rng([_SEED, SPLIT_IDS[split], int(index)])
  while True:
    spec = _draw_spec(rng, max_shapes)
    if _spec_split(spec) == split:
      spec["rng_q"] = int(rng.integers(1 << 30))
      return spec


def _relation(a, b) -> str:
  dy, dx = b["cy"] - a["cy"], b["cx"] - a["cx"]
  if abs(dy) >= abs(dx):
    return "above" if dy > 0 else "below"
  return "to the left of" if dx > 0 else "to the right of"


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def in_dist2ori_order(spec) -> Dict[str, Any]:
  """The spec with its objects nearest the top-left corner first, by the box's top-left corner
  (pix2seq's 'dist2ori', as pali.data.detection orders boxes); ties keep the drawing order."""
  objs = sorted(spec["objects"], key=lambda o: o["box"][0] ** 2 + o["box"][1] ** 2)
  return {**spec, "objects": objs}


def caption(spec) -> str:
  objs = spec["objects"]
  names = [f"{_article(o['color'])} {o['color']} {o['shape']}" for o in objs]
  if len(objs) == 1:
    return names[0]
  text = f"{names[0]} {_relation(objs[0], objs[1])} {names[1]}"
  if len(objs) == 3:
    text += f" and {names[2]}"
  elif len(objs) == 4:
    text += f", {names[2]} and {names[3]}"
  return text


def _plural(shape: str) -> str:
  return shape + "es" if shape.endswith("x") else shape + "s"


def questions(spec) -> List[tuple]:
  """(question, answer) pairs about counts and colours; always at least one."""
  objs = spec["objects"]
  qa = [("how many shapes are there?", str(len(objs)))]
  rng = np.random.default_rng(spec["rng_q"])
  for shape in rng.permutation(SHAPES)[:2]:
    qa.append((f"how many {_plural(str(shape))} are there?",
               str(sum(o["shape"] == shape for o in objs))))
  for o in objs:
    if sum(p["shape"] == o["shape"] for p in objs) == 1:
      qa.append((f"what color is the {o['shape']}?", o["color"]))
    if sum(p["color"] == o["color"] for p in objs) == 1:
      qa.append((f"what shape is {o['color']}?", o["shape"]))
  color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
  qa.append((f"how many {color} shapes are there?", str(sum(o["color"] == color for o in objs))))
  return qa


def render(spec, size: int) -> np.ndarray:
  """The scene as uint8 [size, size, 3]."""
  bg = np.array(spec["bg"], np.float32)
  if spec["bg_kind"] == 1:
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    arr = bg * (1 - t) + np.array(spec["bg2"], np.float32) * t
    arr = np.broadcast_to(arr, (size, size, 3))
  else:
    arr = np.broadcast_to(bg, (size, size, 3))
  img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  for o in spec["objects"]:
    color = COLORS[o["color"]]
    pts = [(x * size, y * size) for x, y in _outline(o)]
    if o["shape"] == "circle":
      draw.ellipse([pts[0], pts[1]], fill=color)
    else:
      draw.polygon(pts, fill=color)
  out = np.asarray(img)
  if spec["bg_kind"] == 2 or spec["noise"] > 6:
    noise = noise_bank(size)[spec["noise_seed"] % _NOISE_BANK]
    out = np.clip(out + noise * spec["noise"], 0, 255).astype(np.uint8)
  return np.ascontiguousarray(out)


_NOISE_BANK = 8


@functools.lru_cache(maxsize=8)
def noise_bank(size: int) -> np.ndarray:
  """A few fixed unit-variance noise fields per size (drawing fresh noise for every image
  costs more than rendering it)."""
  rng = np.random.default_rng([_SEED, size])
  return rng.standard_normal((_NOISE_BANK, size, size, 3), dtype=np.float32)


def example(split: str, index: int, size: int, max_shapes: int = MAX_SHAPES) -> Dict[str, Any]:
  spec = scene_spec(split, index, max_shapes)
  qa = questions(spec)
  return {
      "image": render(spec, size),
      "caption": caption(spec),
      "boxes": np.array([o["box"] for o in spec["objects"]], np.float32).reshape(-1, 4),
      "labels": [o["shape"] for o in spec["objects"]],
      "questions": [q for q, _ in qa],
      "answers": [a for _, a in qa],
  }


def all_words() -> Sequence[str]:
  """Every word the scenes use (for building the vocabulary)."""
  out = []
  for i in range(300):
    spec = scene_spec("train", i)
    out.append(caption(spec))
    out.extend(q + " " + a for q, a in questions(spec))
  return out
