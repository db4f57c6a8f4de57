"""Evaluation input: every example of a split (up to a budget) exactly once, in batches of one
static shape, on any number of hosts.

Each host reads its own shard one example at a time. At every step each host takes up to
`host_batch` examples and the hosts share how many they got (a tiny allgather), so all of
them agree on what is kept and run the same number of steps: a host whose shard ran out
contributes zero rows, and the last batch of a split is padded with zero rows rather than
dropped. Kept rows get consecutive positions in the order (host 0 row j, host 1 row j, ...,
then row j + 1): with seqio's interleaved sharding (example i on host i % num_hosts) that is
the example's index in the split, so results are in the same order on 1 or N hosts. Padded
rows, and rows read beyond the budget, get position -1 and zero loss weights.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils


def assign_positions(counts, host_batch: int, budget: int, start: int = 0) -> np.ndarray:
  """[num_hosts, host_batch] int32: the global position of each host's row j when host h
  holds `counts[h]` real rows; -1 for padding and for rows beyond `budget` new positions."""
  counts = np.asarray(counts).reshape(-1)
  valid = np.arange(host_batch)[:, None] < counts[None, :]  # [row, host]: row-major order
  rank = (np.cumsum(valid.ravel()) - 1).reshape(valid.shape)
  keep = valid & (rank < budget)
  return np.where(keep, start + rank, -1).T.astype(np.int32)


def _zeros(element_spec, host_batch: int) -> dict[str, np.ndarray]:
  """A batch of zero rows from the dataset's static shapes (a host may read no example)."""
  return {k: np.zeros((host_batch,) + tuple(spec.shape[1:]), spec.dtype.as_numpy_dtype)
          for k, spec in element_spec.items()}


def eval_batches(dataset, *, host_batch: int,
                 max_examples: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
  """Yields (host batch [host_batch, ...], positions [host_batch]) from `dataset`, this host's
  shard in batches of one example; the same number of times on every host (collective)."""
  it = dataset.as_numpy_iterator()
  zeros = _zeros(dataset.element_spec, host_batch)
  done = 0
  try:
    while done < max_examples:
      rows = list(itertools.islice(it, min(host_batch, max_examples - done)))
      counts = np.asarray(multihost_utils.process_allgather(np.int32(len(rows)))).reshape(-1)
      if not counts.sum():
        return
      positions = assign_positions(counts, host_batch, max_examples - done, done)
      mine = positions[jax.process_index()]
      batch = {k: v.copy() for k, v in zeros.items()}
      for k in batch:
        if rows:
          batch[k][:len(rows)] = np.concatenate([r[k] for r in rows])
      batch["decoder_loss_weights"] *= (mine >= 0)[:, None].astype(np.float32)
      done += int((positions >= 0).sum())
      yield batch, mine
  finally:
    del it  # a live tf.data iterator can hold the process at exit
