"""Text-side preprocessors (tf.data ops; randomness is stateless and seeded by seqio):
captioning, split captioning (prefix completion), OCR, split-OCR, VQA; image features;
tokenisation; and `finalize`, the last step of every task (trim, EOS, per-token loss weights).

UL2 denoising lives in `pali.data.denoising`, detection in `pali.data.detection`.

Every task ends with the features of `OUTPUT_FEATURES` (what `pali.data.feature_converter`
turns into the model's batch): `inputs`, `targets` (int32 ids ending in EOS),
`targets_weights` (float32, one per target token), `images` uint8 [N, S, S, 3] and
`image_mask` int32 [N] (N images of S px from `pali.data.images.current()`).
"""
from typing import Mapping, Optional

import seqio
import tensorflow as tf

from pali.data import images as images_lib
from pali.data import vocabulary as vocab_lib

# Our dataset functions need no autograph (their Python control flow is static); converting
# them costs seconds per task at dataset construction.
no_autograph = tf.autograph.experimental.do_not_convert

PROMPT_CAPTION = "caption en"
PROMPT_OCR = "ocr"
PROMPT_DETECT = "detect"
PROMPT_VQA = "answer en"


def output_features(vocabulary: Optional[seqio.Vocabulary] = None) -> Mapping[str, seqio.Feature]:
  """The output features every task declares (a mixture needs identical ones)."""
  vocabulary = vocabulary or vocab_lib.get_vocabulary()
  return {
      "inputs": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
      "targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
      "targets_weights": seqio.ContinuousFeature(dtype=tf.float32, rank=1, required=True),
      "images": seqio.ContinuousFeature(dtype=tf.uint8, rank=4),
      "image_mask": seqio.ContinuousFeature(dtype=tf.int32, rank=1),
  }


def _uniform_int(seed, lo, hi):
  """A stateless integer uniform in [lo, hi] (inclusive; lo <= hi)."""
  return tf.random.stateless_uniform([], seed, minval=lo, maxval=hi + 1, dtype=tf.int32)


def split_at_random_word(text: tf.Tensor, seed) -> tuple:
  """Splits `text` at a uniformly random word boundary: (prefix, rest), words joined by
  single spaces. With n >= 2 words the prefix has 1 .. n-1 words (both parts non-empty);
  a single word goes to the rest."""
  words = tf.strings.split(text)
  n = tf.size(words)
  k = tf.cond(n >= 2, lambda: _uniform_int(seed, 1, n - 1), lambda: tf.constant(0))
  prefix = tf.strings.reduce_join(words[:k], separator=" ")
  rest = tf.strings.reduce_join(words[k:], separator=" ")
  return prefix, rest


def _prompt(prompt: str, text: tf.Tensor) -> tf.Tensor:
  return tf.strings.strip(tf.strings.join([prompt, text], separator=" "))


# ---- task formats --------------------------------------------------------------------------
@seqio.map_over_dataset
@no_autograph
def caption(x, text_key: str = "caption"):
  """`caption en` -> the caption."""
  return {**x, "inputs": tf.constant(PROMPT_CAPTION), "targets": x[text_key]}


@seqio.map_over_dataset(num_seeds=1)
@no_autograph
def split_caption(x, seed, text_key: str = "caption"):
  """Prefix completion: `caption en <first words>` -> the remaining words."""
  prefix, rest = split_at_random_word(x[text_key], seed)
  return {**x, "inputs": _prompt(PROMPT_CAPTION, prefix), "targets": rest}


@seqio.map_over_dataset
@no_autograph
def ocr(x, text_key: str = "text"):
  """`ocr` -> the full text in reading order."""
  return {**x, "inputs": tf.constant(PROMPT_OCR), "targets": x[text_key]}


@seqio.map_over_dataset(num_seeds=1)
@no_autograph
def split_ocr(x, seed, text_key: str = "text"):
  """Split-OCR: `ocr <first words of the text>` -> the rest of the text."""
  prefix, rest = split_at_random_word(x[text_key], seed)
  return {**x, "inputs": _prompt(PROMPT_OCR, prefix), "targets": rest}


@seqio.map_over_dataset(num_seeds=1)
@no_autograph
def vqa(x, seed, question_key: str = "questions", answer_key: str = "answers"):
  """`answer en <question>` -> answer; one (question, answer) pair drawn at random from the
  example's lists (or the scalar pair)."""
  q, a = x[question_key], x[answer_key]
  if q.shape.rank == 1:
    i = _uniform_int(seed, 0, tf.maximum(tf.size(q), 1) - 1)
    q, a = tf.gather(q, i), tf.gather(a, i)
  return {**x, "inputs": _prompt(PROMPT_VQA, q), "targets": a}


@seqio.map_over_dataset
@no_autograph
def rekey(x, key_map: Mapping[str, str]):
  """{new: x[old]}; other features are dropped."""
  return {new: x[old] for new, old in key_map.items()}


# ---- images --------------------------------------------------------------------------------
@seqio.map_over_dataset
@no_autograph
def prepare_images(x, image_key: str = "image"):
  """`image` (uint8 [h, w, 3], or encoded bytes) or `images` (a stack, or a list of bytes)
  -> `images` [N, S, S, 3] and `image_mask` [N] at the current stage's size and count."""
  x = dict(x)
  key = image_key if image_key in x else "images"
  stack, mask = images_lib.to_image_stack(x.pop(key))
  x["images"], x["image_mask"] = stack, mask
  return x


@seqio.map_over_dataset
@no_autograph
def add_empty_images(x):
  """Text-only examples carry zero images with mask 0 (every task of a mixture must have the
  same features)."""
  stack, mask = images_lib.empty_images()
  return {**x, "images": stack, "image_mask": mask}


# ---- tokens --------------------------------------------------------------------------------
def tokenize(dataset, output_features):
  """Tokenises `inputs` / `targets` where they are still strings (no EOS yet, no
  `*_pretokenized` copies); token features pass through."""

  @no_autograph
  def fn(x):
    x = dict(x)
    for k in ("inputs", "targets"):
      if k in x and x[k].dtype == tf.string:
        x[k] = tf.cast(output_features[k].vocabulary.encode_tf(x[k]), tf.int32)
    return x

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def spell_targets(dataset, output_features):
  """Tokenises the string `targets` one character per id (' ' -> the '▁' piece), which decodes
  to the same text as the usual SentencePiece encoding. For OCR by a small model: it learns
  a few dozen letter classes, each seen in every word, instead of hundreds of word pieces
  (each seen only in its own words). Characters without a piece become unk, counted as
  'spelled_unknown_chars'. Put it before `tokenize` (which then leaves targets alone)."""
  from pali.data import robust  # robust imports this module
  vocab = output_features["targets"].vocabulary
  pieces = vocab.char_pieces()
  with tf.init_scope():
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(list(pieces)), tf.constant(list(pieces.values()), tf.int32)),
        default_value=vocab.unk_id)

  @no_autograph
  def fn(x):
    x = dict(x)
    ids = table.lookup(tf.strings.unicode_split(x["targets"], "UTF-8"))
    unknown = tf.reduce_sum(tf.cast(ids == vocab.unk_id, tf.int64))
    with tf.control_dependencies([robust.count_if(unknown > 0, "spelled_unknown_chars",
                                                  unknown)]):
      x["targets"] = tf.identity(ids)
    return x

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def finalize(dataset, sequence_length, output_features=None):
  from pali.data import robust  # robust imports this module
  """The last step of every task: trims `inputs` / `targets` to the lengths less one and
  appends EOS; `targets_weights` (default 1 per token, trimmed alike) gets the EOS weight
  (`eos_weight` feature, default 1); keeps only the model features. Examples without any
  target token are skipped and counted ('empty_targets')."""
  lin = (sequence_length or {}).get("inputs")
  lout = (sequence_length or {}).get("targets")

  @no_autograph
  def fn(x):
    inputs = tf.cast(x["inputs"], tf.int32)
    targets = tf.cast(x["targets"], tf.int32)
    weights = x.get("targets_weights", tf.ones_like(targets, tf.float32))
    eos_w = tf.cast(x.get("eos_weight", 1.0), tf.float32)
    if lin:
      inputs = inputs[:lin - 1]
    if lout:
      targets, weights = targets[:lout - 1], weights[:lout - 1]
    out = {
        "inputs": tf.concat([inputs, [1]], 0),
        "targets": tf.concat([targets, [1]], 0),
        "targets_weights": tf.concat([tf.cast(weights, tf.float32), [eos_w]], 0),
    }
    if "images" not in x:
      x["images"], x["image_mask"] = images_lib.empty_images()
    out["images"], out["image_mask"] = x["images"], x["image_mask"]
    return out

  @no_autograph
  def has_targets(x):
    good = tf.size(x["targets"]) > 0
    with tf.control_dependencies([robust.count_if(tf.logical_not(good), "empty_targets")]):
      return tf.identity(good)

  return dataset.filter(has_targets).map(fn, num_parallel_calls=tf.data.AUTOTUNE)
