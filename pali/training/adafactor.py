"""optax's Adafactor (t5x's defaults), computed as one scalar per parameter times its gradient
times its second-moment factors.

`reference_chain` is the optax composition this module computes, and `adafactor` keeps its
state (optax's own `FactoredState`, `ScaleByScheduleState`, `EmaState`), so checkpoints are
interchangeable; tests/test_adafactor.py holds the updates equal to optax's. Why not run the
chain itself: each of its transformations hands the next a full-size tree, and XLA:CPU writes
most of them out. Global-norm clipping, update clipping, the learning rate, the parameter scale
and per-parameter factors all multiply the update by a scalar (or the factored moments' row
and column factors), so the whole update is `alpha * g * row_factor * col_factor`. Its
reductions (the update's RMS, the parameter's RMS) need no update written out: the update's
squared sum is `s^2 * sum(g^2 * row_factor^2 * col_factor^2)`, which for a factored parameter
is reduced over the last axis first, with no [rows, cols] factor written out either. On CPU each
reduction squares the gradient itself (`_squares`), rather than reading a square XLA would
write out for all of them. On pali_small the optimizer half of the step
(bench/optimizer_step.py, with the train step's XLA options) takes 114 ms against optax's
chain's 249 (2.2x). Against the rsqrt chain this module held before it took 162 vs 200 ms,
and the mixed step 0.90-0.97x the time; reducing the factored squared sums without the outer
product took it from 134 to 111 ms (BENCHMARKS.md, "Training step").

Other CPU details: the inverse square roots are `rsqrt`; optax writes `v ** -0.5`, a general
`power` that XLA:CPU runs 10x slower (119 vs 12 ms over 26M elements; pali_small keeps 26M
second moments unfactored: head_dim 64 is under `min_dim_size_to_factor`). The factored
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

_MIN_PARAM_SCALE = 1e-3  # optax.scale_by_param_block_rms's default, as in optax.adafactor


def _factored_dims(shape, factored: bool, min_dim_size_to_factor: int):
  """The (second largest, largest) axes to factor over, or None (as optax)."""
  if not factored or len(shape) < 2:
    return None
  order = np.argsort(shape)
  if shape[order[-2]] < min_dim_size_to_factor:
    return None
  return int(order[-2]), int(order[-1])


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


def _squares(g, n: int):
  """n copies of g's float32 square; on CPU computed apart, each inside the reduction that
  reads it.

  One `jnp.square(g)` read by several reductions (the moments' row and column means, the
  update's squared sum) is written out by XLA:CPU: a pass over every gradient to write, 98.8M
  floats a step on pali_small, and as many to read back. Squared inside each reduction, g is
  read instead and nothing is written: the optimizer half of the step took 130 against 161 ms
  (BENCHMARKS.md, "Training step"). Each copy passes through its own optimization barrier,
  tagged with its index, so that XLA cannot merge them into one square again. Other backends
  fuse a shared producer into several reductions themselves and get the plain square.
  """
  if jax.default_backend() != "cpu":
    return [jnp.square(g.astype(jnp.float32))] * n
  return [jnp.square(jax.lax.optimization_barrier((g, jnp.int32(i)))[0].astype(jnp.float32))
          for i in range(n)]


def _decay_rate(step, exponent):
  """Adafactor's second-moment decay 1 - (t + 1)^-exponent."""
  return 1.0 - jnp.asarray(step + 1, jnp.float32) ** (-exponent)


def factors_like(factors):
  """tree -> each leaf's factor from `factors` (floats, a tree like the parameters), looked up
  by key path: the trees optax.multi_transform hands on (frozen leaves masked out) match too."""
  by_path = {jax.tree_util.keystr(k): float(f)
             for k, f in jax.tree_util.tree_flatten_with_path(factors)[0]}
  return lambda tree: jax.tree_util.tree_map_with_path(
      lambda k, _: by_path[jax.tree_util.keystr(k)], tree)


def scale_by_factors(factors) -> optax.GradientTransformation:
  """Multiplies each update by its factor (`factors_like`); no state."""
  factors_of = factors_like(factors)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, f: u if f == 1.0 else u * f, updates,
                        factors_of(updates)), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def reference_chain(learning_rate, *, clip_grad_norm: float | None = None, lr_factors=None,
                    decay_rate: float = 0.8, clipping_threshold: float | None = 1.0,
                    multiply_by_parameter_scale: bool = True, momentum: float | None = None,
                    weight_decay_rate: float | None = None, factored: bool = True,
                    min_dim_size_to_factor: int = 128,
                    epsilon: float = 1e-30) -> optax.GradientTransformation:
  """What `adafactor` computes, as optax composes it: `optax.adafactor`'s chain, then each
  parameter's factor (`lr_factors`), after global-norm clipping (`clip_grad_norm`)."""
  tx = optax.adafactor(learning_rate, decay_rate=decay_rate,
                       clipping_threshold=clipping_threshold,
                       multiply_by_parameter_scale=multiply_by_parameter_scale,
                       momentum=momentum, weight_decay_rate=weight_decay_rate, factored=factored,
                       min_dim_size_to_factor=min_dim_size_to_factor, eps=epsilon)
  if lr_factors is not None:
    tx = optax.chain(tx, scale_by_factors(lr_factors))
  if clip_grad_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_grad_norm), tx)
  return tx


_STATEFUL = (factorized.FactoredState, optax.ScaleByScheduleState, optax.EmaState)


def _find(state, kind):
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, _STATEFUL))
           if isinstance(s, kind)]
  return found[0] if found else None


def adafactor(learning_rate, *, clip_grad_norm: float | None = None, lr_factors=None,
              decay_rate: float = 0.8, clipping_threshold: float | None = 1.0,
              multiply_by_parameter_scale: bool = True, momentum: float | None = None,
              weight_decay_rate: float | None = None, factored: bool = True,
              min_dim_size_to_factor: int = 128,
              epsilon: float = 1e-30) -> optax.GradientTransformation:
  """`reference_chain`'s updates and state (same arguments; `optax.adafactor`'s defaults),
  computed per parameter as one scalar times the gradient times its moment factors.

  `lr_factors`: a tree of floats like the parameters (optimizer.multiplier_tree), each
  parameter's learning-rate factor, weight decay included.
  """
  reference = reference_chain(
      learning_rate, clip_grad_norm=clip_grad_norm, lr_factors=lr_factors,
      decay_rate=decay_rate, clipping_threshold=clipping_threshold,
      multiply_by_parameter_scale=multiply_by_parameter_scale, momentum=momentum,
      weight_decay_rate=weight_decay_rate, factored=factored,
      min_dim_size_to_factor=min_dim_size_to_factor, epsilon=epsilon)
  factors_of = factors_like(lr_factors) if lr_factors is not None else None

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("Adafactor needs the params: pass them to update().")
    moments = _find(state, factorized.FactoredState)
    schedule_state, ema_state = _find(state, optax.ScaleByScheduleState), _find(
        state, optax.EmaState)
    # The global-norm clip as a scale s of the gradient: the moments see (s g)^2 + eps.
    s = jnp.float32(1.0)
    if clip_grad_norm:
      g_norm = optax.global_norm(grads)
      s = jnp.where(g_norm < clip_grad_norm, 1.0, clip_grad_norm / g_norm)
    decay = _decay_rate(moments.count, decay_rate)
    lr = learning_rate(schedule_state.count) if callable(learning_rate) else learning_rate

    def one(g, v_row, v_col, v, p, mu, lr_factor):
      dtype = p.dtype
      dims = _factored_dims(p.shape, factored, min_dim_size_to_factor)
      if dims is None:  # full second moment
        g2, g2_b = _squares(g, 2)  # one per reduction that reads it
        v = (decay * v + (1.0 - decay) * (s * s * g2 + epsilon)).astype(dtype)
        factor = jax.lax.rsqrt(v.astype(jnp.float32))
        sq_sum = jnp.sum(g2_b * jnp.square(factor))
      else:
        g2, g2_b, g2_c = _squares(g, 3)
        d1, d0 = dims  # d0 the largest axis: v_row averages over it, v_col over d1
        v_row = (decay * v_row + (1.0 - decay) * (s * s * _mean(g2, d0) + epsilon)).astype(dtype)
        v_col = (decay * v_col + (1.0 - decay) * (s * s * _mean(g2_b, d1) + epsilon)).astype(dtype)
        row_axis = d1 - 1 if d1 > d0 else d1  # d1's position once d0 is gone
        row = jax.lax.rsqrt(v_row / jnp.mean(v_row, axis=row_axis, keepdims=True))
        col = jax.lax.rsqrt(v_col)
        factor = jnp.expand_dims(row, d0) * jnp.expand_dims(col, d1)
        # The update's squared sum, sum(g^2 row^2 col^2), without the outer product written
        # out, and reduced first over the last of d0, d1 (XLA:CPU's fast direction).
        inner, inner_axis, outer, first = (row, d0, col, d1) if d1 > d0 else (col, d1, row, d0)
        sq_sum = jnp.sum(jnp.sum(g2_c * jnp.expand_dims(jnp.square(inner), inner_axis), axis=first)
                         * jnp.square(outer))
      alpha = s * lr
      if clipping_threshold is not None:  # the update (s g factor)'s RMS, not written out
        rms = s * jnp.sqrt(sq_sum / g.size)
        alpha = alpha / jnp.maximum(1.0, rms / clipping_threshold)
      if multiply_by_parameter_scale:
        p_rms = jnp.sqrt(jnp.mean(jnp.square(p.astype(jnp.float32))))
        alpha = alpha * jnp.maximum(p_rms, _MIN_PARAM_SCALE)
      update = alpha * g * factor
      if momentum is not None:
        mu = ((1.0 - momentum) * update + momentum * mu).astype(mu.dtype)
        update = mu
      if weight_decay_rate is not None:
        update = update + weight_decay_rate * p
      update = -update * lr_factor if lr_factor != 1.0 else -update
      return update.astype(g.dtype), v_row, v_col, v, mu

    leaves, treedef = jax.tree.flatten(grads)
    columns = [leaves] + [treedef.flatten_up_to(t) for t in (moments.v_row, moments.v_col,
                                                             moments.v, params)]
    columns.append(treedef.flatten_up_to(ema_state.ema) if ema_state else [None] * len(leaves))
    columns.append(jax.tree.leaves(factors_of(grads)) if factors_of else [1.0] * len(leaves))
    out = [one(*args) for args in zip(*columns)]
    updates, v_row, v_col, v, mu = (treedef.unflatten(list(x)) for x in zip(*out))

    def renew(sub):
      if isinstance(sub, factorized.FactoredState):
        return factorized.FactoredState(count=optax.safe_increment(sub.count), v_row=v_row,
                                        v_col=v_col, v=v)
      if isinstance(sub, optax.ScaleByScheduleState):
        return optax.ScaleByScheduleState(count=optax.safe_increment(sub.count))
      if isinstance(sub, optax.EmaState):
        return optax.EmaState(count=optax.safe_increment(sub.count), ema=mu)
      return sub

    return updates, jax.tree.map(renew, state, is_leaf=lambda x: isinstance(x, _STATEFUL))

  return optax.GradientTransformation(reference.init, update_fn)
