"""Sums over a leading axis that XLA:CPU runs slowly as reductions.

XLA:CPU reduces over a leading axis narrower than what it keeps at a fraction of memory speed:
the 512 rows of a [512, 32128] array in 42 ms, 8 rows of [8, 311904] in 14 ms. Adding the
axis's two halves until one slice is left reads the data about twice and takes 4.8 and 0.3 ms
(BENCHMARKS.md, "Training step"). The Adafactor moments and the attention bias's gradient
use it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def pairwise_sum(x, axis: int):
  """x summed over `axis` by halving it (adding its two halves) until one slice is left."""
  n, odd = x.shape[axis], None
  while n > 1:
    if n % 2:  # set the last slice aside
      last = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
      odd = last if odd is None else odd + last
      n -= 1
    half = n // 2
    x = (jax.lax.slice_in_dim(x, 0, half, axis=axis)
         + jax.lax.slice_in_dim(x, half, n, axis=axis))
    n = half
  return jnp.squeeze(x if odd is None else x + odd, axis)
