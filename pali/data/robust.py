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
