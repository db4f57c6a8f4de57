"""Token cross-entropy with per-token weights, z-loss and label smoothing.

Returns SUMS, not means: the trainer divides by the weight sum of the whole global batch, so
that gradient accumulation and the device count do not change the result.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array, *,
                 z_loss: float = 1e-4, label_smoothing: float = 0.0):
  """logits [B, T, V] (any float dtype), targets [B, T] int, weights [B, T] float.

  loss_t = -sum_v q_v log p_v + z_loss * log(Z)^2, with q the (smoothed) one-hot target, as
  t5x's `cross_entropy_with_logits`; the z-loss keeps the softmax normaliser near 1.
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
  z_term = z_loss * jnp.square(log_z)
  loss_sum = jnp.sum((xent + z_term) * weights)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  metrics = {
      "loss": loss_sum,
      "z_loss": jnp.sum(z_term * weights),
      "correct": jnp.sum(correct * weights),
      "weight_sum": jnp.sum(weights),
  }
  return loss_sum, metrics
