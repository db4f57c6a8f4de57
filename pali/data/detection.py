"""Detection in the pix2seq / PaliGemma form (tf.data ops, stateless seeded randomness).

Prompt `detect a ; b` naming the classes asked for (the classes of the objects in the
target, in the order they first appear); target per object `<locY1><locX1><locY2><locX2> label`
(coordinates round(v * 1023)), objects joined by ` ; `, in pix2seq's object orders: 'random'
(a new order each time, the default), 'dist2ori' (by the distance of the box's top-left
corner from the image's, nearest first) or 'area' (largest first).
Optional sequence augmentation (pix2seq): noise boxes (jittered / shifted copies of real
boxes, or random boxes) labelled `noise`, appended after the real objects; their 4 box
tokens have loss weight 0 (their label weight 1) and EOS has weight 0.1.

Bad boxes are repaired by a fixed rule: coordinates are clipped to [0, 1]; boxes that are
then empty or inverted (min >= max) or not finite are dropped (counted as
'detection_boxes_dropped'). Objects that do not fit the target length are dropped from the
end of the (shuffled) list: the target keeps the objects that fit (counted as
'detection_objects_dropped'). An example left with no object is skipped
('detection_no_objects'); so is one whose labels do not match its boxes one to one
('bad_boxes').
"""
import re
from typing import List, Optional, Tuple

import numpy as np
import seqio
import tensorflow as tf

from pali.data import images as images_lib
from pali.data import robust
from pali.data.preprocessors import no_autograph
from pali.data import vocabulary as vocab_lib

NUM_BINS = vocab_lib.NUM_LOC_TOKENS
NOISE_LABEL = "noise"
SEPARATOR = " ; "


def quantize(v):
  """[0, 1] -> bin index round(v * 1023) (clipped)."""
  return tf.clip_by_value(tf.cast(tf.round(v * (NUM_BINS - 1)), tf.int32), 0, NUM_BINS - 1)


def repair_boxes(boxes, labels):
  """Clip to [0, 1]; drop non-finite, empty or inverted boxes. Returns (boxes, labels,
  number dropped)."""
  boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
  finite = tf.reduce_all(tf.math.is_finite(boxes), axis=1)
  boxes = tf.where(tf.math.is_finite(boxes), boxes, 0.0)
  boxes = tf.clip_by_value(boxes, 0.0, 1.0)
  valid = finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  valid = valid & (tf.strings.length(tf.strings.strip(labels)) > 0)
  dropped = tf.size(valid) - tf.reduce_sum(tf.cast(valid, tf.int32))
  return tf.boolean_mask(boxes, valid), tf.boolean_mask(labels, valid), dropped


def noise_boxes(boxes, num, seed):
  """`num` pix2seq-style noise boxes: jittered or shifted copies of real boxes, or random."""
  s = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  kind = tf.random.stateless_uniform([num], s[0], 0, 3, dtype=tf.int32)
  n = tf.shape(boxes)[0]
  src = tf.gather(boxes, tf.random.stateless_uniform([num], s[1], 0, tf.maximum(n, 1),
                                                     dtype=tf.int32) % tf.maximum(n, 1))
  src = tf.cond(n > 0, lambda: src, lambda: tf.tile([[0.25, 0.25, 0.75, 0.75]], [num, 1]))
  h, w = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
  hw = tf.stack([h, w, h, w], axis=1)
  u = tf.random.stateless_uniform([num, 4], s[2], -1.0, 1.0)
  jittered = src + 0.2 * u * hw
  shift = tf.random.stateless_uniform([num, 2], s[3], -1.0, 1.0) * tf.stack([h, w], 1)
  shifted = src + tf.concat([shift, shift], 1)
  r = tf.random.stateless_uniform([num, 4], s[2] + 1, 0.0, 1.0)
  rand = tf.stack([tf.minimum(r[:, 0], r[:, 1]), tf.minimum(r[:, 2], r[:, 3]),
                   tf.maximum(r[:, 0], r[:, 1]), tf.maximum(r[:, 2], r[:, 3])], 1)
  out = tf.where((kind == 0)[:, None], jittered, tf.where((kind == 1)[:, None], shifted, rand))
  out = tf.clip_by_value(out, 0.0, 1.0)
  lo = tf.minimum(out[:, :2], out[:, 2:])
  hi = tf.maximum(out[:, :2], out[:, 2:]) + 1.0 / NUM_BINS
  return tf.clip_by_value(tf.concat([lo, hi], 1), 0.0, 1.0)


def object_strings(boxes, labels):
  """'<locY1><locX1><locY2><locX2> label' per object."""
  q = tf.strings.as_string(quantize(boxes), width=4, fill="0")
  locs = tf.strings.reduce_join(tf.strings.join(["<loc", q, ">"]), axis=1)
  return tf.strings.join([locs, labels], separator=" ")


def detection_target(boxes, labels, num_real, vocab, max_tokens: int):
  """Tokens and weights of the objects that fit in max_tokens, in the given order.
  Objects from index num_real on are noise: their box tokens get weight 0.
  Returns (tokens, weights, number of objects kept, kept labels)."""
  n = tf.shape(labels)[0]
  obj = tf.cast(vocab.encode_tf(object_strings(boxes, labels)), tf.int32)  # ragged [n, (l)]
  if not isinstance(obj, tf.RaggedTensor):
    obj = tf.RaggedTensor.from_tensor(obj)
  sep = tf.constant(vocab.encode(SEPARATOR), tf.int32)
  lens = tf.cast(obj.row_lengths(), tf.int32)
  # Object i costs its tokens plus a separator before it (except the first).
  cost = lens + tf.where(tf.range(n) > 0, tf.size(sep), 0)
  keep = tf.reduce_sum(tf.cast(tf.cumsum(cost) <= max_tokens, tf.int32))
  obj = obj[:keep]
  sep_len = tf.cast(tf.where(tf.range(keep) > 0, tf.size(sep), 0), tf.int64)
  sep_rows = tf.RaggedTensor.from_row_lengths(tf.tile(sep, [tf.maximum(keep - 1, 0)]), sep_len)
  rows = tf.concat([sep_rows, obj], axis=1)
  tokens = rows.flat_values
  is_noise = tf.range(keep) >= num_real
  loc_first = vocab.first_loc_id
  is_loc = (obj.flat_values >= loc_first) & (obj.flat_values < loc_first + NUM_BINS)
  obj_noise = tf.repeat(is_noise, tf.cast(obj.row_lengths(), tf.int32))
  obj_w = tf.where(is_loc & obj_noise, 0.0, 1.0)
  w = tf.concat([tf.ones_like(sep_rows, tf.float32),
                 tf.RaggedTensor.from_row_lengths(obj_w, obj.row_lengths())], axis=1).flat_values
  return tokens, w, keep, labels[:keep]


def _unique_in_order(labels):
  return tf.unique(labels)[0]


ORDERS = ("random", "dist2ori", "area")


def object_order(boxes, order: str, seed):
  """Indices that put the objects in `order` (one of ORDERS)."""
  if order == "random":
    return tf.argsort(tf.random.stateless_uniform([tf.shape(boxes)[0]], seed))
  if order == "dist2ori":
    return tf.argsort(tf.square(boxes[:, 0]) + tf.square(boxes[:, 1]), stable=True)
  if order == "area":
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return tf.argsort(-area, stable=True)
  raise ValueError(f"Detection order {order!r} is not one of {ORDERS}.")


def detection(dataset, sequence_length, output_features, *, flip: bool = True,
              num_noise_boxes: int = 0, noise_eos_weight: float = 0.1,
              image_key: str = "image", order: str = "random"):
  """{image, boxes [n, 4] (ymin, xmin, ymax, xmax in [0, 1]), labels [n]} ->
  {image (resized to the stage size, flipped), inputs (prompt text), targets (tokens),
  targets_weights, eos_weight}."""
  vocab = output_features["targets"].vocabulary
  max_tokens = sequence_length["targets"] - 1  # EOS
  cfg = images_lib.current()
  if order not in ORDERS:
    raise ValueError(f"Detection order {order!r} is not one of {ORDERS}.")

  @seqio.map_over_dataset(num_seeds=1)
  @no_autograph
  def fn(x, seed):
    s_flip, s_order, s_noise = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    x = dict(x)
    image = x.pop(image_key)
    if image.dtype == tf.string:
      image = images_lib.decode(image)
    boxes, labels, n_bad = repair_boxes(x.pop("boxes"), x.pop("labels"))
    image, boxes = images_lib.resize(image, cfg.size, cfg.resize_method, boxes)
    if flip:
      image, boxes = images_lib.random_flip(image, boxes, s_flip)
    n = tf.shape(labels)[0]
    idx = object_order(boxes, order, s_order)  # after the flip: the order of what is seen
    boxes, labels = tf.gather(boxes, idx), tf.gather(labels, idx)
    if num_noise_boxes:
      nb = noise_boxes(boxes, num_noise_boxes, s_noise)
      all_boxes = tf.concat([boxes, nb], 0)
      all_labels = tf.concat([labels, tf.fill([num_noise_boxes], NOISE_LABEL)], 0)
    else:
      all_boxes, all_labels = boxes, labels
    tokens, weights, keep, kept_labels = detection_target(all_boxes, all_labels, n, vocab,
                                                          max_tokens)
    kept_real = tf.minimum(keep, n)
    classes = _unique_in_order(kept_labels[:kept_real])
    prompt = tf.strings.join(["detect ", tf.strings.reduce_join(classes, separator=SEPARATOR)])
    counts = [robust.count_if(n_bad > 0, "detection_boxes_dropped", n_bad),
              robust.count_if(kept_real < n, "detection_objects_dropped", n - kept_real)]
    with tf.control_dependencies(counts):
      x["image"] = tf.identity(image)
    x.update(inputs=prompt, targets=tokens, targets_weights=weights,
             eos_weight=tf.constant(noise_eos_weight if num_noise_boxes else 1.0),
             num_objects=kept_real)
    return x

  @no_autograph
  def has_objects(x):
    good = x["num_objects"] > 0
    with tf.control_dependencies([robust.count_if(tf.logical_not(good),
                                                  "detection_no_objects")]):
      return tf.identity(good)

  @no_autograph
  def drop_count(x):
    x = dict(x)
    x.pop("num_objects")
    return x

  dataset = robust.boxes_or_skip(dataset)  # labels must match boxes one to one
  return fn(dataset).filter(has_objects).map(drop_count)


_OBJ_RE = re.compile(r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})> ?([^;<]*)")


def parse_detection(text: str) -> List[Tuple[Tuple[float, float, float, float], str]]:
  """Decoded detection text -> [((ymin, xmin, ymax, xmax) in [0, 1], label), ...]; bins map
  back to v = bin / 1023. Malformed objects are skipped."""
  out = []
  for m in _OBJ_RE.finditer(text):
    box = tuple(int(m.group(i)) / (NUM_BINS - 1) for i in range(1, 5))
    out.append((box, m.group(5).strip()))
  return out
