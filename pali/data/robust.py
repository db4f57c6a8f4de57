"""Bad input: counters of skipped / repaired examples, readable by the trainer.

`skip_counts()` -> {reason: count} for this process (also `pali.data.pipeline.skip_counts`).
Counts are incremented when the input pipeline meets the example, which with prefetching
can be a little ahead of the training step that consumes it.
"""
import collections
import threading
from typing import Dict

import numpy as np
import tensorflow as tf

_LOCK = threading.Lock()
_COUNTS = collections.Counter()


def skip_counts() -> Dict[str, int]:
  with _LOCK:
    return dict(_COUNTS)


def reset_skip_counts() -> None:
  with _LOCK:
    _COUNTS.clear()


def _add(reason, n):
  with _LOCK:
    _COUNTS[reason.decode() if isinstance(reason, bytes) else str(reason)] += int(n)
  return np.int64(0)


def count(reason: str, n=1) -> tf.Tensor:
  """A tf op that adds `n` to the counter `reason` (returns 0; use it as a dependency)."""
  return tf.numpy_function(_add, [tf.constant(reason), tf.cast(n, tf.int64)], tf.int64,
                           stateful=True)


def count_if(cond, reason: str, n=1) -> tf.Tensor:
  """Counts only when `cond` (a scalar bool tensor) is true."""
  return tf.cond(cond, lambda: count(reason, n), lambda: tf.constant(0, tf.int64))


# ---- rules for untrusted input (user data) -----------------------------------------------
# Every rule either repairs the example (and says how) or skips it and counts it under a
# reason; nothing raises mid-run and nothing passes silently:
#   bad_image        image bytes that do not decode (corrupt, truncated, empty, zero-sized):
#                    the example is skipped.
#   empty_text       text that is empty or only whitespace: skipped.
#   text_not_utf8    text that is not valid UTF-8: skipped.
#   empty_targets    a task produced no target token: skipped (in `finalize`).
#   bad_boxes        a box list whose length is not a multiple of 4, or labels that do not
#                    match the boxes: skipped.
#   detection_boxes_dropped / detection_objects_dropped / detection_no_objects: see
#                    pali.data.detection (clip, drop degenerate boxes, keep what fits).
#   missing_image_file / bad_json_line: JSONL records skipped when the source is read.
import io as _io

from PIL import Image as _Image

from pali.data.preprocessors import no_autograph


def _decode_py(data: bytes):
  try:
    with _Image.open(_io.BytesIO(data)) as im:
      im.load()  # raises on truncated data
      arr = np.asarray(im.convert("RGB"))
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
      raise ValueError("zero-sized image")
    return np.ascontiguousarray(arr, np.uint8), True
  except Exception:  # noqa: BLE001  any decoding failure is a bad image
    return np.zeros((1, 1, 3), np.uint8), False


def safe_decode(image_bytes: tf.Tensor):
  """(uint8 [h, w, 3], ok) for untrusted bytes (JPEG, PNG, GIF, BMP, WebP ... via Pillow)."""
  image, ok = tf.numpy_function(_decode_py, [image_bytes], [tf.uint8, tf.bool], stateful=False)
  image.set_shape([None, None, 3])
  ok.set_shape([])
  return image, ok


def _skip_unless(dataset, predicate, reason):
  @no_autograph
  def keep(x):
    good = predicate(x)
    with tf.control_dependencies([count_if(tf.logical_not(good), reason)]):
      return tf.identity(good)
  return dataset.filter(keep)


def decode_images_or_skip(dataset, key: str = "image"):
  """Decodes `key` (bytes) with Pillow; examples whose image does not decode are skipped and
  counted as 'bad_image'. Already-decoded images pass through."""
  if dataset.element_spec[key].dtype != tf.string:
    return dataset

  @no_autograph
  def fn(x):
    image, ok = safe_decode(x[key])
    return {**x, key: image, "_image_ok": ok}

  @no_autograph
  def drop(x):
    x = dict(x)
    x.pop("_image_ok")
    return x

  ds = dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
  return _skip_unless(ds, lambda x: x["_image_ok"], "bad_image").map(drop)


def valid_utf8(text: tf.Tensor) -> tf.Tensor:
  fixed = tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace",
                                       replacement_char=0xFFFD)
  return tf.reduce_all(tf.equal(fixed, text))


def validate_text(dataset, keys=("text",)):
  """Skips examples whose text features (those of `keys` present) are not UTF-8
  ('text_not_utf8') or are empty / whitespace only ('empty_text'). A list feature is
  checked element-wise (every element must be valid, at least one non-empty)."""
  keys = [k for k in keys if k in dataset.element_spec]
  for k in keys:
    dataset = _skip_unless(dataset, lambda x, k=k: valid_utf8(x[k]), "text_not_utf8")
    dataset = _skip_unless(
        dataset, lambda x, k=k: tf.reduce_any(tf.strings.length(tf.strings.strip(x[k])) > 0),
        "empty_text")
  return dataset


def boxes_or_skip(dataset):
  """`boxes` flat [4n] or [n, 4] -> [n, 4]; skipped ('bad_boxes') when the length is not a
  multiple of 4 or the labels do not match the boxes one to one."""

  def good(x):
    n = tf.size(x["boxes"])
    return tf.logical_and(tf.equal(n % 4, 0), tf.equal(n // 4, tf.size(x["labels"])))

  @no_autograph
  def reshape(x):
    return {**x, "boxes": tf.reshape(tf.cast(x["boxes"], tf.float32), [-1, 4])}

  return _skip_unless(dataset, good, "bad_boxes").map(reshape)
