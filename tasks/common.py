"""Helpers for registering tasks: idempotent registration and the shared preprocessor tail."""
import functools
from typing import Callable, Sequence

import seqio

from pali.data import preprocessors as pp

# Every task ends with these: tokenize the strings, then trim / EOS / weights / images.
TAIL = (pp.tokenize, pp.finalize)


def add_task(name: str, source: seqio.DataSource, preprocessors: Sequence[Callable],
             metric_fns=(), postprocess_fn=None, shuffle_buffer_size: int = 1000):
  """Registers a Task once (re-importing a module is harmless)."""
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  return seqio.TaskRegistry.add(
      name, source=source, output_features=pp.output_features(),
      preprocessors=list(preprocessors), postprocess_fn=postprocess_fn,
      metric_fns=list(metric_fns), shuffle_buffer_size=shuffle_buffer_size)


def add_mixture(name: str, tasks_and_rates):
  if name in seqio.MixtureRegistry.names():
    return seqio.MixtureRegistry.get(name)
  return seqio.MixtureRegistry.add(name, list(tasks_and_rates))


partial = functools.partial
