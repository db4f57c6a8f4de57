"""Building blocks shared by the ViT and the T5 towers (flax linen).

Every parameter is created through `nn.with_logical_partitioning` with the logical axis names of
DESIGN.md (`embed`, `mlp`, `heads`, `kv`, `vocab`, `relpos_buckets`, ...); parameters are float32
and the compute dtype is a module field. Large activations are constrained with the activation
names `batch`, `length`, `act_embed`, `act_mlp`, `act_heads` (no-ops without axis rules).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pali.models import matmul
from pali.models import normalise

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# T5/t5x initialisers: fan-in scaled normals for kernels, N(0, 1) for the token table.
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
default_embed_init = nn.initializers.normal(stddev=1.0)
relpos_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")

NEG_INF = -1e10  # additive mask value; exp() of it underflows to exactly 0 in float32.
ACT = ("batch", "length", "act_embed")  # logical names of a [B, L, D] activation.

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def get_dtype(name: str | Dtype) -> Dtype:
  """Maps a config dtype name ('float32' | 'bfloat16') to a jnp dtype."""
  if not isinstance(name, str):
    return name
  if name not in _DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; use one of {sorted(_DTYPES)} in the gin config.")
  return _DTYPES[name]


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
  return nn.with_logical_constraint(x, tuple(axes))


class DenseGeneral(nn.Module):
  """DenseGeneral whose kernel is created at its full shape with logical axis names.

  flax's DenseGeneral initialises a flattened 2-D kernel and boxes it before reshaping, so a
  3-name partitioning (q/k/v: embed, heads, kv) is applied to a rank-2 array and fails under a
  mesh. Here the initialiser still sees the flat (fan_in, fan_out) shape, so variance scaling
  is the same, but the box holds the real shape.
  """
  features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  axis: tuple[int, ...] = (-1,)
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    axis = tuple(a % x.ndim for a in self.axis)
    in_shape = tuple(x.shape[a] for a in axis)
    kernel_shape = in_shape + self.features
    flat = (int(np.prod(in_shape)), int(np.prod(self.features)))

    def init(rng, shape, dtype=jnp.float32):
      return jnp.reshape(self.kernel_init(rng, flat, dtype), shape)

    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                        kernel_shape, jnp.float32)
    # A rank-2 matmul with a hand-written backward (and optional mixed precision): matmul.py.
    y = matmul.dense(x, kernel, axis, self.dtype, layer=self.name)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, self.kernel_axes[-len(self.features):]), self.features,
                        jnp.float32)
      y = matmul.add_bias(y, bias)  # its gradient summed in float32
    return y


def dense(features, kernel_axes: Sequence[str | None], *, axis=-1, use_bias: bool = False,
          dtype: Dtype = jnp.float32, kernel_init: Initializer = default_kernel_init,
          name: str | None = None) -> DenseGeneral:
  """A DenseGeneral whose kernel (and bias) carry logical axis names.

  `kernel_axes` names the full kernel (contracted dims then feature dims); the bias takes the
  names of the feature dims.
  """
  features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
  axis = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
  return DenseGeneral(features=features, kernel_axes=tuple(kernel_axes), axis=axis,
                      use_bias=use_bias, dtype=dtype, kernel_init=kernel_init, name=name)


class RMSNorm(nn.Module):
  """T5 layer norm: scale only, no bias, no mean subtraction; computed in float32."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.epsilon)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             (self.axis_name,)),
                       (x.shape[-1],), jnp.float32)
    return (y * scale).astype(self.dtype)


class LayerNorm(nn.Module):
  """Standard LayerNorm over the last axis with logically named scale (and optional bias)."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  use_bias: bool = True
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = normalise.standardise(x, self.epsilon)  # its backward written out: see normalise
    feat = (x.shape[-1],)
    y = y * self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             (self.axis_name,)),
                       feat, jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                              (self.axis_name,)),
                         feat, jnp.float32)
    return y.astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """T5-style multi-head dot-product attention with an optional KV cache.

  There is no 1/sqrt(head_dim) in the dot product: as in T5/t5x it is folded into the query
  kernel's initialiser (stddev (d_model * head_dim)**-0.5). With `qk_norm` (ViT-22B) a
  LayerNorm over head_dim on queries and keys would wipe that folded scale out, so the scale is
  then applied explicitly after the norm.

  `mask` (bool, broadcastable to [B, heads, q, k]; True = attend) and `bias` (additive, e.g.
  relative positions, broadcastable likewise) are optional. With `decode=True` the module keeps
  `cached_key`/`cached_value` [B, L_max, heads, head_dim] and `cache_index` in the `cache`
  collection: the first (init) call only creates them, later calls take one position each,
  write it at `cache_index` and attend to positions <= cache_index (t5x's decode path). `bias`
  must then already be the row of the current position ([.., 1, L_max]).
  """
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  use_bias: bool = False
  qk_norm: bool = False
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Array | None = None,
               bias: Array | None = None, *, deterministic: bool = True,
               decode: bool = False) -> Array:
    d_model = inputs_q.shape[-1]
    qkv_axes = ("embed", "heads", "kv")
    # fan-in init gives stddev d_model**-0.5; dividing by sqrt(head_dim) folds the softmax scale.
    depth_scaling = float(np.sqrt(self.head_dim))
    query_init = lambda *a: self.kernel_init(*a) / depth_scaling  # noqa: E731
    make = lambda name, init: dense((self.num_heads, self.head_dim), qkv_axes,  # noqa: E731
                                    use_bias=self.use_bias, dtype=self.dtype,
                                    kernel_init=init, name=name)
    q = make("query", query_init)(inputs_q)
    k = make("key", self.kernel_init)(inputs_kv)
    v = make("value", self.kernel_init)(inputs_kv)
    if self.qk_norm:
      q = LayerNorm(dtype=self.dtype, use_bias=self.use_bias, axis_name="kv", name="query_norm")(q)
      k = LayerNorm(dtype=self.dtype, use_bias=self.use_bias, axis_name="kv", name="key_norm")(k)
      q = q * jnp.asarray(self.head_dim ** -0.5, self.dtype)
    head_axes = ("batch", "length", "act_heads", None)
    q, k, v = (constrain(t, head_axes) for t in (q, k, v))

    if decode:
      is_initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if is_initialized:
        batch, max_length, heads, head_dim = cached_key.value.shape
        if q.shape != (batch, 1, heads, head_dim):
          raise ValueError(f"Incremental decoding takes one position at a time: got query "
                           f"{q.shape}, cache expects {(batch, 1, heads, head_dim)}.")
        i = cache_index.value
        k = jax.lax.dynamic_update_slice(cached_key.value, k.astype(cached_key.value.dtype),
                                         (0, i, 0, 0))
        v = jax.lax.dynamic_update_slice(cached_value.value,
                                         v.astype(cached_value.value.dtype), (0, i, 0, 0))
        cached_key.value, cached_value.value = k, v
        cache_index.value = i + 1
        seen = (jnp.arange(max_length) <= i)[None, None, None, :]
        mask = seen if mask is None else jnp.logical_and(mask, seen)

    # Logits and softmax in float32 for stability whatever the compute dtype.
    logits = matmul.attention_logits(q, k, jnp.float32)  # "bqhd,bkhd->bhqk"
    if bias is not None:
      logits = matmul.add_broadcast(logits, bias.astype(jnp.float32))
    if mask is not None:
      logits = logits + jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    if self.dropout_rate > 0.0:
      weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
    out = matmul.attention_combine(weights, v, self.dtype)  # "bhqk,bkhd->bqhd"
    out = constrain(out, head_axes)
    out = dense(d_model, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=self.use_bias,
                dtype=self.dtype, kernel_init=self.kernel_init, name="out")(out)
    return constrain(out, ACT)


def relative_position_bucket(relative_position: Array, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> Array:
  """T5's bucketing of (memory_position - query_position).

  Half the buckets are exact small offsets, the rest logarithmically spaced up to
  `max_distance`; bidirectional splits the buckets between the two directions, causal maps
  every future offset to bucket 0.
  """
  ret = jnp.zeros_like(relative_position)
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (
      jnp.log(n.astype(jnp.float32) / max_exact + np.finfo(np.float32).eps)
      / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return ret + jnp.where(is_small, n, val_if_large)


class RelativePositionBiases(nn.Module):
  """One learned (heads, buckets) table per stack, shared by all its layers (T5.1.1)."""
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q_positions: Array, k_positions: Array, bidirectional: bool) -> Array:
    """int positions [q], [k] -> bias [1, heads, q, k]."""
    rel = k_positions[None, :] - q_positions[:, None]
    buckets = relative_position_bucket(rel.astype(jnp.int32), bidirectional,
                                       self.num_buckets, self.max_distance)
    table = self.param("rel_embedding",
                       nn.with_logical_partitioning(relpos_init, ("heads", "relpos_buckets")),
                       (self.num_heads, self.num_buckets), jnp.float32)
    # A one-hot product rather than a gather (as t5x): the gather's gradient is a scatter-add
    # that XLA:CPU ran as a 19 ms reduction per step on pali_small; this is a small matmul.
    one_hot = jax.nn.one_hot(buckets, self.num_buckets, dtype=jnp.float32)
    bias = jnp.einsum("hn,qkn->hqk", table, one_hot, precision=jax.lax.Precision.HIGHEST)
    return bias[None].astype(self.dtype)


class GatedMlp(nn.Module):
  """T5.1.1 gated-GELU MLP: wo(gelu(wi_0 x) * wi_1 x)."""
  d_ff: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    kw = dict(use_bias=self.use_bias, dtype=self.dtype)
    h = nn.gelu(dense(self.d_ff, ("embed", "mlp"), name="wi_0", **kw)(x))
    h = h * dense(self.d_ff, ("embed", "mlp"), name="wi_1", **kw)(x)
    h = constrain(h, ("batch", "length", "act_mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return constrain(dense(x.shape[-1], ("mlp", "embed"), name="wo", **kw)(h), ACT)


class Mlp(nn.Module):
  """ViT MLP: wo(gelu(wi x)), optional biases."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    kw = dict(use_bias=self.use_bias, dtype=self.dtype)
    h = nn.gelu(dense(self.mlp_dim, ("embed", "mlp"), name="wi", **kw)(x))
    h = constrain(h, ("batch", "length", "act_mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return constrain(dense(x.shape[-1], ("mlp", "embed"), name="wo", **kw)(h), ACT)


class Embed(nn.Module):
  """Token embedding table (vocab, embed); `attend` gives logits against it."""
  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32
  embedding_init: Initializer = default_embed_init

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids: Array) -> Array:
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"Token ids must be integers, got {ids.dtype}.")
    # Gather from a replicated table (cast first: half the all-gather in bf16), as FSDP does
    # for every weight; gathering from a sharded table makes the SPMD partitioner replicate
    # the whole [B, L, D] output instead.
    table = nn.with_logical_constraint(self.embedding.astype(self.dtype), (None, None))
    out = jnp.take(table, ids, axis=0).astype(self.dtype)
    return constrain(out, ACT)

  def attend(self, query: Array) -> Array:
    return jnp.einsum("...d,vd->...v", query, self.embedding.astype(self.dtype))


# ---- Layer stacks: python loop or nn.scan, with optional rematerialisation. ----

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass.
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def maybe_remat(layer_cls, remat_policy: str, scan: bool):
  if remat_policy == "none":
    return layer_cls
  if remat_policy not in _REMAT_POLICIES:
    raise ValueError(f"remat_policy={remat_policy!r} is not one of "
                     f"{['none'] + sorted(_REMAT_POLICIES)}; fix the gin binding.")
  # prevent_cse is only needed outside scan (scan already blocks CSE across iterations).
  return nn.remat(layer_cls, policy=_REMAT_POLICIES[remat_policy], prevent_cse=not scan)


def run_stack(layer_cls, num_layers: int, x: Array, *args, scan: bool, remat_policy: str,
              name: str = "layers", **layer_kwargs) -> Array:
  """Applies `num_layers` copies of `layer_cls` (called as `layer(x, *args) -> (x, None)`).

  Must be called inside a parent's compact method. Unscanned layers are named `{name}_{i}`;
  a scanned stack is one module `{name}` whose params (and cache) have a leading `layers`
  axis, recorded in the partitioning metadata.
  """
  cls = maybe_remat(layer_cls, remat_policy, scan)
  if scan:
    stack = nn.scan(cls, variable_axes={"params": 0, "cache": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,) * len(args), length=num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(name=name, **layer_kwargs)(x, *args)
    return x
  for i in range(num_layers):
    x, _ = cls(name=f"{name}_{i}", **layer_kwargs)(x, *args)
  return x
