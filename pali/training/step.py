"""The jitted train and eval steps.

The loss is normalised by the weight sum of the whole global batch, so 1 device, 8 devices and
any number of accumulation microbatches give the same gradients (up to float rounding).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from pali.training import losses
from pali.training.train_state import TrainState

_METRIC_SUMS = ("loss", "z_loss", "correct", "weight_sum")


def _split_microbatches(batch: dict, num: int) -> dict:
  """[B, ...] -> [num, B/num, ...], microbatch i = rows i, i+num, ... so that every device keeps
  its own rows (a sharded batch axis needs no communication)."""

  def split(x):
    x = x.reshape((x.shape[0] // num, num) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

  return jax.tree_util.tree_map(split, batch)


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation, *,
                    loss=None, skip_nonfinite: bool = True):
  """The optimizer half of the step: `(new_state, grad_norm, finite)`. `finite` is False for a
  non-finite gradient norm (or `loss`); with `skip_nonfinite` that step's state is kept."""
  grad_norm = optax.global_norm(grads)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(grad_norm)
  if loss is not None:
    finite &= jnp.isfinite(loss)
  if skip_nonfinite:
    keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
        lambda n, o: jnp.where(finite, n, o), new, old)
    new_params = keep(new_params, state.params)
    new_opt_state = keep(new_opt_state, state.opt_state)
  new_state = TrainState(step=state.step + 1, params=new_params, opt_state=new_opt_state)
  return new_state, grad_norm, finite


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: Callable[[Any], Any], *, frozen: Any = None,
                    grad_accum_steps: int = 1, z_loss: float = 1e-4,
                    label_smoothing: float = 0.0, loc_targets: losses.LocTargets | None = None,
                    skip_nonfinite: bool = True):
  """Returns `step(state, batch, dropout_rng) -> (state, metrics)` (not yet jitted).

  `frozen` is a tree of bools like the parameters: their gradients are stopped (XLA then skips
  that backward work). A non-finite loss or gradient norm leaves the state unchanged and sets
  metrics['nonfinite'] = 1, so a NaN update can never reach a checkpoint. metrics['param_norm']
  is the norm of the parameters the step started from: Adafactor reads their squares anyway
  (parameter-scaled updates), so XLA shares that pass; the updated ones' norm cost a pass of
  its own over every parameter.
  """

  def loss_fn(params, micro, rng, total_weight):
    if frozen is not None:
      params = jax.tree_util.tree_map(
          lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    logits = model.apply({"params": params}, micro, train=True, rngs={"dropout": rng})
    loss_sum, sums = losses.compute_loss(
        logits, micro["decoder_target_tokens"], micro["decoder_loss_weights"],
        z_loss=z_loss, label_smoothing=label_smoothing, loc_targets=loc_targets)
    return loss_sum / total_weight, sums

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: dict, dropout_rng: jax.Array):
    rng = jax.random.fold_in(dropout_rng, state.step)
    total_weight = jnp.maximum(jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32)), 1e-8)
    if grad_accum_steps == 1:
      (_, sums), grads = grad_fn(state.params, batch, rng, total_weight)
    else:
      micro = _split_microbatches(batch, grad_accum_steps)

      def body(carry, xs):
        grads_acc, sums_acc = carry
        mb, i = xs
        (_, s), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i), total_weight)
        return (jax.tree_util.tree_map(jnp.add, grads_acc, g),
                jax.tree_util.tree_map(jnp.add, sums_acc, s)), None

      zeros_g = jax.tree_util.tree_map(jnp.zeros_like, state.params)
      zeros_s = {k: jnp.zeros((), jnp.float32) for k in _METRIC_SUMS}
      (grads, sums), _ = jax.lax.scan(
          body, (zeros_g, zeros_s), (micro, jnp.arange(grad_accum_steps)))

    loss = sums["loss"] / total_weight
    new_state, grad_norm, finite = apply_gradients(state, grads, tx, loss=loss,
                                                   skip_nonfinite=skip_nonfinite)
    metrics = {
        "loss": loss,
        "z_loss": sums["z_loss"] / total_weight,
        "accuracy": sums["correct"] / total_weight,
        "weight_sum": sums["weight_sum"],
        "grad_norm": grad_norm,
        "param_norm": optax.global_norm(state.params),
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        "nonfinite": 1 - finite.astype(jnp.int32),
    }
    return new_state, metrics

  return step


def make_eval_step(model: nn.Module, *, z_loss: float = 0.0):
  """Teacher-forced loss sums on one batch: `eval_step(params, batch) -> metric sums`."""

  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch, train=False)
    _, sums = losses.compute_loss(logits, batch["decoder_target_tokens"],
                                  batch["decoder_loss_weights"], z_loss=z_loss)
    return sums

  return eval_step
