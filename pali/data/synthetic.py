"""The embedded default datasets as seqio sources and rendering preprocessors.

Sources emit only example indices (`{'index', 'split'}`), so sharding and shuffling are cheap;
the first preprocessor renders the example at the stage's image size
(`pali.data.images.current().size`), deterministically from (split, index):

- shapes scenes (`render_shapes`): image, caption, boxes, labels, questions, answers
  (see `pali.data.synthetic_scenes`);
- rendered text (`render_text`): image, text (see `pali.data.synthetic_text`);
- the text corpus (`stdlib_corpus_source`): documents from the standard library's docstrings.

Splits: 'train' and 'validation', which never share an example.
"""
import os
import secrets
import zlib
from typing import Mapping

import numpy as np
import seqio
import tensorflow as tf

from pali.data import images as images_lib
from pali.data.preprocessors import no_autograph
from pali.data import synthetic_scenes
from pali.data import synthetic_text

SCENE_EXAMPLES = {"train": 1_000_000, "validation": 2_000}
TEXT_EXAMPLES = {"train": 1_000_000, "validation": 2_000}


def _seed3(seed, salt: int):
  if seed is None:
    seed = secrets.randbits(31)
  return tf.constant([int(seed) & 0x7FFFFFFF, salt], tf.int64)


class IndexDataSource(seqio.FunctionDataSource):
  """A FunctionDataSource without seqio's warning about uncached function sources: ours
  shuffle all indices with a seeded permutation, so restarts are not under-shuffled."""

  def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, *,
                  sequence_length=None, use_cached=False, num_epochs=1):
    del sequence_length, use_cached, num_epochs
    if shard_info and shard_info.num_shards > 1:
      raise ValueError("shard with tf.data.Dataset.shard (seqio does it for this source)")
    return self._dataset_fn(split=split, shuffle_files=shuffle, seed=seed)


def index_source(num_examples: Mapping[str, int], salt: int = 1) -> seqio.DataSource:
  """A source of `{'index': int64, 'split': string}`. With shuffling, a seeded permutation
  of all indices (`tf.random.experimental.index_shuffle`: O(1) memory)."""

  def dataset_fn(split, shuffle_files, seed=None):
    n = int(num_examples[split])
    ds = tf.data.Dataset.range(n)
    if shuffle_files:
      s = _seed3(seed, salt)
      ds = ds.map(no_autograph(lambda i: tf.random.experimental.index_shuffle(i, s, n - 1)))
    return ds.map(no_autograph(lambda i: {"index": i, "split": tf.constant(split)}))

  return IndexDataSource(dataset_fn, splits=tuple(num_examples),
                         num_input_examples=dict(num_examples))


def _salt(name: str) -> int:
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


def shapes_source(task_name: str = "") -> seqio.DataSource:
  """Shapes scene indices; each task passes its name so that tasks sharing the scenes visit
  them in different orders."""
  return index_source(SCENE_EXAMPLES, salt=_salt("shapes" + task_name))


def text_image_source(task_name: str = "") -> seqio.DataSource:
  return index_source(TEXT_EXAMPLES, salt=_salt("text" + task_name))


def _bytes_list(xs):
  return np.array([x.encode("utf-8") for x in xs], dtype=object)


def render_shapes(dataset):
  """{'index', 'split'} -> {'image' uint8 [S, S, 3], 'caption', 'boxes' [n, 4], 'labels' [n],
  'questions' [q], 'answers' [q]} at the current image size."""
  size = images_lib.current().size

  def py(split, index):
    e = synthetic_scenes.example(split.decode(), int(index), size)
    return (e["image"], np.array(e["caption"].encode("utf-8"), dtype=object), e["boxes"],
            _bytes_list(e["labels"]), _bytes_list(e["questions"]), _bytes_list(e["answers"]))

  @no_autograph
  def fn(x):
    out = tf.numpy_function(py, [x["split"], x["index"]],
                            [tf.uint8, tf.string, tf.float32, tf.string, tf.string, tf.string],
                            stateful=False)
    shapes = ([size, size, 3], [], [None, 4], [None], [None], [None])
    for t, s in zip(out, shapes):
      t.set_shape(s)
    keys = ("image", "caption", "boxes", "labels", "questions", "answers")
    return dict(zip(keys, out))

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def render_text(dataset):
  """{'index', 'split'} -> {'image' uint8 [S, S, 3], 'text'} at the current image size."""
  size = images_lib.current().size

  def py(split, index):
    e = synthetic_text.text_example(split.decode(), int(index), size)
    return e["image"], np.array(e["text"].encode("utf-8"), dtype=object)

  @no_autograph
  def fn(x):
    image, text = tf.numpy_function(py, [x["split"], x["index"]], [tf.uint8, tf.string],
                                    stateful=False)
    image.set_shape([size, size, 3])
    text.set_shape([])
    return {"image": image, "text": text}

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def stdlib_corpus_source() -> seqio.DataSource:
  """Documents (`{'text'}`) from the docstrings of the Python standard library."""

  def dataset_fn(split, shuffle_files, seed=None):
    docs = synthetic_text.stdlib_corpus()[split]
    ds = tf.data.Dataset.from_tensor_slices({"text": tf.constant(docs, tf.string)})
    if shuffle_files:
      ds = ds.shuffle(len(docs), seed=None if seed is None else int(seed) + 3,
                      reshuffle_each_iteration=True)
    return ds

  return IndexDataSource(dataset_fn, splits=("train", "validation"))
