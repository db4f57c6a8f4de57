"""Task variants for the learning benchmark (gin_configs/runs/learn_cpu.gin; BENCHMARKS.md
"Learning"): what a tiny model can learn on a CPU in about 30 minutes.

- `learn_shapes_detection`: detection on scenes of 1-3 shapes (the 1-4-shape scenes of
  `synthetic_shapes_detection`, with at most 3 shapes), objects in a random order;
  `learn_shapes_detection_ordered`: the same with objects in pix2seq's 'dist2ori' order
  (nearest the top-left corner first), which a small model learns many times sooner.
- `learn_word_ocr`: OCR of one dictionary word (the 500 most frequent lowercase words of the
  stdlib corpus), drawn large and centred; `learn_word_ocr_spelled`: the same with one target
  id per character (pali.data.preprocessors.spell_targets); `learn_letter_ocr`: one large
  lowercase letter, spelled (does the model see glyphs at all? a curriculum's first step).
- `learn_counting_vqa`: only the counting questions ("how many ... are there?") about the
  usual 1-4-shape scenes.
- mixtures `pali_synthetic_learn_v2` (random-order detection, word-piece OCR, counting,
  captions: the earlier benchmark) and `pali_synthetic_learn_v3` (ordered detection, spelled
  OCR, counting, captions) and `pali_synthetic_learn_v4` (v3 with more captions, less OCR);
  `pali_synthetic_learn_v5` (v4 with single letters beside the words, which is what makes the
  model start to read), `_v6` (captions in detection's object order) and `_v7` (more
  detection: gin_configs/runs/learn_cpu.gin); `learn_ocr_letters_and_words` (the two OCR tasks
  alone, a probe).
"""
import functools

import numpy as np
import tensorflow as tf

from pali.data import detection
from pali.data import images as images_lib
from pali.data import preprocessors as pp
from pali.data import synthetic
from pali.data import synthetic_scenes
from pali.data import synthetic_text
from pali.data.preprocessors import no_autograph
from tasks.common import TAIL, add_mixture
from tasks.common import add_task as _add_task

add_task = functools.partial(_add_task, shuffle_buffer_size=64)
LEARN_MAX_SHAPES = 3
COUNTING_PREFIX = "how many "
# A tiny model learns 1024 independent <loc> classes slowly; 64 coordinate levels in training
# (a 1/126 worst-case rounding error, far inside IoU 0.5) is what it learns in minutes.
TRAIN_BOX_LEVELS = 64


def _render(dataset, py_fn, keys, dtypes, shapes):
  """Maps {'index', 'split'} through `py_fn(split: str, index: int, size)` (numpy)."""
  size = images_lib.current().size

  def py(split, index):
    return py_fn(split.decode(), int(index), size)

  @no_autograph
  def fn(x):
    out = tf.numpy_function(py, [x["split"], x["index"]], list(dtypes), stateful=False)
    for t, s in zip(out, shapes(size)):
      t.set_shape(s)
    return dict(zip(keys, out))

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _bytes(xs):
  return np.array([x.encode("utf-8") for x in xs], dtype=object)


def snap(boxes: np.ndarray, levels: int) -> np.ndarray:
  """Coordinates rounded to `levels` evenly spaced values in [0, 1] (closed under flips)."""
  return (np.round(boxes * (levels - 1)) / (levels - 1)).astype(np.float32)


def render_few_shapes(dataset, train_levels: int = TRAIN_BOX_LEVELS):
  """{'index', 'split'} -> {'image', 'boxes', 'labels'} of scenes with 1-3 shapes. Training
  boxes are snapped to `train_levels` coordinate values (so only that many of the 1024
  `<loc>` tokens occur as targets, each seen 16x as often); validation boxes stay exact."""
  def py(split, index, size):
    e = synthetic_scenes.example(split, index, size, max_shapes=LEARN_MAX_SHAPES)
    boxes = snap(e["boxes"], train_levels) if split == "train" and train_levels else e["boxes"]
    return e["image"], boxes, _bytes(e["labels"])
  return _render(dataset, py, ("image", "boxes", "labels"), (tf.uint8, tf.float32, tf.string),
                 lambda s: ([s, s, 3], [None, 4], [None]))


def render_counting(dataset):
  """{'index', 'split'} -> {'image', 'questions', 'answers'}: the counting questions only."""
  def py(split, index, size):
    e = synthetic_scenes.example(split, index, size)
    qa = [(q, a) for q, a in zip(e["questions"], e["answers"]) if q.startswith(COUNTING_PREFIX)]
    return e["image"], _bytes([q for q, _ in qa]), _bytes([a for _, a in qa])
  return _render(dataset, py, ("image", "questions", "answers"),
                 (tf.uint8, tf.string, tf.string), lambda s: ([s, s, 3], [None], [None]))


def render_caption_ordered(dataset):
  """{'index', 'split'} -> {'image', 'caption'}: the usual 1-4-shape scenes, captioned with the
  objects nearest the top-left corner first, so the caption is a function of the image (the
  usual caption names them in drawing order, which the image does not show)."""
  def py(split, index, size):
    spec = synthetic_scenes.scene_spec(split, index)
    text = synthetic_scenes.caption(synthetic_scenes.in_dist2ori_order(spec))
    return synthetic_scenes.render(spec, size), np.array(text.encode("utf-8"), dtype=object)
  return _render(dataset, py, ("image", "caption"), (tf.uint8, tf.string),
                 lambda s: ([s, s, 3], []))


def render_word(dataset, example_fn=synthetic_text.word_example):
  """{'index', 'split'} -> {'image', 'text'}: one large dictionary word (or what `example_fn`
  draws)."""
  def py(split, index, size):
    e = example_fn(split, index, size)
    return e["image"], np.array(e["text"].encode("utf-8"), dtype=object)
  return _render(dataset, py, ("image", "text"), (tf.uint8, tf.string),
                 lambda s: ([s, s, 3], []))


add_task("learn_shapes_detection", synthetic.shapes_source("learn_shapes_detection"),
         [render_few_shapes, detection.detection, pp.prepare_images, *TAIL])
add_task("learn_shapes_detection_ordered",
         synthetic.shapes_source("learn_shapes_detection_ordered"),
         [render_few_shapes, functools.partial(detection.detection, order="dist2ori"),
          pp.prepare_images, *TAIL])
add_task("learn_shapes_caption_ordered", synthetic.shapes_source("learn_shapes_caption_ordered"),
         [render_caption_ordered, pp.caption, pp.prepare_images, *TAIL])
add_task("learn_word_ocr", synthetic.text_image_source("learn_word_ocr"),
         [render_word, pp.ocr, pp.prepare_images, *TAIL])
add_task("learn_word_ocr_spelled", synthetic.text_image_source("learn_word_ocr_spelled"),
         [render_word, pp.ocr, pp.spell_targets, pp.prepare_images, *TAIL])
add_task("learn_letter_ocr", synthetic.text_image_source("learn_letter_ocr"),
         [functools.partial(render_word, example_fn=synthetic_text.letter_example), pp.ocr,
          pp.spell_targets, pp.prepare_images, *TAIL])
add_task("learn_counting_vqa", synthetic.shapes_source("learn_counting_vqa"),
         [render_counting, pp.vqa, pp.prepare_images, *TAIL])

LEARN_RATES = (
    ("learn_shapes_detection", 0.45),  # the slowest to learn: the largest share
    ("learn_word_ocr", 0.3),
    ("learn_counting_vqa", 0.15),
    ("synthetic_shapes_caption", 0.1),  # learnt quickly (CIDEr > 1 at 360 steps' worth)
)
add_mixture("pali_synthetic_learn_v2", LEARN_RATES)
add_mixture("pali_synthetic_learn_v3", (
    ("learn_shapes_detection_ordered", 0.5),  # still the slowest: half of every batch
    ("learn_word_ocr_spelled", 0.25),
    ("learn_counting_vqa", 0.15),
    ("synthetic_shapes_caption", 0.1),
))
# v4: v3 with OCR's share given to captions. OCR does not learn in the 30-minute budget at any
# share (BENCHMARKS.md: not even single letters in 1000 OCR-only steps), captions gain with
# every step they get.
add_mixture("pali_synthetic_learn_v4", (
    ("learn_shapes_detection_ordered", 0.5),
    ("synthetic_shapes_caption", 0.25),
    ("learn_counting_vqa", 0.15),
    ("learn_word_ocr_spelled", 0.1),
))
# OCR alone, large single letters beside words: glyph features learnt on letters carry over to
# words (words alone stay at exact match ~0.01 after 2000 steps; with letters 0.16 after 3000).
add_mixture("learn_ocr_letters_and_words", (
    ("learn_letter_ocr", 0.5),
    ("learn_word_ocr_spelled", 0.5),
))
# v5: v4 with letters beside the words (BENCHMARKS.md "Learning"): OCR 0.3 in all.
add_mixture("pali_synthetic_learn_v5", (
    ("learn_shapes_detection_ordered", 0.4),
    ("learn_word_ocr_spelled", 0.2),
    ("synthetic_shapes_caption", 0.15),
    ("learn_counting_vqa", 0.15),
    ("learn_letter_ocr", 0.1),
))
# v6: v5 with the captions in the same object order as detection (the usual caption names the
# shapes in drawing order, which the image does not show: v5's captions stalled at CIDEr ~0.9)
# and more OCR (words were still rising fast at the end of v5).
add_mixture("pali_synthetic_learn_v6", (
    ("learn_shapes_detection_ordered", 0.35),
    ("learn_word_ocr_spelled", 0.27),
    ("learn_letter_ocr", 0.15),
    ("learn_shapes_caption_ordered", 0.13),
    ("learn_counting_vqa", 0.1),
))
# v7: v6 with more detection (v6 held AP50 at 0.88-0.89 from step 6000 on) taken from the single
# letters (read at 0.98 by then); the learning benchmark's mixture.
add_mixture("pali_synthetic_learn_v7", (
    ("learn_shapes_detection_ordered", 0.42),
    ("learn_word_ocr_spelled", 0.26),
    ("learn_shapes_caption_ordered", 0.12),
    ("learn_letter_ocr", 0.1),
    ("learn_counting_vqa", 0.1),
))
