"""pali.models.normalise: LayerNorm's written-out backward equals autodiff of the plain formula,
and keeps XLA's fusions of a pre-LN stack's backward from growing with depth."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pali.models import layers
from pali.models import normalise

EPS = 1e-6


def plain_standardise(x, epsilon):
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), -1, keepdims=True) + epsilon)


@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 1)])
def test_value_and_gradient_equal_autodiff_of_the_formula(shape):
  # A large mean checks the two-pass variance; (7, 1) is the degenerate one-feature norm.
  x = jax.random.normal(jax.random.key(0), shape) * 3.0 + 5.0
  cot = jax.random.normal(jax.random.key(1), shape)
  y, vjp = jax.vjp(lambda x: normalise.standardise(x, EPS), x)
  y_ref, vjp_ref = jax.vjp(lambda x: plain_standardise(x, EPS), x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(vjp(cot)[0], vjp_ref(cot)[0], rtol=1e-4, atol=1e-5)


def test_bfloat16_input_gets_a_bfloat16_gradient_of_the_float32_formula():
  x = (jax.random.normal(jax.random.key(2), (4, 32)) * 2.0).astype(jnp.bfloat16)
  cot = jax.random.normal(jax.random.key(3), (4, 32))
  y, vjp = jax.vjp(lambda x: normalise.standardise(x, EPS), x)
  assert y.dtype == jnp.float32
  (dx,) = vjp(cot)
  assert dx.dtype == jnp.bfloat16
  (dx_ref,) = jax.vjp(lambda x: plain_standardise(x, EPS), x.astype(jnp.float32))[1](cot)
  np.testing.assert_allclose(dx.astype(jnp.float32), dx_ref, rtol=2e-2, atol=2e-2)


def test_layer_norm_module_gradients_equal_the_plain_formula():
  x = jax.random.normal(jax.random.key(4), (2, 3, 8))
  ln = layers.LayerNorm()
  params = ln.init(jax.random.key(5), x)
  params = jax.tree.map(lambda p: p + 0.3, params)  # scale 1.3, bias 0.3: both matter

  def loss(params, x, apply):
    return jnp.sum(jnp.sin(apply(params, x)))

  def plain_apply(params, x):
    p = nn.unbox(params)["params"]
    return plain_standardise(x, ln.epsilon) * p["scale"] + p["bias"]

  got = jax.grad(loss, argnums=(0, 1))(params, x, ln.apply)
  want = jax.grad(loss, argnums=(0, 1))(params, x, plain_apply)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


class _PreNormStack(nn.Module):
  depth: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      y = layers.LayerNorm(name=f"norm_{i}")(x)
      x = x + layers.dense(x.shape[-1], ("embed", "mlp"), name=f"dense_{i}")(y)
    return jnp.sum(jnp.square(x))


def _largest_fusion(depth: int) -> int:
  model = _PreNormStack(depth)
  x = jnp.ones((2, 8, 16))
  params = model.init(jax.random.key(0), x)
  hlo = jax.jit(jax.grad(model.apply)).lower(params, x).compile().as_text()
  sizes, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^%?(fused\S*) .*\{$", line)
    if header:
      current = header.group(1)
      sizes[current] = 0
    elif line.startswith("}"):
      current = None
    elif current and " = " in line:
      sizes[current] += 1
  return max(sizes.values())


def test_backward_fusions_do_not_grow_with_depth():
  # Under plain autodiff the largest fusion grew by ~30 ops per layer (the whole LayerNorm
  # backward of every layer above, re-evaluated in each layer's cotangent).
  assert _largest_fusion(8) <= _largest_fusion(2) + 5
