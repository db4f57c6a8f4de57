"""T5.1.1 / UL2-style encoder-decoder stacks over already-embedded inputs.

Pre-RMSNorm residual blocks, gated-GELU MLPs, no biases, one relative position bias table per
stack (bidirectional in the encoder, causal in the decoder; cross-attention has none), a final
RMSNorm, and an untied `logits_dense` (embed, vocab) in the decoder. The token embedding lives
in `pali.models.pali` because the image tokens join the text in front of the encoder.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from pali.models import layers

Array = jax.Array


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
  """Defaults are T5.1.1-small-like (PaLI's small text model)."""
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 6
  head_dim: int = 64
  d_ff: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  dropout_rate: float = 0.0
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  scan: bool = False
  remat_policy: str = "none"  # 'none' | 'full' | 'dots' | 'dots_no_batch'
  dtype: str = "float32"


def _attention(cfg: T5Config, name: str) -> layers.MultiHeadAttention:
  return layers.MultiHeadAttention(num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                                   dtype=layers.get_dtype(cfg.dtype),
                                   dropout_rate=cfg.dropout_rate, name=name)


def _relpos(cfg: T5Config) -> layers.RelativePositionBiases:
  return layers.RelativePositionBiases(
      num_heads=cfg.num_heads, num_buckets=cfg.relative_attention_num_buckets,
      max_distance=cfg.relative_attention_max_distance, dtype=layers.get_dtype(cfg.dtype),
      name="relpos_bias")


class EncoderLayer(nn.Module):
  config: T5Config
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, mask: Array, bias: Array) -> tuple[Array, None]:
    cfg, det = self.config, self.deterministic
    dtype = layers.get_dtype(cfg.dtype)
    drop = nn.Dropout(cfg.dropout_rate)
    y = layers.RMSNorm(dtype=dtype, name="pre_attention_norm")(x)
    y = _attention(cfg, "attention")(y, y, mask, bias, deterministic=det)
    x = x + drop(y, deterministic=det)
    y = layers.RMSNorm(dtype=dtype, name="pre_mlp_norm")(x)
    y = layers.GatedMlp(cfg.d_ff, dtype=dtype, dropout_rate=cfg.dropout_rate, name="mlp")(
        y, deterministic=det)
    x = x + drop(y, deterministic=det)
    return layers.constrain(x, layers.ACT), None


class DecoderLayer(nn.Module):
  config: T5Config
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, y: Array, encoded: Array, self_mask: Array, cross_mask: Array,
               bias: Array) -> tuple[Array, None]:
    cfg, det = self.config, self.deterministic
    dtype = layers.get_dtype(cfg.dtype)
    drop = nn.Dropout(cfg.dropout_rate)
    h = layers.RMSNorm(dtype=dtype, name="pre_self_attention_norm")(y)
    h = _attention(cfg, "self_attention")(h, h, self_mask, bias, deterministic=det,
                                          decode=self.decode)
    y = y + drop(h, deterministic=det)
    # Cross-attention keys/values are recomputed from `encoded` each step (as in t5x).
    h = layers.RMSNorm(dtype=dtype, name="pre_cross_attention_norm")(y)
    h = _attention(cfg, "encoder_decoder_attention")(h, encoded, cross_mask,
                                                     deterministic=det)
    y = y + drop(h, deterministic=det)
    h = layers.RMSNorm(dtype=dtype, name="pre_mlp_norm")(y)
    h = layers.GatedMlp(cfg.d_ff, dtype=dtype, dropout_rate=cfg.dropout_rate, name="mlp")(
        h, deterministic=det)
    y = y + drop(h, deterministic=det)
    return layers.constrain(y, layers.ACT), None


class Encoder(nn.Module):
  """[B, S, D] embedded inputs + bool mask [B, S] -> encoded [B, S, D].

  Attention is bidirectional over every position; masked positions are never attended to
  (their own outputs are meaningless and must be ignored downstream).
  Params: `relpos_bias`, `layers[_i]`, `encoder_norm`.
  """
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, mask: Array, *, train: bool = False) -> Array:
    cfg = self.config
    dtype = layers.get_dtype(cfg.dtype)
    drop = nn.Dropout(cfg.dropout_rate)
    x = drop(x.astype(dtype), deterministic=not train)
    pos = jnp.arange(x.shape[1])
    bias = _relpos(cfg)(pos, pos, bidirectional=True)
    # Key mask only: a padded query row still sees the real tokens, so no row is all -inf.
    attn_mask = mask.astype(bool)[:, None, None, :]
    x = layers.run_stack(EncoderLayer, cfg.num_encoder_layers, x, attn_mask, bias,
                         scan=cfg.scan, remat_policy=cfg.remat_policy, config=cfg,
                         deterministic=not train)
    x = layers.RMSNorm(dtype=dtype, name="encoder_norm")(x)
    return drop(x, deterministic=not train)


def _cached_length(cache) -> int | None:
  """The max decode length, read off any `cached_key` [..., B, L, H, D] in the cache tree."""
  for key, value in (cache or {}).items():
    if key == "cached_key":
      return value.shape[-3]
    if hasattr(value, "items"):
      found = _cached_length(value)
      if found is not None:
        return found
  return None


class Decoder(nn.Module):
  """Embedded decoder tokens [B, T, D] + encoder output -> float32 logits [B, T, vocab].

  Causal self-attention (no padding mask: padded targets come after the real ones and carry
  zero loss weight), cross-attention over `encoded` under `encoder_mask`.
  With `decode=True` the first call (model.init) creates the cache for T = max decode length;
  each later call takes one token ([B, 1, D]), and this module's own `cache_index` gives the
  query position of the relative position bias.
  Params: `relpos_bias`, `layers[_i]`, `decoder_norm`, `logits_dense`.
  """
  config: T5Config
  logits_init: layers.Initializer = layers.default_kernel_init

  @nn.compact
  def __call__(self, y: Array, encoded: Array, encoder_mask: Array, *, train: bool = False,
               decode: bool = False, max_decode_length: int | None = None) -> Array:
    cfg = self.config
    dtype = layers.get_dtype(cfg.dtype)
    drop = nn.Dropout(cfg.dropout_rate)
    y = drop(y.astype(dtype), deterministic=not train)
    relpos = _relpos(cfg)
    t = y.shape[1]
    stepping = decode and self.has_variable("cache", "cache_index")
    if decode:
      index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if stepping:
      if t != 1:
        raise ValueError(f"Incremental decoding takes one token per call, got {t}.")
      length = _cached_length(self.variables.get("cache")) or max_decode_length
      if max_decode_length is not None and length != max_decode_length:
        raise ValueError(f"max_decode_length={max_decode_length} differs from the cache's "
                         f"length {length}; initialise the cache with the same length.")
      i = index.value
      bias = relpos(i[None], jnp.arange(length), bidirectional=False)  # [1, h, 1, L]
      self_mask = jnp.ones((1, 1, 1, length), bool)  # the cache masks positions > i.
      index.value = i + 1
    else:
      pos = jnp.arange(t)
      bias = relpos(pos, pos, bidirectional=False)
      self_mask = (pos[None, :] <= pos[:, None])[None, None]
    cross_mask = encoder_mask.astype(bool)[:, None, None, :]
    y = layers.run_stack(DecoderLayer, cfg.num_decoder_layers, y, encoded.astype(dtype),
                         self_mask, cross_mask, bias, scan=cfg.scan,
                         remat_policy=cfg.remat_policy, config=cfg, deterministic=not train,
                         decode=decode)
    y = layers.RMSNorm(dtype=dtype, name="decoder_norm")(y)
    y = drop(y, deterministic=not train)
    # float32 logits projection (as t5x): the softmax over a large vocabulary needs the range.
    logits = layers.dense(cfg.vocab_size, ("embed", "vocab"), dtype=jnp.float32,
                          kernel_init=self.logits_init, name="logits_dense")(y)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
