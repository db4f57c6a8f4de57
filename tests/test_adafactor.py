"""pali.training.adafactor computes optax's chain (global-norm clip, optax.adafactor,
per-parameter factors) in one pass: same updates, same state tree."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pali import reductions
from pali.training import adafactor

SHAPES = {
    "kernel": (160, 130),         # factored: v_row [160], v_col [130]
    "wide": (130, 160),           # factored the other way round
    "heads": (160, 6, 64),        # head_dim under 128: unfactored, like pali_small's kernels
    "stacked": (3, 200, 130),     # factored with a leading batch axis
    "bias": (7,),                 # 1-D: unfactored
}


def _params():
  keys = jax.random.split(jax.random.key(0), len(SHAPES))
  return {n: jax.random.normal(k, s) for (n, s), k in zip(SHAPES.items(), keys)}


def _grads(step, params):
  keys = jax.random.split(jax.random.key(100 + step), len(params))
  return {n: jax.random.normal(k, p.shape) * (1 + step) for (n, p), k in zip(params.items(), keys)}


def _reference(sched, clip_grad_norm=None, lr_factors=None, **kwargs):
  """The optax composition create_optimizer ran before adafactor.py computed it in one pass."""
  tx = optax.adafactor(learning_rate=sched, **kwargs)
  if lr_factors is not None:
    tx = optax.chain(tx, adafactor.scale_by_factors(lr_factors))
  if clip_grad_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_grad_norm), tx)
  return tx


@pytest.mark.parametrize("kwargs", [
    {},
    {"clip_grad_norm": 1.0},     # _grads' norm is over 100: every step clips
    {"clip_grad_norm": 1e6},     # never clips
    {"momentum": 0.9, "weight_decay_rate": 1e-3, "clip_grad_norm": 1.0},
    {"factored": False, "clipping_threshold": None, "multiply_by_parameter_scale": False},
    {"lr_factors": {"kernel": 0.25, "wide": 1.0, "heads": 2.0, "stacked": 1.0, "bias": 0.5},
     "weight_decay_rate": 1e-3, "clip_grad_norm": 1.0},
])
def test_updates_and_state_equal_optax(kwargs):
  sched = optax.linear_schedule(0.01, 0.001, 10)
  ours = adafactor.adafactor(sched, **kwargs)
  theirs = _reference(sched, **kwargs)
  params = _params()
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
  assert jax.tree.map(jnp.shape, s_ours) == jax.tree.map(jnp.shape, s_theirs)
  p_ours = p_theirs = params
  for step in range(4):
    g = _grads(step, params)
    u_ours, s_ours = jax.jit(ours.update)(g, s_ours, p_ours)
    u_theirs, s_theirs = jax.jit(theirs.update)(g, s_theirs, p_theirs)
    for a, b in zip(jax.tree.leaves((u_ours, s_ours)), jax.tree.leaves((u_theirs, s_theirs))):
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-8)
    p_ours, p_theirs = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_theirs, u_theirs)


def test_constant_learning_rate_and_frozen_parameters_follow_optax():
  # A float rate (optax.scale, no schedule state) inside multi_transform, which hands the
  # transformation masked trees: the frozen leaves are absent from grads, params and state.
  labels = {n: "frozen" if n == "wide" else "train" for n in SHAPES}
  factors = {n: 0.5 if n == "kernel" else 1.0 for n in SHAPES}

  def masked(tx):
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)

  ours = masked(adafactor.adafactor(3e-3, clip_grad_norm=1.0, lr_factors=factors))
  theirs = masked(_reference(3e-3, clip_grad_norm=1.0, lr_factors=factors))
  params = _params()
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
  for step in range(2):
    g = _grads(step, params)
    u_ours, s_ours = jax.jit(ours.update)(g, s_ours, params)
    u_theirs, s_theirs = jax.jit(theirs.update)(g, s_theirs, params)
    for a, b in zip(jax.tree.leaves((u_ours, s_ours)), jax.tree.leaves((u_theirs, s_theirs))):
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-8)
  assert not np.any(u_ours["wide"])


def test_no_power_op_is_left_for_the_second_moments():
  params = _params()
  tx = adafactor.adafactor(1e-2)
  hlo = jax.jit(tx.update).lower(_grads(0, params), tx.init(params), params).as_text()
  # The only power left is the scalar decay schedule (t + 1)^-0.8.
  powers = [line for line in hlo.splitlines() if "stablehlo.power" in line]
  assert powers and all("tensor<f32>" in line and "x" not in line.split(":")[-1]
                        for line in powers), powers


def test_missing_params_are_refused():
  tx = adafactor.adafactor(1e-2)
  params = _params()
  with pytest.raises(ValueError, match="params"):
    tx.update(_grads(0, params), tx.init(params))


@pytest.mark.parametrize("shape,axis", [((130, 160), 0), ((7, 40), 0), ((5, 33, 200), 1),
                                        ((512, 2048), 0), ((160, 130), 0), ((9, 11), 1)])
def test_column_means_by_halving_equal_the_plain_mean(shape, axis):
  # Wide leading-axis means (the logits kernel's [512, 32128]) are sums of halves on CPU, odd
  # lengths included; tall ones and the last axis take jnp.mean. Same values either way.
  x = jax.random.uniform(jax.random.key(1), shape)
  np.testing.assert_allclose(jax.jit(adafactor._mean, static_argnums=1)(x, axis),
                             jnp.mean(x, axis=axis), rtol=1e-6)
  np.testing.assert_allclose(reductions.pairwise_sum(x, axis), jnp.sum(x, axis=axis), rtol=1e-6)
