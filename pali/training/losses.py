"""Token cross-entropy with per-token weights, z-loss, label smoothing and soft location targets.

Returns SUMS, not means: the trainer divides by the weight sum of the whole global batch, so
that gradient accumulation and the device count do not change the result.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LocTargets(NamedTuple):
  """Soft targets for coordinate tokens: ids [first, first + num) are ordered bins, and a target
  bin b is trained towards a Gaussian over bins centred on b (std `sigma` bins, truncated to the
  range, renormalised). Neighbouring bins then share gradient signal, so the output and input
  embeddings of nearby coordinates become alike instead of being `num` unrelated classes; the
  mode stays at b, so greedy decoding still aims at the exact bin."""
  first: int
  num: int
  sigma: float


def _loc_xent(log_probs, targets, loc: LocTargets):
  """(-sum_j q_j log p_j - H(q)) over the location bins, and a mask of the loc targets."""
  is_loc = (targets >= loc.first) & (targets < loc.first + loc.num)
  b = jnp.clip(targets - loc.first, 0, loc.num - 1).astype(jnp.float32)
  bins = jnp.arange(loc.num, dtype=jnp.float32)
  logq = -0.5 * jnp.square((bins - b[..., None]) / loc.sigma)
  logq = logq - jax.nn.logsumexp(logq, axis=-1, keepdims=True)
  q = jnp.exp(logq)
  loc_logp = jax.lax.dynamic_slice_in_dim(log_probs, loc.first, loc.num, axis=-1)
  # Minus the entropy of q, so a model that predicts q exactly scores 0 (as with smoothing).
  return jnp.sum(q * (logq - loc_logp), axis=-1), is_loc


def _target_strictly_max(logits, targets):
  """Whether each target's logit beats every other logit: argmax == target, except that a tie
  for the maximum counts as wrong (so all-equal logits score 0, not a lucky 1/V). One max
  reduction instead of argmax's (value, index) one: 4.3 vs 20 ms for [8, 32, 32128] on CPU."""
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  is_target = jnp.arange(logits.shape[-1]) == targets[..., None]
  return target_logit > jnp.max(jnp.where(is_target, -jnp.inf, logits), axis=-1)


def compute_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array, *,
                 z_loss: float = 1e-4, label_smoothing: float = 0.0,
                 loc_targets: LocTargets | None = None):
  """logits [B, T, V] (any float dtype), targets [B, T] int, weights [B, T] float.

  loss_t = -sum_v q_v log p_v + z_loss * log(Z)^2, with q the (smoothed) one-hot target, as
  t5x's `cross_entropy_with_logits`; the z-loss keeps the softmax normaliser near 1. With
  `loc_targets` (sigma > 0), location targets use the Gaussian q of LocTargets instead.
  Returns (weighted loss sum, metrics of sums).
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1) if vocab > 1 else 0.0
  target_logp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  if label_smoothing:
    # Subtract the entropy of the smoothed target so a perfect model scores 0.
    normalizer = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
    xent = -(confidence * target_logp + low * (log_probs.sum(-1) - target_logp)) - normalizer
  else:
    xent = -target_logp
  if loc_targets is not None and loc_targets.sigma > 0:
    if loc_targets.first + loc_targets.num > vocab:
      raise ValueError(f"Location ids [{loc_targets.first}, "
                       f"{loc_targets.first + loc_targets.num}) exceed the vocabulary ({vocab}).")
    loc_xent, is_loc = _loc_xent(log_probs, targets, loc_targets)
    xent = jnp.where(is_loc, loc_xent, xent)
  z_term = z_loss * jnp.square(log_z)
  loss_sum = jnp.sum((xent + z_term) * weights)
  correct = _target_strictly_max(logits, targets).astype(jnp.float32)
  metrics = {
      "loss": loss_sum,
      "z_loss": jnp.sum(z_term * weights),
      "correct": jnp.sum(correct * weights),
      "weight_sum": jnp.sum(weights),
  }
  return loss_sum, metrics
