"""Embedded text data: a denoising corpus from the Python standard library's docstrings, and
the words used by the rendered-text (OCR) dataset.

The corpus is built from the docstrings of the standard library that ships with the running
Python (parsed with `ast`, nothing is imported), so it exists on every machine where the
project installs and needs no download. Documents are cleaned (dedented, control characters
dropped, runs of blank lines collapsed), de-duplicated, and assigned to a split by a hash of
their text, so the train and validation splits never share a document. The result is cached
in memory and under `~/.cache/pali/` (keyed by the Python version).
"""
import ast
import functools
import hashlib
import json
import os
import re
import string
import sys
import sysconfig
import threading
import unicodedata
from typing import Dict, List

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_CACHE_VERSION = 2
# Skipped parts of the stdlib: tests, bundled third-party code, GUI demos.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3",
              "idlelib", "turtledemo", "ensurepip", "__pycache__", "pydoc_data"}
MIN_WORDS = 12
MAX_WORDS = 300  # a file's docstrings are joined, then cut at paragraphs into documents
VALIDATION_PERCENT = 3


def _stdlib_files() -> List[str]:
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for f in sorted(filenames):
      if f.endswith(".py") and not f.startswith("test_"):
        out.append(os.path.join(dirpath, f))
  return out


def clean_text(text: str) -> str:
  """Cleans one docstring: NFC; no control characters but newlines; tabs to spaces; runs of
  spaces inside a line collapsed; lines that are mostly punctuation (ASCII art, tables)
  dropped; at most one blank line in a row; no leading/trailing blank lines."""
  text = unicodedata.normalize("NFC", text)
  text = text.replace("\t", "    ")
  text = "".join(c for c in text if c == "\n" or unicodedata.category(c)[0] != "C")
  lines = []
  for l in text.split("\n"):
    l = re.sub(r"(?<=\S) {2,}", " ", l.rstrip())  # keep indentation, collapse inner runs
    if len(l.strip()) > 8 and sum(c.isalnum() for c in l) < 0.4 * len(l.strip()):
      continue  # ASCII art, tables, rules
    lines.append(l)
  text = "\n".join(lines)
  text = re.sub(r"\n{3,}", "\n\n", text)
  return text.strip()


def _docstrings(path: str):
  try:
    with open(path, "rb") as f:
      tree = ast.parse(f.read())
  except (SyntaxError, ValueError, OSError, UnicodeDecodeError):
    return
  nodes = [tree] + [n for n in ast.walk(tree) if isinstance(
      n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
  for n in nodes:
    doc = ast.get_docstring(n, clean=True)
    if doc:
      yield doc


def split_of(text: str) -> str:
  """The split a document belongs to, by a hash of its text (stable across machines)."""
  h = int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16)
  return "validation" if h % 100 < VALIDATION_PERCENT else "train"


def _cache_path() -> str:
  base = os.environ.get("PALI_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "pali"))
  v = sys.version_info
  return os.path.join(base, f"stdlib_corpus_py{v.major}{v.minor}_v{_CACHE_VERSION}.json")


def _documents(path: str):
  """The docstrings of one file, joined by blank lines and cut into documents of at most
  MAX_WORDS words at paragraph boundaries."""
  cur, n = [], 0
  for doc in _docstrings(path):
    for para in clean_text(doc).split("\n\n"):
      w = len(para.split())
      if cur and n + w > MAX_WORDS:
        yield "\n\n".join(cur)
        cur, n = [], 0
      cur.append(para)
      n += w
  if cur:
    yield "\n\n".join(cur)


def _build_corpus() -> Dict[str, List[str]]:
  seen = set()
  out = {"train": [], "validation": []}
  for path in _stdlib_files():
    for doc in _documents(path):
      if len(doc.split()) < MIN_WORDS or doc in seen:
        continue
      seen.add(doc)
      out[split_of(doc)].append(doc)
  return out


# tf.data runs the renderers in many threads at once, and CPython 3.11's ast.parse is not
# thread-safe ("AST constructor recursion depth mismatch"): the corpus is built by one thread.
_CORPUS_LOCK = threading.Lock()


def stdlib_corpus() -> Dict[str, List[str]]:
  """{'train': [doc, ...], 'validation': [doc, ...]}, deterministic for a Python version;
  safe to call from many threads (the first builds it, the others wait)."""
  with _CORPUS_LOCK:
    return _stdlib_corpus()


@functools.lru_cache(maxsize=None)
def _stdlib_corpus() -> Dict[str, List[str]]:
  path = _cache_path()
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    pass
  corpus = _build_corpus()
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(corpus, f)
    os.replace(tmp, path)
  except OSError:
    pass  # read-only home: rebuild next time
  return corpus


# ---- rendered text (OCR) -------------------------------------------------------------------
_WORD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9'.,:;!?()-]{0,13}$")
_OCR_SEED = 7340033
SPLIT_IDS = {"train": 0, "validation": 1}
_FONTS = threading.local()


@functools.lru_cache(maxsize=None)
def word_runs(split: str) -> List[List[str]]:
  """Documents of `split` as lists of printable words (runs of natural text to draw)."""
  out = []
  for doc in stdlib_corpus()[split]:
    words = [w for w in doc.split() if _WORD_RE.match(w)]
    if len(words) >= 4:
      out.append(words)
  return out


def _font(size: int):
  cache = getattr(_FONTS, "cache", None)
  if cache is None:
    cache = _FONTS.cache = {}
  if size not in cache:
    # Pillow's bundled font (FreeType build: scalable; otherwise a fixed bitmap font).
    try:
      cache[size] = ImageFont.load_default(size=size)
    except TypeError:
      cache[size] = ImageFont.load_default()
  return cache[size]


def text_spec(split: str, index: int) -> Dict:
  """The description of rendered-text example `index` of `split` (deterministic). The
  example belongs to the split given by a hash of its text and layout (redrawn until it
  matches), so the splits never share an example."""
  rng = np.random.default_rng([_OCR_SEED, SPLIT_IDS[split], int(index)])
  runs = word_runs(split)
  while True:
    words = runs[int(rng.integers(len(runs)))]
    lines = []
    for _ in range(int(rng.integers(1, 4))):
      k = int(rng.integers(1, 5))
      start = int(rng.integers(0, max(1, len(words) - k)))
      lines.append(" ".join(words[start:start + k]))
    spec = {"lines": lines, "font_frac": float(rng.uniform(0.08, 0.16)),
            "bg": [int(v) for v in rng.integers(0, 256, size=3)],
            "fg_dark": bool(rng.integers(2)), "fg_tint": [int(v) for v in rng.integers(0, 90, 3)],
            "x": float(rng.uniform(0, 1)), "y": float(rng.uniform(0, 1)),
            "angle": float(rng.uniform(-4, 4)), "noise": float(rng.uniform(0, 10)),
            "noise_seed": int(rng.integers(1 << 30))}
    key = repr((spec["lines"], round(spec["font_frac"], 4), spec["bg"], round(spec["x"], 4)))
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    if ("validation" if h % 100 < VALIDATION_PERCENT else "train") == split:
      return spec


def render_text(spec: Dict, size: int):
  """(image uint8 [size, size, 3], text): the lines drawn top to bottom; the text is the
  lines that fit, joined by spaces, in reading order."""
  from pali.data import synthetic_scenes  # the shared noise bank
  bg = np.array(spec["bg"], np.int32)
  lum = 0.3 * bg[0] + 0.6 * bg[1] + 0.1 * bg[2]
  tint = np.array(spec["fg_tint"])
  fg = tuple(int(v) for v in (tint if lum > 128 else 255 - tint))
  fsize = max(6, int(round(spec["font_frac"] * size)))
  font = _font(fsize)
  lines = list(spec["lines"])
  # Shrink the font, then drop words, until the block fits in 95% of the image.
  while True:
    widths = [font.getbbox(l)[2] for l in lines]
    line_h = int(fsize * 1.25)
    if max(widths) <= 0.95 * size and line_h * len(lines) <= 0.95 * size:
      break
    if fsize > 6:
      fsize = max(6, int(fsize * 0.85))
      font = _font(fsize)
    elif len(lines) > 1 and line_h * len(lines) > 0.95 * size:
      lines = lines[:-1]
    else:
      i = int(np.argmax(widths))
      words = lines[i].split()
      if len(words) > 1:
        lines[i] = " ".join(words[:-1])
      elif len(lines) > 1:
        lines.pop(i)
      else:
        lines[i] = lines[i][:-1] or "a"
        if len(lines[i]) == 1:
          break
  bw, bh = max(widths), line_h * len(lines)
  x0 = int(spec["x"] * max(0, size - bw))
  y0 = int(spec["y"] * max(0, size - bh))
  layer = Image.new("L", (size, size), 0)
  draw = ImageDraw.Draw(layer)
  for i, line in enumerate(lines):
    draw.text((x0, y0 + i * line_h), line, fill=255, font=font)
  if abs(spec["angle"]) > 0.5:
    layer = layer.rotate(spec["angle"], resample=Image.BILINEAR,
                         center=(x0 + bw / 2, y0 + bh / 2))
  alpha = np.asarray(layer, np.float32)[..., None] / 255.0
  img = bg.astype(np.float32) * (1 - alpha) + np.array(fg, np.float32) * alpha
  if spec["noise"] > 3:
    img = img + synthetic_scenes.noise_bank(size)[spec["noise_seed"] % 8] * spec["noise"]
  img = np.clip(img, 0, 255).astype(np.uint8)
  return img, " ".join(lines)


def text_example(split: str, index: int, size: int) -> Dict:
  image, text = render_text(text_spec(split, index), size)
  return {"image": image, "text": text}


# ---- single dictionary words (the learning benchmark's OCR) --------------------------------
_WORD_SEED = 7340047
_LETTER_SEED = 7340053
_DICT_RE = re.compile(r"^[a-z]{2,7}$")


@functools.lru_cache(maxsize=None)
def dictionary_words(num_words: int = 500) -> List[str]:
  """The `num_words` most frequent lowercase words (2-7 letters) of the corpus's train split,
  most frequent first (ties by spelling): a closed vocabulary, i.e. a language prior."""
  counts: Dict[str, int] = {}
  for doc in stdlib_corpus()["train"]:
    for w in doc.split():
      if _DICT_RE.match(w):
        counts[w] = counts.get(w, 0) + 1
  return sorted(counts, key=lambda w: (-counts[w], w))[:num_words]


def _single_word_spec(split: str, index: int, words: List[str], font_frac: tuple,
                      seed: int) -> Dict:
  """One of `words`, drawn large (font `font_frac` of the image; shrunk to fit), roughly
  centred, upright, on a plain background with light noise. Same spec format as text_spec
  (render with render_text); the split is chosen by a hash of word and layout."""
  rng = np.random.default_rng([seed, SPLIT_IDS[split], int(index)])
  while True:
    spec = {"lines": [words[int(rng.integers(len(words)))]],
            "font_frac": float(rng.uniform(*font_frac)),
            "bg": [int(v) for v in rng.integers(0, 256, size=3)],
            "fg_dark": bool(rng.integers(2)), "fg_tint": [int(v) for v in rng.integers(0, 60, 3)],
            "x": float(rng.uniform(0.35, 0.65)), "y": float(rng.uniform(0.35, 0.65)),
            "angle": 0.0, "noise": float(rng.uniform(0, 6)),
            "noise_seed": int(rng.integers(1 << 30))}
    key = repr((spec["lines"], round(spec["font_frac"], 4), spec["bg"], round(spec["x"], 4),
                round(spec["y"], 4)))
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    if ("validation" if h % 100 < VALIDATION_PERCENT else "train") == split:
      return spec


def word_spec(split: str, index: int, num_words: int = 500) -> Dict:
  """One dictionary word (font 0.2-0.28 of the image), see _single_word_spec."""
  return _single_word_spec(split, index, dictionary_words(num_words), (0.2, 0.28), _WORD_SEED)


def letter_spec(split: str, index: int) -> Dict:
  """One lowercase letter, larger (font 0.3-0.45 of the image): the first step of an OCR
  curriculum, and a probe of whether a model sees glyphs at all."""
  return _single_word_spec(split, index, list(string.ascii_lowercase), (0.3, 0.45),
                           _LETTER_SEED)


def letter_example(split: str, index: int, size: int) -> Dict:
  image, text = render_text(letter_spec(split, index), size)
  return {"image": image, "text": text}


def word_example(split: str, index: int, size: int, num_words: int = 500) -> Dict:
  image, text = render_text(word_spec(split, index, num_words), size)
  return {"image": image, "text": text}
