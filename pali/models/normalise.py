"""The LayerNorm core (float32, last axis) with its backward written out.

Why not plain autodiff: JAX's derivative of a LayerNorm is a chain of elementwise ops around two
small reductions, and XLA's CPU fusion duplicates that chain into every consumer of the
residual-stream cotangent. Down a stack of pre-LN blocks the duplicates nest: each layer's
cotangent fusion re-evaluates the LayerNorm backward of every layer above it (fusions of ~800
ops in a 12-layer ViT, 139 ms of a 2.1 s mixed-precision step, BENCHMARKS.md). The closed-form
backward below gives XLA one expression per norm and no nesting: -6% step time in float32 and
in mixed precision. T5's RMSNorm shows no such nesting under autodiff (fusions of ~30 ops) and
the same treatment measured no faster, so it keeps plain autodiff.

`mean` and `rstd` are saved from the forward; the normalised input is recomputed from the saved
input (kept in its own, possibly bfloat16, dtype: less memory than a float32 normalised copy).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _mean(x: Array) -> Array:
  return jnp.mean(x, axis=-1, keepdims=True)


def _layer_norm_stats(x: Array, epsilon: float) -> tuple[Array, Array]:
  x32 = x.astype(jnp.float32)
  mean = _mean(x32)
  var = _mean(jnp.square(x32 - mean))  # two-pass: no cancellation for large means
  return mean, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def standardise(x: Array, epsilon: float) -> Array:
  """(x - mean) / sqrt(var + epsilon) over the last axis, in float32."""
  mean, rstd = _layer_norm_stats(x, epsilon)
  return (x.astype(jnp.float32) - mean) * rstd


def _standardise_fwd(x, epsilon):
  mean, rstd = _layer_norm_stats(x, epsilon)
  return (x.astype(jnp.float32) - mean) * rstd, (x, mean, rstd)


def _standardise_bwd(epsilon, res, g):
  del epsilon
  x, mean, rstd = res
  xhat = (x.astype(jnp.float32) - mean) * rstd
  dx = rstd * (g - _mean(g) - xhat * _mean(g * xhat))
  return (dx.astype(x.dtype),)


standardise.defvjp(_standardise_fwd, _standardise_bwd)
