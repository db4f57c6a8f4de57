"""optax's Adafactor with its inverse square roots as `rsqrt` (and, on CPU, wide column means
as sums of halves).

optax writes the second-moment scaling as `v ** -0.5`, which XLA lowers to a general `power`:
on CPU that is 10x slower than `rsqrt` (119 vs 12 ms over 26M elements), and pali_small keeps
26M second moments unfactored (its [512, 6, 64] attention kernels: head_dim 64 is under
`min_dim_size_to_factor`), so the power cost 3% of a training step (BENCHMARKS.md). This module
is optax's `scale_by_factored_rms` (optax 0.2.8) with `rsqrt`, in the same chain as
`optax.adafactor`; the state is optax's own `FactoredState`, so checkpoints are
interchangeable, and tests/test_adafactor.py holds the updates equal to optax's. The factored
moments' means over a leading axis narrower than the rest (`_mean`) add halves on CPU, where
XLA's reduction of the [512, 32128] logits kernel took 40-80 ms of the step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import factorized

from pali import reductions


def _factored_dims(shape, factored: bool, min_dim_size_to_factor: int):
  """The (second largest, largest) axes to factor over, or None (as optax)."""
  if not factored or len(shape) < 2:
    return None
  order = np.argsort(shape)
  if shape[order[-2]] < min_dim_size_to_factor:
    return None
  return int(order[-2]), int(order[-1])


def _unzip(like, tree_of_tuples):
  """A tree (shaped as `like`) of k-tuples -> k trees."""
  treedef = jax.tree.structure(like)
  return tuple(treedef.unflatten(x) for x in zip(*treedef.flatten_up_to(tree_of_tuples)))


def _mean(x, axis: int):
  """`jnp.mean(x, axis)`; on CPU, over a leading axis narrower than what it keeps, by halving.

  XLA:CPU reduces the 512 rows of the [512, 32128] logits kernel's squared gradient into its
  32128 column means at a tenth of memory speed (42 ms alone, up to 80 ms a step in the
  training step); adding halves takes 4.8 ms. Kernels taller than wide reduce fast as they are
  (the [32128, 512] embedding: 3.4 ms, where halving takes 12 ms).
  """
  kept = int(np.prod(x.shape[axis + 1:]))
  if jax.default_backend() == "cpu" and axis != x.ndim - 1 and kept > x.shape[axis]:
    return reductions.pairwise_sum(x, axis) / x.shape[axis]
  return jnp.mean(x, axis=axis)


def _decay_rate(step, exponent):
  """Adafactor's second-moment decay 1 - (t + 1)^-exponent."""
  return 1.0 - jnp.asarray(step + 1, jnp.float32) ** (-exponent)


def scale_by_factored_rms(factored: bool = True, decay_rate: float = 0.8,
                          step_offset: int = 0, min_dim_size_to_factor: int = 128,
                          epsilon: float = 1e-30) -> optax.GradientTransformation:
  """Scales by a factored (or, for small or 1-D params, a full) second-moment estimate."""

  def init_fn(params):
    def zeros(p):  # (v_row, v_col, v): the factored pair, or the full moment
      dims = _factored_dims(p.shape, factored, min_dim_size_to_factor)
      unused = jnp.zeros((1,), p.dtype)
      if dims is None:
        return unused, unused, jnp.zeros_like(p)
      return (jnp.zeros(tuple(np.delete(p.shape, dims[1])), p.dtype),
              jnp.zeros(tuple(np.delete(p.shape, dims[0])), p.dtype), unused)

    v_row, v_col, v = _unzip(params, jax.tree.map(zeros, params))
    return factorized.FactoredState(count=jnp.zeros([], jnp.int32), v_row=v_row, v_col=v_col,
                                    v=v)

  def update_fn(grads, state, params):
    if params is None:
      raise ValueError("Adafactor needs the params: pass them to update().")
    decay = _decay_rate(state.count - step_offset, decay_rate)

    def one(grad, v_row, v_col, v, param):
      dtype = param.dtype
      grad_sqr = jnp.square(grad) + epsilon
      dims = _factored_dims(param.shape, factored, min_dim_size_to_factor)
      if dims is None:
        new_v = (decay * v + (1.0 - decay) * grad_sqr).astype(dtype)
        return grad * jax.lax.rsqrt(new_v), v_row, v_col, new_v
      d1, d0 = dims  # d0 the largest axis: v_row averages over it, v_col over d1
      new_row = (decay * v_row + (1.0 - decay) * _mean(grad_sqr, d0)).astype(dtype)
      new_col = (decay * v_col + (1.0 - decay) * _mean(grad_sqr, d1)).astype(dtype)
      row_axis = d1 - 1 if d1 > d0 else d1  # d1's position once d0 is gone
      row_factor = jax.lax.rsqrt(new_row / jnp.mean(new_row, axis=row_axis, keepdims=True))
      update = (grad * jnp.expand_dims(row_factor, d0)
                * jnp.expand_dims(jax.lax.rsqrt(new_col), d1))
      return update, new_row, new_col, v

    updates, v_row, v_col, v = _unzip(
        grads, jax.tree.map(one, grads, state.v_row, state.v_col, state.v, params))
    return updates, factorized.FactoredState(
        count=optax.safe_increment(state.count), v_row=v_row, v_col=v_col, v=v)

  return optax.GradientTransformation(init_fn, update_fn)


def adafactor(learning_rate, *, decay_rate: float = 0.8, clipping_threshold: float | None = 1.0,
              multiply_by_parameter_scale: bool = True, momentum: float | None = None,
              weight_decay_rate: float | None = None, factored: bool = True,
              min_dim_size_to_factor: int = 128,
              epsilon: float = 1e-30) -> optax.GradientTransformation:
  """`optax.adafactor`'s chain (same defaults) around the rsqrt scaling above."""
  tx = [scale_by_factored_rms(factored, decay_rate, 0, min_dim_size_to_factor, epsilon)]
  if clipping_threshold is not None:
    tx.append(optax.clip_by_block_rms(clipping_threshold))
  tx.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
  if multiply_by_parameter_scale:
    tx.append(optax.scale_by_param_block_rms())
  if momentum is not None:
    tx.append(optax.ema(momentum, debias=False))
  if weight_decay_rate is not None:
    tx.append(optax.add_decayed_weights(weight_decay_rate))
  tx.append(optax.scale(-1))
  return optax.chain(*tx)
