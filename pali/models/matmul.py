"""The model's matmuls, with a hand-written backward pass and an optional mixed precision.

Why a custom VJP: under plain autodiff the backward of a bf16 x bf16 -> float32 dot is a
float32 dot (the float32 cotangent promotes the saved bf16 operand), so two thirds of a bfloat16
model's matmul FLOPs ran in float32: TF32 GEMMs on an H200, where keeping them bf16 made the
step 1.4-1.5x faster (BENCHMARKS.md, "GPU"), and slow float32 kernels on CPU. Here the backward
products take the forward's operand dtype, with float32 accumulation. On CPU, also, XLA gets the
weight gradient of a [B, L, K] x [K, N] projection as a dot contracting over the rows (B, L),
which it does not route to its fast matmul kernels: there every product is a (batched)
[m, k] x [k, n] or [m, k] x [n, k]^T matmul, forward and backward, and a transpose a 16-bit
dot needs is materialised (a cheap copy) rather than folded into the dot (float32 dots take the
folded transpose well). `matmul.custom_backward = False` leaves it all to autodiff.

`add_broadcast` adds an attention bias shared by the batch; on CPU its gradient's batch sum adds
halves (`reductions.pairwise_sum`), because XLA:CPU ran that reduction ~40x slower. `add_bias`
adds a dense layer's bias and sums its gradient in float32.

Precision, a gin binding read when the model is traced (`matmul.precision`):
- 'default': operands in the layer's compute dtype (float32, or bfloat16 accumulating in
  float32 and rounded to bfloat16).
- 'mixed': every projection (the logits included) and both attention products take bfloat16
  operands and give float32 results, forward and backward, while the activations between them,
  the parameters and the optimizer stay in the layer's dtype (float32 with DTYPE = 'float32').
  The whole gradient differs from float32's by 1.2-1.5% at initialisation (relative L2;
  pali_small and the test model of tests/test_mixed_precision.py), by 0.4-0.7% along a
  pali_small training run from step 100 on (bench/grad_precision.py --checkpoint), and the
  loss curve tracks float32's.

`matmul.split_weights` (projections whose float32 weights meet bf16 operands: mixed, or
DTYPE = 'bfloat16'; attention has no weights): 'none' (default);
'forward', the weight as two bf16 passes, hi = bf16(w) and lo = bf16(w - hi), in the forward
product; 'both', also in the input gradient. Rounding the weights is most of mixed's gradient
gap: on pali_small, batch 8, the whole gradient moves 1.30% (none), 0.74% (forward) and 0.51%
(both) from float32's, for one (forward) or two (both) extra bf16 passes per projection
(bench/grad_precision.py; step times in BENCHMARKS.md). Under `custom_backward = False`
autodiff differentiates both passes, so 'forward' acts as 'both'.
"""
from __future__ import annotations

import functools
import itertools

import gin
import jax
import jax.numpy as jnp
import numpy as np

from pali import reductions

PRECISIONS = ("default", "mixed")


@gin.configurable("matmul")
def _configured(precision: str = "default", custom_backward: bool = True,
                split_weights: str = "none", split_layers: tuple[str, ...] = ()):
  return precision, custom_backward, split_weights, tuple(split_layers)


SPLITS = ("none", "forward", "both")


def _split_weights(layer: str | None = None) -> str:
  """The split for a dense layer named `layer`: `split_weights`, or 'none' where
  `split_layers` is given and does not name it."""
  _, _, split, layers = _configured()
  if split not in SPLITS:
    raise ValueError(f"matmul.split_weights={split!r} is not one of {SPLITS}.")
  return split if not layers or layer in layers else "none"


def _materialise_transposes(op_dtype) -> bool:
  """Row-major transposes before 16-bit dots: a need of XLA's CPU kernels only (GPU and TPU
  compilers fold a transpose into the dot's layout better than a copy would; float32 dots take
  the folded transpose on CPU too, and the copies made the float32 step 3.5% slower)."""
  return (_configured()[1] and jax.default_backend() == "cpu"
          and jnp.dtype(op_dtype).itemsize == 2)


def get_precision() -> str:
  precision = _configured()[0]
  if precision not in PRECISIONS:
    raise ValueError(f"matmul.precision={precision!r} is not one of {PRECISIONS}; fix the gin "
                     "binding.")
  return precision


def operand_dtype(dtype):
  """The dtype matmul operands take for a layer computing in `dtype`."""
  return jnp.bfloat16 if get_precision() == "mixed" else jnp.dtype(dtype)


def _acc(op_dtype):
  return jnp.float32 if jnp.dtype(op_dtype) in (jnp.bfloat16, jnp.float16) else op_dtype


def _dot(a, b, op_dtype, b_transposed: bool):
  """a [..., m, k] @ b [..., k, n] (or b [..., n, k] transposed), leading dims batched."""
  nb = a.ndim - 2
  batch = tuple(range(nb))
  contract = ((a.ndim - 1,), (b.ndim - 1 if b_transposed else b.ndim - 2,))
  return jax.lax.dot_general(a.astype(op_dtype), b.astype(op_dtype), (contract, (batch, batch)),
                             preferred_element_type=_acc(op_dtype))


def _transpose(x, perm, op_dtype):
  """`jnp.transpose(x, perm)`, materialised in row-major order for a dot in `op_dtype`.

  XLA's CPU backend hands a bfloat16 -> float32 dot to its fast YNNPACK kernels only when both
  operands are row-major; a plain transpose reaches the dot as a column-major view (or gets
  folded into it), and the dot is then upcast to float32 and run on slower kernels. A unit
  dimension carried through the transpose and reshaped away gives the copy a row-major layout;
  the barrier keeps later passes from folding it back into the dot.
  """
  if not _materialise_transposes(op_dtype):
    return jnp.transpose(x, perm)
  n = x.ndim
  y = jnp.transpose(jnp.reshape(x, x.shape + (1,)), (perm[0], n) + tuple(perm[1:]))
  return jax.lax.optimization_barrier(jnp.reshape(y, tuple(x.shape[p] for p in perm)))


def _transposed(x):
  """x with its last two dims swapped, materialised for a dot in x's dtype (`_transpose`)."""
  perm = tuple(range(x.ndim - 2)) + (x.ndim - 1, x.ndim - 2)
  return _transpose(x, perm, x.dtype)


def _hi_lo(w, op_dtype):
  """w as a pair of op_dtype arrays whose float32 sum is w to ~2^-17 (bf16 keeps 8 bits)."""
  hi = w.astype(op_dtype)
  return hi, (w.astype(jnp.float32) - hi.astype(jnp.float32)).astype(op_dtype)


def _dot_split(a, b, op_dtype, b_transposed: bool, split: bool):
  """_dot, with b as two bf16 passes (hi + lo) when `split`."""
  if not split:
    return _dot(a, b, op_dtype, b_transposed)
  hi, lo = _hi_lo(b, op_dtype)
  return _dot(a, hi, op_dtype, b_transposed) + _dot(a, lo, op_dtype, b_transposed)


def _matmul(a, b, b_transposed, op_dtype, out_dtype, split_b: str = "none"):
  """a @ b (or b^T); `split_b` ('none', 'forward', 'both'): where b, a weight, is taken as
  bf16 hi + lo (the forward product; 'both' also the input gradient)."""
  if jnp.dtype(op_dtype) == jnp.dtype(b.dtype):
    split_b = "none"  # b is exact in op_dtype already
  if _configured()[1]:
    return _matmul_custom(a, b, b_transposed, op_dtype, out_dtype, split_b)
  return _dot_split(a, b, op_dtype, b_transposed, split_b != "none").astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _matmul_custom(a, b, b_transposed, op_dtype, out_dtype, split_b):
  return _dot_split(a, b, op_dtype, b_transposed, split_b != "none").astype(out_dtype)


def _matmul_fwd(a, b, b_transposed, op_dtype, out_dtype, split_b):
  ao = a.astype(op_dtype)  # residuals kept in the operand dtype
  y = _dot_split(ao, b, op_dtype, b_transposed, split_b != "none").astype(out_dtype)
  # b's residual: exact (float32) where the input gradient splits it, else rounded.
  bo = b if split_b == "both" else b.astype(op_dtype)
  # zero-size arrays carry the input dtypes to the backward pass.
  return y, (ao, bo, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))


def _matmul_bwd(b_transposed, op_dtype, out_dtype, split_b, res, g):
  ao, bo, a_kind, b_kind = res
  g = g.astype(op_dtype)
  split = split_b == "both"
  if b_transposed:  # y = a b^T: da = g b, db = g^T a
    da = _dot_split(g, bo, op_dtype, False, split)
    db = _dot(_transposed(g), ao, op_dtype, b_transposed=False)
  else:  # y = a b: da = g b^T, db = a^T g
    da = _dot_split(g, bo, op_dtype, True, split)
    db = _dot(_transposed(ao), g, op_dtype, b_transposed=False)
  return da.astype(a_kind.dtype), db.astype(b_kind.dtype)


_matmul_custom.defvjp(_matmul_fwd, _matmul_bwd)


def dense(x, kernel, axis: tuple[int, ...], dtype, layer: str | None = None):
  """x [..., K1..Kn] contracted over `axis` with kernel [K1..Kn, F1..Fm] -> [..., F1..Fm] in
  `dtype` (the layer's compute dtype), as one [rows, K] x [K, F] matmul. `layer`: the dense
  module's name, which `matmul.split_layers` selects by."""
  n = len(axis)
  axis = tuple(a % x.ndim for a in axis)
  if axis != tuple(range(x.ndim - n, x.ndim)):
    x = jnp.moveaxis(x, axis, tuple(range(x.ndim - n, x.ndim)))
  batch_shape, in_shape = x.shape[:x.ndim - n], x.shape[x.ndim - n:]
  feat_shape = kernel.shape[n:]
  k, f = int(np.prod(in_shape)), int(np.prod(feat_shape))
  y = _matmul(x.reshape(-1, k).astype(dtype), kernel.reshape(k, f), False,
              operand_dtype(dtype), jnp.dtype(dtype), _split_weights(layer))
  return y.reshape(batch_shape + feat_shape)


def attention_logits(q, k, dtype=jnp.float32):
  """q [B, Lq, H, D], k [B, Lk, H, D] -> q.k logits [B, H, Lq, Lk] in `dtype`."""
  # Transposed in their own dtype: their gradients come back in it, not rounded to bf16.
  op = operand_dtype(q.dtype)
  qh, kh = (_transpose(t, (0, 2, 1, 3), op) for t in (q, k))
  return _matmul(qh, kh, True, op, jnp.dtype(dtype))


def attention_combine(weights, v, dtype):
  """weights [B, H, Lq, Lk], v [B, Lk, H, D] -> weighted values [B, Lq, H, D] in `dtype`."""
  op = operand_dtype(v.dtype)
  vh = _transpose(v, (0, 2, 1, 3), op)
  out = _matmul(weights, vh, False, op, jnp.dtype(dtype))
  return _transpose(out, (0, 2, 1, 3), op)  # so that its gradient reaches the dots row-major


def _sum_leading(g, n: int):
  """g summed over its first n axes; on CPU by halving (`reductions.pairwise_sum`).

  XLA:CPU's reduction over a leading axis is ~40x slower when the kept part is wide (a
  [64, 311904] sum: 106 ms, halving 4-5 ms). A [1, rows] x [rows, rest] product with a ones row,
  used before, is as fast on YNNPACK (0.14 ms for [8, 311904], halving 0.16 ms) but not on
  oneDNN, where the float32 train step's dots run (2.0 ms, halving 0.3 ms; BENCHMARKS.md,
  "Training step"). Other backends get a plain sum.
  """
  if n == 0:
    return g
  if not (_configured()[1] and jax.default_backend() == "cpu"):
    return jnp.sum(g, axis=tuple(range(n)))
  wide = jnp.promote_types(g.dtype, jnp.float32)  # 16-bit cotangents add in float32
  return reductions.pairwise_sum(g.reshape((-1,) + g.shape[n:]).astype(wide), 0)


@jax.custom_vjp
def add_broadcast(x, bias):
  """x + bias, bias [1, .., 1, rest] broadcasting over x's leading axes (an attention bias
  shared by the batch); its gradient sums over them with `_sum_leading`."""
  return x + bias.astype(x.dtype)


def _broadcast_lead(x_ndim: int, bias_shape) -> int:
  """How many leading axes of x a bias of `bias_shape` ([1, .., 1] + x's trailing dims) spans
  by broadcasting: x's extra axes plus the bias's leading unit axes."""
  return x_ndim - len(bias_shape) + sum(
      1 for _ in itertools.takewhile(lambda d: d == 1, bias_shape))


def _add_broadcast_fwd(x, bias):
  lead = _broadcast_lead(x.ndim, bias.shape)
  if bias.shape[lead - (x.ndim - bias.ndim):] != x.shape[lead:]:
    raise ValueError(f"add_broadcast: bias {bias.shape} must be [1, .., 1] + the trailing "
                     f"dims of x {x.shape}.")
  # A zero-size residual carries the bias's shape and dtype to the backward pass.
  return add_broadcast(x, bias), jnp.zeros(bias.shape + (0,), bias.dtype)


def _add_broadcast_bwd(bias_like, g):
  bias_shape = bias_like.shape[:-1]
  return g, _sum_leading(g, _broadcast_lead(g.ndim, bias_shape)).reshape(bias_shape).astype(bias_like.dtype)


add_broadcast.defvjp(_add_broadcast_fwd, _add_broadcast_bwd)


@jax.custom_vjp
def add_bias(x, bias):
  """x + bias, bias spanning x's trailing dims (a dense layer's); its gradient sums the
  cotangent in float32.

  Autodiff sums a 16-bit cotangent in its own dtype. XLA:CPU then rounds every partial sum to
  bfloat16 and runs the reduction ~10x slower (with DTYPE = 'bfloat16', a pali_small step's
  reductions took 208 ms, 90 ms with this; BENCHMARKS.md, "Training step"), and the rounding
  loses bits of a sum over every token. A float32 cotangent gets the sum autodiff gives.
  """
  return x + bias.astype(x.dtype)


def _add_bias_fwd(x, bias):
  if x.shape[x.ndim - bias.ndim:] != bias.shape:
    raise ValueError(f"add_bias: bias {bias.shape} must be the trailing dims of x {x.shape}.")
  # A zero-size residual carries the bias's shape and dtype to the backward pass.
  return add_bias(x, bias), jnp.zeros(bias.shape + (0,), bias.dtype)


def _add_bias_bwd(bias_like, g):
  bias_shape = bias_like.shape[:-1]
  # As [rows, features], materialised on CPU for a 16-bit cotangent: XLA:CPU otherwise folds
  # the reshape back and sums a query's [8, 196, 6, 64] cotangent over its leading axes in
  # 1.3 ms, against ~0.15 ms for a [1568, 384] one.
  rows = g.reshape((-1, int(np.prod(bias_shape))))
  if jax.default_backend() == "cpu" and g.dtype.itemsize == 2:
    rows = jax.lax.optimization_barrier(rows)
  return g, jnp.sum(rows, axis=0, dtype=jnp.float32).reshape(bias_shape).astype(bias_like.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)
