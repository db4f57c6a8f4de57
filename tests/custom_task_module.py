"""A team's own task module, as loaded by `launch/tpu_train.py --module_import=...`.

It registers `custom_test_captions`: captioning over records the team produces itself (here a
few in-memory PNGs), through the same helper a team would use with its TFRecord or JSONL
files (`pali.data.user_data.tfrecord_source` / `jsonl_source`).
"""
import io

import numpy as np
import seqio
import tensorflow as tf
from PIL import Image

from pali.data import user_data

TASK_NAME = "custom_test_captions"
CAPTIONS = ["a small red square", "a big blue circle", "two green stars", "one yellow line"]


def _png(i: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _dataset_fn(split, shuffle_files, seed=None):
  del shuffle_files, seed
  n = len(CAPTIONS)
  return tf.data.Dataset.from_tensor_slices({
      "image": tf.constant([_png(i) for i in range(n)]),
      "text": tf.constant([c if split == "train" else c.upper() for c in CAPTIONS]),
  })


user_data.register_image_text_task(
    TASK_NAME, seqio.FunctionDataSource(_dataset_fn, splits=("train", "validation")),
    kind="caption", shuffle_buffer_size=16)
