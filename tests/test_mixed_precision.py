"""pali.models.matmul: the custom-VJP matmuls equal plain autodiff, and the mixed-precision
mode (bf16 operands, float32 accumulation) keeps gradients within 1% of float32's and the loss
curve on float32's."""
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pali.models import matmul
from pali.training import losses
from tests import trainer_fixtures


def _rand(key, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(key), shape, dtype)


@pytest.mark.parametrize("axis,x_shape,w_shape", [
    ((-1,), (2, 5, 6), (6, 4)),            # [B, L, D] x [D, F]
    ((-1,), (2, 5, 6), (6, 3, 4)),         # q/k/v: [D] -> [heads, head_dim]
    ((-2, -1), (2, 5, 3, 4), (3, 4, 6)),   # out: [heads, head_dim] -> [D]
    ((1,), (2, 6, 5), (6, 4)),             # a non-trailing contracted axis
])
def test_dense_matches_autodiff_in_float32(axis, x_shape, w_shape):
  x, w = _rand(0, x_shape), _rand(1, w_shape)
  n = len(axis)
  axes = tuple(a % len(x_shape) for a in axis)

  def ref(x, w):
    return jax.lax.dot_general(x, w, ((axes, tuple(range(n))), ((), ())))

  ours = lambda x, w: matmul.dense(x, w, axis, jnp.float32)  # noqa: E731
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  cot = _rand(2, ref(x, w).shape)
  g_ref = jax.vjp(ref, x, w)[1](cot)
  g_ours = jax.vjp(ours, x, w)[1](cot)
  for a, b in zip(g_ours, g_ref):
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias_shape", [(1, 3, 5, 7), (3, 5, 7), (1, 1, 5, 7), (2, 3, 5, 7)])
def test_add_broadcast_gradient_equals_autodiff_and_sums_halves(bias_shape):
  # The bias gradient (a sum over the batch) adds halves on CPU (6 rows: 3, then an odd 3):
  # XLA:CPU's reductions over a leading axis ran ~40x slower (BENCHMARKS.md, "Training step").
  x, bias, cot = _rand(0, (2, 3, 5, 7)), _rand(1, bias_shape), _rand(2, (2, 3, 5, 7))
  ours = jax.vjp(matmul.add_broadcast, x, bias)
  ref = jax.vjp(lambda x, b: x + b, x, bias)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6)
  for a, b in zip(ours[1](cot), ref[1](cot)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  hlo = jax.jit(jax.grad(lambda b: jnp.sum(matmul.add_broadcast(x, b) * cot))).lower(
      bias).as_text()
  assert "reduce" not in hlo and "dot_general" not in hlo, hlo


def test_add_broadcast_refuses_a_bias_that_broadcasts_inside():
  with pytest.raises(ValueError, match="trailing"):
    jax.vjp(matmul.add_broadcast, _rand(0, (2, 3, 5)), _rand(1, (2, 1, 5)))


def test_add_bias_equals_autodiff_in_float32():
  x, bias, cot = _rand(0, (2, 3, 5, 7)), _rand(1, (5, 7)), _rand(2, (2, 3, 5, 7))
  ours = jax.vjp(matmul.add_bias, x, bias)
  ref = jax.vjp(lambda x, b: x + b, x, bias)
  np.testing.assert_array_equal(ours[0], ref[0])
  for a, b in zip(ours[1](cot), ref[1](cot)):
    assert a.shape == b.shape and a.dtype == b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_add_bias_sums_a_bfloat16_cotangent_in_float32():
  # 1568 rows, as pali_small's ViT (8 x 196 tokens). Autodiff's sum in bfloat16 rounds its
  # partial sums to bfloat16; ours is the float32 sum of the bf16 values.
  x = _rand(0, (8, 196, 16), jnp.bfloat16)
  bias = _rand(1, (16,))
  cot = (1.0 + jnp.abs(_rand(2, x.shape))).astype(jnp.bfloat16)
  y, vjp = jax.vjp(matmul.add_bias, x, bias)
  assert y.dtype == jnp.bfloat16
  dx, dbias = vjp(cot)
  assert dx.dtype == jnp.bfloat16 and dbias.dtype == jnp.float32
  exact = np.asarray(cot, np.float64).sum(axis=(0, 1))
  np.testing.assert_allclose(dbias, exact, rtol=1e-6)
  _, ref_vjp = jax.vjp(lambda x, b: x + b.astype(x.dtype), x, bias)
  ref_err = np.max(np.abs(np.asarray(ref_vjp(cot)[1], np.float64) - exact) / exact)
  assert ref_err > 1e-4  # what the float32 sum avoids


def test_add_bias_refuses_a_bias_that_is_not_trailing():
  with pytest.raises(ValueError, match="trailing"):
    jax.vjp(matmul.add_bias, _rand(0, (2, 3, 5)), _rand(1, (3,)))


def test_float32_dots_take_transposes_unmaterialised_on_cpu():
  # Only 16-bit dots need row-major copies of their transposed operands on CPU; for float32
  # the copies cost the pali_small step 3.5% (BENCHMARKS.md, "Training step").
  x, w = _rand(0, (4, 16, 32)), _rand(1, (32, 24))
  for dtype, barrier in ((jnp.float32, False), (jnp.bfloat16, True)):
    f = lambda x, w, d=dtype: jnp.sum(matmul.dense(x.astype(d), w, (-1,), d).astype(  # noqa
        jnp.float32) ** 2)
    hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).as_text()
    assert ("optimization_barrier" in hlo) == barrier


def test_custom_backward_off_gives_the_same_model_gradients():
  # matmul.custom_backward = False leaves the backward to autodiff (faster on some CPUs).
  model = trainer_fixtures.tiny_model()
  batch = trainer_fixtures.random_batch(3)
  params = jax.jit(lambda r: model.init(r, batch)["params"])(jax.random.key(0))
  grads = []
  for custom in (True, False):
    gin.bind_parameter("matmul.custom_backward", custom)
    grads.append(jax.jit(jax.grad(_loss_fn(model)))(params, batch))
  for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_backward_dots_stay_bfloat16_with_or_without_materialised_transposes(
    monkeypatch):
  # Plain autodiff would run the backward of a bf16 -> f32 dot as an f32 dot (TF32 GEMMs on an
  # H200, BENCHMARKS.md "GPU"); the custom VJP keeps it bf16. Off CPU the transposes are left
  # to the compiler: the same dots and gradients, minus the copies and barriers.
  x, w = _rand(0, (4, 16, 32)), _rand(1, (32, 24))
  q, k = _rand(2, (2, 8, 3, 16)), _rand(3, (2, 8, 3, 16))

  def f(x, w, q, k):
    bf = lambda t: t.astype(jnp.bfloat16)  # noqa: E731
    y = matmul.dense(bf(x), w, (-1,), jnp.bfloat16)
    probs = jax.nn.softmax(matmul.attention_logits(bf(q), bf(k)), axis=-1)
    o = matmul.attention_combine(bf(probs), bf(k), jnp.bfloat16)
    return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(o.astype(jnp.float32) ** 2)

  results = {}
  for materialise in (True, False):
    monkeypatch.setattr(matmul, "_materialise_transposes", lambda _op, m=materialise: m)
    # A fresh function each time: jit caches traces per function, blind to the patch.
    grad = jax.grad(lambda *a: f(*a), argnums=(0, 1, 2, 3))
    hlo = jax.jit(grad).lower(x, w, q, k).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert len(dots) == 9, dots  # 3 products x (forward, 2 gradients)
    assert all(line.split("->")[0].count("bf16") == 2 for line in dots), dots
    assert ("optimization_barrier" in hlo) == materialise
    results[materialise] = jax.jit(grad)(x, w, q, k)
  for a, b in zip(results[True], results[False]):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_mixed_matmuls_use_bfloat16_operands_and_float32_results():
  gin.bind_parameter("matmul.precision", "mixed")
  x, w = _rand(0, (4, 8, 16)), _rand(1, (16, 32))
  f = lambda x, w: jnp.sum(matmul.dense(x, w, (-1,), jnp.float32) ** 2)  # noqa: E731
  hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).as_text()
  dots = [line for line in hlo.splitlines() if "dot_general" in line]
  assert len(dots) == 3  # forward, dx, dW
  assert all("bf16" in line and "-> tensor<" in line and "xf32>" in line.split("->")[-1]
             for line in dots), dots
  gx, gw = jax.grad(f, argnums=(0, 1))(x, w)
  assert gx.dtype == gw.dtype == jnp.float32
  # Attention products: the gradient of float32 up to bf16 rounding.
  q, k, v = _rand(3, (2, 5, 3, 4)), _rand(4, (2, 7, 3, 4)), _rand(5, (2, 7, 3, 4))

  def attend(q, k, v):
    w = jax.nn.softmax(matmul.attention_logits(q, k), axis=-1)
    return jnp.sum(jnp.tanh(matmul.attention_combine(w, v, jnp.float32)))

  mixed = jax.grad(attend, argnums=(0, 1, 2))(q, k, v)
  gin.bind_parameter("matmul.precision", "default")
  exact = jax.grad(attend, argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(lambda q, k, v: jnp.sum(jnp.tanh(jnp.einsum(
      "bhqk,bkhd->bqhd", jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1), v))),
                 argnums=(0, 1, 2))(q, k, v)
  for a, b, c in zip(mixed, exact, ref):
    np.testing.assert_allclose(b, c, rtol=1e-5, atol=1e-6)
    assert _rel_err(a, c) < 0.02


@pytest.mark.parametrize("split", ["none", "forward", "both"])
def test_split_weights_make_the_weight_exact_where_asked(split):
  # Inputs that bf16 holds exactly, so only the weight's rounding is left: a hi + lo pair
  # carries it to ~2^-17 (float32 accumulation), a single bf16 pass to ~2^-9.
  gin.bind_parameter("matmul.precision", "mixed")
  gin.bind_parameter("matmul.split_weights", split)
  bf16_exact = lambda key, shape: _rand(key, shape).astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
  x, w, g = bf16_exact(0, (4, 8, 64)), _rand(1, (64, 48)), bf16_exact(2, (4, 8, 48))
  y, vjp = jax.vjp(lambda x, w: matmul.dense(x, w, (-1,), jnp.float32), x, w)
  dx, dw = vjp(g)
  hp = jax.lax.Precision.HIGHEST
  y_ref = jnp.einsum("blk,kn->bln", x, w, precision=hp)
  dx_ref = jnp.einsum("bln,kn->blk", g, w, precision=hp)
  forward_exact = _rel_err(y, y_ref) < 1e-4
  input_grad_exact = _rel_err(dx, dx_ref) < 1e-4
  assert forward_exact == (split != "none"), _rel_err(y, y_ref)
  assert input_grad_exact == (split == "both"), _rel_err(dx, dx_ref)
  assert _rel_err(dw, jnp.einsum("blk,bln->kn", x, g, precision=hp)) < 1e-4  # a, g: exact


def test_split_layers_split_only_the_named_dense_layers():
  gin.bind_parameter("matmul.precision", "mixed")
  gin.bind_parameter("matmul.split_weights", "forward")
  gin.bind_parameter("matmul.split_layers", ("wo",))
  x = _rand(0, (4, 64)).astype(jnp.bfloat16).astype(jnp.float32)  # exact in bf16
  w = _rand(1, (64, 48))
  y_ref = jnp.einsum("bk,kn->bn", x, w, precision=jax.lax.Precision.HIGHEST)
  named = lambda layer: _rel_err(matmul.dense(x, w, (-1,), jnp.float32, layer=layer), y_ref)  # noqa: E731
  assert named("wo") < 1e-4                    # split: the weight is exact to ~2^-17
  assert named("wi") > 1e-4 and named(None) > 1e-4  # one bf16 pass: ~2^-9


def test_unknown_split_is_refused():
  gin.bind_parameter("matmul.split_weights", "half")
  with pytest.raises(ValueError, match="matmul.split_weights"):
    matmul.dense(jnp.ones((2, 3)), jnp.ones((3, 4)), (-1,), jnp.float32)


def test_unknown_precision_is_refused():
  gin.bind_parameter("matmul.precision", "fp8")
  with pytest.raises(ValueError, match="matmul.precision"):
    matmul.dense(jnp.ones((2, 3)), jnp.ones((3, 4)), (-1,), jnp.float32)


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _loss_fn(model):
  def loss(params, batch):
    logits = model.apply({"params": params}, batch)
    total, _ = losses.compute_loss(logits, batch["decoder_target_tokens"],
                                   batch["decoder_loss_weights"])
    return total / jnp.sum(batch["decoder_loss_weights"])
  return loss


def _grads_and_curve(precision: str, params, batch, steps: int):
  """Gradient at `params` and the loss curve of `steps` Adam steps, at one precision (one
  jitted scan, so one compilation per precision)."""
  gin.bind_parameter("matmul.precision", precision)
  grad_fn = jax.value_and_grad(_loss_fn(trainer_fixtures.tiny_model()))
  tx = optax.adam(3e-3)

  def train(carry, _):
    p, o = carry
    loss, g = grad_fn(p, batch)
    u, o = tx.update(g, o, p)
    return (optax.apply_updates(p, u), o), loss

  @jax.jit
  def run(p):
    _, grads = grad_fn(p, batch)
    _, curve = jax.lax.scan(train, (p, tx.init(p)), None, length=steps)
    return grads, curve

  grads, curve = run(params)
  return grads, np.asarray(curve)


def test_mixed_precision_gradients_and_loss_curve_track_float32():
  model = trainer_fixtures.tiny_model()
  batch = trainer_fixtures.random_batch(8)
  params = jax.jit(lambda r: model.init(r, batch)["params"])(jax.random.key(0))
  g32, curve32 = _grads_and_curve("default", params, batch, steps=20)
  gmix, curvemix = _grads_and_curve("mixed", params, batch, steps=20)
  flat32 = jax.tree_util.tree_leaves_with_path(g32)
  flatmix = jax.tree_util.tree_leaves(gmix)
  v32 = np.concatenate([np.ravel(x) for _, x in flat32])
  vmix = np.concatenate([np.ravel(x) for x in flatmix])
  # bf16 operands round activations and weights by up to 2^-9 at every matmul; over this
  # model's ~20 chained matmuls the whole gradient moves by about 1.4% (relative L2), the same
  # at widths 32 to 128; keeping the backward or the attention in float32 does not change it.
  assert _rel_err(vmix, v32) < 0.02, _rel_err(vmix, v32)
  cosine = float(vmix @ v32 / (np.linalg.norm(vmix) * np.linalg.norm(v32)))
  assert cosine > 0.9995, cosine
  for (path, a), b in zip(flat32, flatmix):
    assert b.dtype == jnp.float32
    if np.linalg.norm(np.asarray(a)) > 1e-3 * np.sqrt(a.size):  # skip near-zero leaves
      assert _rel_err(b, a) < 0.03, (jax.tree_util.keystr(path), _rel_err(b, a))
  assert curve32[-1] < 0.6 * curve32[0]  # it learns, so the curves mean something
  np.testing.assert_allclose(curvemix, curve32, rtol=0.03)


def test_mixed_with_split_weights_keeps_the_whole_gradient_within_one_percent():
  # Weight rounding in the forward and input-gradient products is most of mixed's gradient gap
  # at pali_small's widths (bench/grad_precision.py: 1.30% -> 0.51% with 'both' on the full
  # model); here pali_small with 2 layers per stack, 64 px, to keep the test short.
  from pali.models import pali as pali_model
  gin.parse_config_files_and_bindings(["gin_configs/models/pali_small.gin"], [
      "DTYPE = 'float32'", "ViTConfig.depth = 2", "T5Config.num_encoder_layers = 2",
      "T5Config.num_decoder_layers = 2"], finalize_config=False)
  model = pali_model.build_model_for_image_size(64)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, model.config.t5.vocab_size, (4, 17)).astype(np.int32)
  batch = {"images": rng.integers(0, 256, (4, 1, 64, 64, 3)).astype(np.uint8),
           "image_mask": np.ones((4, 1), np.int32),
           "encoder_input_tokens": rng.integers(3, 1000, (4, 16)).astype(np.int32),
           "decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
           "decoder_loss_weights": np.ones((4, 16), np.float32)}
  params = jax.jit(lambda r: model.init(r, batch)["params"])(jax.random.key(0))
  flat = {}
  for precision, split in (("default", "none"), ("mixed", "none"), ("mixed", "both")):
    gin.bind_parameter("matmul.precision", precision)
    gin.bind_parameter("matmul.split_weights", split)
    grads = jax.jit(jax.grad(_loss_fn(model)))(params, batch)
    flat[precision, split] = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(grads)])
  exact = flat["default", "none"]
  split_err = _rel_err(flat["mixed", "both"], exact)
  assert split_err < 0.01, split_err
  assert split_err < 0.8 * _rel_err(flat["mixed", "none"], exact)
