"""Vision Transformer image encoder (big_vision-style, with the ViT-22B options).

Input: float images [B, H, W, 3] in [-1, 1]. Output: the patch tokens [B, N, width] after a
final LayerNorm, with no pooling and no class token (PaLI feeds every patch to the encoder).

Stems:
- 'patch': a Dense over each flattened p*p*3 patch (kernel logical ('patch', 'embed')).
- 'conv': one 3x3 stride-2 convolution (GELU) per entry of `stem_channels` (default
  (width/4, width/2)), then a Dense over each flattened (p/2^k)*(p/2^k)*channels block for k
  convolutions. Both stems land on the same (H/p, W/p) grid, so position tables and the rest
  of the model do not care which one is used. Needs p % 2^k == 0.

`patch_norm` (Dual PatchNorm, Kumar et al. 2023): a LayerNorm on each flattened patch (or conv
stem block) and another on its embedding, so patch content enters at the same scale as the
position embedding (without it, the conv stem's output is several times smaller).

`center_input`: subtract each image's mean colour before the stem and give the mean back
through a zero-initialised Dense (`mean_colour`) added to every patch token. Without it a
random background colour is most of the variance of every patch and a small object (a glyph
a few pixels wide) is a faint signal under it: a small CNN letter classifier on mean-pooled
features stays at chance for 1000 steps and reaches 0.86 with centring (BENCHMARKS.md). The mean
colour is not lost (captions name colours); it enters at zero and grows as the loss asks.

Position embeddings: 'learn' stores a (posemb_grid**2, width) table (logical ('posemb_len',
'embed')) that is bilinearly resampled when the input grid differs; 'sincos2d' is fixed and
computed for whatever grid comes in (no parameter).

Options from ViT-22B: `parallel_block` (attention and MLP from one LayerNorm, summed),
`qk_norm` (LayerNorm on queries and keys), `use_bias=False` (no biases in projections and
LayerNorms).
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
class ViTConfig:
  """Defaults are ViT-S/16 at 224 px (a 14x14 patch grid)."""
  patch_size: int = 16
  width: int = 384
  depth: int = 12
  mlp_dim: int = 1536
  num_heads: int = 6
  posemb: str = "learn"  # 'learn' | 'sincos2d'
  posemb_grid: int = 14
  stem: str = "patch"  # 'patch' | 'conv'
  stem_channels: tuple = ()  # one width per stride-2 conv; () = (width // 4, width // 2)
  patch_norm: bool = False  # Dual PatchNorm: LayerNorm before and after the patch embedding
  center_input: bool = False  # subtract each image's mean colour; add it back per token
  parallel_block: bool = False
  qk_norm: bool = False
  use_bias: bool = True
  dropout_rate: float = 0.0
  scan: bool = False
  remat_policy: str = "none"  # 'none' | 'full' | 'dots' | 'dots_no_batch'
  dtype: str = "float32"

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"ViTConfig.width={self.width} is not divisible by "
                       f"num_heads={self.num_heads}.")
    if self.posemb not in ("learn", "sincos2d"):
      raise ValueError(f"ViTConfig.posemb={self.posemb!r}: use 'learn' or 'sincos2d'.")
    if self.stem not in ("patch", "conv"):
      raise ValueError(f"ViTConfig.stem={self.stem!r}: use 'patch' or 'conv'.")
    if self.stem == "conv" and self.patch_size % (2 ** len(self.conv_stem_channels)):
      raise ValueError(
          f"ViTConfig.stem='conv' with {len(self.conv_stem_channels)} stride-2 convolutions "
          f"(stem_channels={self.conv_stem_channels}) needs patch_size divisible by "
          f"{2 ** len(self.conv_stem_channels)}, got {self.patch_size}.")

  @property
  def conv_stem_channels(self) -> tuple[int, ...]:
    """The conv stem's widths, one per stride-2 convolution."""
    return tuple(self.stem_channels) or (self.width // 4, self.width // 2)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


def _grid(new_grid) -> tuple[int, int]:
  return (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)


def resample_posemb(table, new_grid):
  """Bilinearly resamples a square learned position table to `new_grid` (int or (h, w)).

  Accepts [N, D] or [1, N, D] and returns the same rank. The model applies exactly this
  function when the input grid differs from `posemb_grid`, so resampling a checkpoint's table
  once (warm starts at a higher resolution) gives the same outputs.
  """
  table = jnp.asarray(table)
  squeeze = table.ndim == 2
  t = table if table.ndim == 2 else table[0]
  n, d = t.shape
  old = int(round(n ** 0.5))
  if old * old != n:
    raise ValueError(f"resample_posemb expects a square grid of positions, got {n}.")
  gh, gw = _grid(new_grid)
  if (gh, gw) != (old, old):
    t = jax.image.resize(t.reshape(old, old, d).astype(jnp.float32), (gh, gw, d),
                         method="bilinear").reshape(gh * gw, d).astype(table.dtype)
  return t if squeeze else t[None]


def sincos_1d(positions: Array, width: int, temperature: float = 10_000.0) -> Array:
  """[len(positions), width] fixed sin-cos code: width // 2 geometric frequencies, sines then
  cosines (width must be even)."""
  omega = jnp.arange(width // 2) / max(width // 2 - 1, 1)
  omega = 1.0 / (temperature ** omega)
  angles = jnp.einsum("m,d->md", positions, omega)
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> Array:
  """Fixed 2-D sin-cos position embedding [h*w, width] (MoCo v3 / big_vision): the 1-D code
  of the column, then of the row."""
  if width % 4:
    raise ValueError(f"posemb 'sincos2d' needs width divisible by 4, got {width}.")
  y, x = jnp.mgrid[:h, :w]
  return jnp.concatenate([sincos_1d(x.flatten(), width // 2, temperature),
                          sincos_1d(y.flatten(), width // 2, temperature)], axis=1)


def _patchify(x: Array, p: int) -> Array:
  """[B, H, W, C] -> [B, H/p, W/p, p*p*C]."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


class ViTBlock(nn.Module):
  """Pre-LN encoder block (sequential or ViT-22B parallel)."""
  config: ViTConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, None]:
    cfg = self.config
    dtype = layers.get_dtype(cfg.dtype)
    attn = layers.MultiHeadAttention(
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=dtype,
        dropout_rate=cfg.dropout_rate, use_bias=cfg.use_bias, qk_norm=cfg.qk_norm,
        name="attention")
    mlp = layers.Mlp(cfg.mlp_dim, dtype=dtype, dropout_rate=cfg.dropout_rate,
                     use_bias=cfg.use_bias, name="mlp")
    drop = nn.Dropout(cfg.dropout_rate)
    det = self.deterministic
    norm = lambda name: layers.LayerNorm(dtype=dtype, use_bias=cfg.use_bias, name=name)  # noqa
    if cfg.parallel_block:
      y = norm("norm")(x)
      x = x + drop(attn(y, y, deterministic=det), deterministic=det) + drop(
          mlp(y, deterministic=det), deterministic=det)
    else:
      y = norm("attention_norm")(x)
      x = x + drop(attn(y, y, deterministic=det), deterministic=det)
      y = norm("mlp_norm")(x)
      x = x + drop(mlp(y, deterministic=det), deterministic=det)
    return layers.constrain(x, layers.ACT), None


class ViT(nn.Module):
  """Params: `embedding` (+ `stem_conv_<i>`, `mean_colour`), `pos_embedding`, `layers[_i]`, `encoder_norm`."""
  config: ViTConfig

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    cfg = self.config
    dtype = layers.get_dtype(cfg.dtype)
    b, h, w, _ = images.shape
    p = cfg.patch_size
    if h % p or w % p:
      raise ValueError(f"Image size {h}x{w} is not divisible by the ViT patch size {p}; "
                       "choose an image size that is a multiple of the patch size.")
    x = images.astype(dtype)
    if cfg.center_input:
      mean_colour = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
      x = x - mean_colour.astype(dtype)
    if cfg.stem == "conv":
      for i, feat in enumerate(cfg.conv_stem_channels):
        x = nn.Conv(feat, (3, 3), strides=(2, 2), padding="SAME", use_bias=cfg.use_bias,
                    dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nn.with_logical_partitioning(
                        layers.default_kernel_init, (None, None, None, None)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                    name=f"stem_conv_{i}")(x)
        x = nn.gelu(x)
      x = _patchify(x, p // 2 ** len(cfg.conv_stem_channels))
    else:
      x = _patchify(x, p)
    if cfg.patch_norm:
      x = layers.LayerNorm(dtype=dtype, use_bias=cfg.use_bias, axis_name="patch",
                           name="patch_norm_in")(x)
    x = layers.dense(cfg.width, ("patch", "embed"), use_bias=cfg.use_bias, dtype=dtype,
                     kernel_init=nn.initializers.lecun_normal(), name="embedding")(x)
    if cfg.patch_norm:
      x = layers.LayerNorm(dtype=dtype, use_bias=cfg.use_bias, name="patch_norm_out")(x)
    if cfg.center_input:
      x = x + layers.dense(cfg.width, (None, "embed"), use_bias=False, dtype=dtype,
                           kernel_init=nn.initializers.zeros, name="mean_colour")(
                               mean_colour.astype(dtype))
    gh, gw = x.shape[1], x.shape[2]
    x = x.reshape(b, gh * gw, cfg.width)

    if cfg.posemb == "learn":
      table = self.param(
          "pos_embedding",
          nn.with_logical_partitioning(nn.initializers.normal(stddev=cfg.width ** -0.5),
                                       ("posemb_len", "embed")),
          (cfg.posemb_grid ** 2, cfg.width), jnp.float32)
      pos = resample_posemb(table, (gh, gw))
    else:
      pos = posemb_sincos_2d(gh, gw, cfg.width)
    x = x + pos[None].astype(dtype)
    x = layers.constrain(x, layers.ACT)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)

    x = layers.run_stack(ViTBlock, cfg.depth, x, scan=cfg.scan, remat_policy=cfg.remat_policy,
                         config=cfg, deterministic=not train)
    return layers.LayerNorm(dtype=dtype, use_bias=cfg.use_bias, name="encoder_norm")(x)
