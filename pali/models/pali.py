"""PaLI-X-style fusion: ViT patch tokens, projected, in front of the text of a T5 encoder.

Flow: uint8 images [B, N, H, W, 3] -> [-1, 1] -> ViT over the B*N images -> `img_proj` ->
[B, N*P, d_model], concatenated BEFORE the embedded `encoder_input_tokens` [B, L, d_model].
The encoder attends bidirectionally over [image; text] under the encoder mask (an image's P
tokens take its `image_mask`; text tokens are != 0). The decoder is causal with
cross-attention over the encoder output under the same mask.

Parameters: `vit`, `img_proj`, `token_embedder` (shared by encoder and decoder inputs, as in
T5.1.1), `encoder`, `decoder` (with its untied `logits_dense`).

`PaliConfig.loc_init = 'sincos'` starts the `<loc>` rows of `token_embedder` and the `<loc>`
columns of the decoder's `logits_dense` as a 1-D sin-cos code of the bin (unit RMS, times the
random part's scale), so that neighbouring bins start alike and what is learnt for one bin
carries to its neighbours.

`img_proj` kernel logical axes are ('vit_embed', 'embed'): the ViT width and d_model are
different dimensions, and naming both 'embed' is not allowed (one logical name per array).
`vit_embed` is in pali/partitioning.py's table; flax gives each mesh axis to one dimension, so
with both mapped to `fsdp` the d_model side is sharded and the ViT side replicated.

Dtypes: `PaliConfig.dtype` is the compute dtype of the fusion layers (image normalisation,
`img_proj`, `token_embedder`); `vit.dtype` and `t5.dtype` govern the towers. The gin files set
all three from one `DTYPE` macro.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from pali.models import layers
from pali.models.t5 import Decoder, Encoder, T5Config
from pali.models.vit import ViT, ViTConfig, sincos_1d

Array = jax.Array


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PaliConfig:
  """`vit` and `t5` default to ViTConfig() / T5Config(), i.e. whatever gin binds for them."""
  vit: ViTConfig = dataclasses.field(default_factory=ViTConfig)
  t5: T5Config = dataclasses.field(default_factory=T5Config)
  dtype: str = "float32"
  loc_init: str = "random"  # 'random' | 'sincos'
  first_loc_id: int = -1  # id of <loc0000>; -1: build_model takes it from the vocabulary
  num_loc_tokens: int = 1024

  def __post_init__(self):
    if self.loc_init not in ("random", "sincos"):
      raise ValueError(f"PaliConfig.loc_init={self.loc_init!r}: use 'random' or 'sincos'.")
    if self.loc_init == "sincos" and self.first_loc_id >= 0 and (
        self.first_loc_id + self.num_loc_tokens > self.t5.vocab_size):
      raise ValueError(f"PaliConfig.loc_init='sincos' needs first_loc_id (the id of <loc0000>) "
                       f"with all {self.num_loc_tokens} <loc> ids below vocab_size "
                       f"{self.t5.vocab_size}; got first_loc_id={self.first_loc_id}.")
    if self.loc_init == "sincos" and self.t5.d_model % 2:
      raise ValueError(f"PaliConfig.loc_init='sincos' needs an even d_model, got "
                       f"{self.t5.d_model}.")


def loc_code(n: int, width: int) -> Array:
  """[n, width] sin-cos code of bins 0..n-1 at unit RMS (width even)."""
  return sincos_1d(jnp.arange(n), width) * jnp.sqrt(2.0)


def _with_loc_rows(init, first: int, count: int, scale: float, rows_axis: int):
  """`init` of a 2-D table, with the slices first..first+count-1 along `rows_axis` replaced by
  `scale` times a sin-cos code of their index."""
  def fn(key, shape, dtype=jnp.float32):
    table = init(key, shape, dtype)
    code = (loc_code(count, shape[1 - rows_axis]) * scale).astype(dtype)
    if rows_axis == 0:
      return table.at[first:first + count].set(code)
    return table.at[:, first:first + count].set(code.T)
  return fn


class PaliModel(nn.Module):
  config: PaliConfig

  def setup(self):
    cfg = self.config
    dtype = layers.get_dtype(cfg.dtype)
    self.vit = ViT(cfg.vit)
    self.img_proj = layers.dense(cfg.t5.d_model, ("vit_embed", "embed"), use_bias=True,
                                 dtype=dtype)
    embed_init, logits_init = layers.default_embed_init, layers.default_kernel_init
    if cfg.loc_init == "sincos":
      if cfg.first_loc_id < 0:
        raise ValueError("PaliConfig.loc_init='sincos' needs first_loc_id (build_model sets it "
                         "from the project's vocabulary).")
      span = (cfg.first_loc_id, cfg.num_loc_tokens)
      # The scales of the random parts: unit rows; fan-in columns of the (embed, vocab) kernel.
      embed_init = _with_loc_rows(embed_init, *span, 1.0, rows_axis=0)
      logits_init = _with_loc_rows(logits_init, *span, cfg.t5.d_model ** -0.5, rows_axis=1)
    self.token_embedder = layers.Embed(cfg.t5.vocab_size, cfg.t5.d_model, dtype=dtype,
                                       embedding_init=embed_init)
    self.encoder = Encoder(cfg.t5)
    self.decoder = Decoder(cfg.t5, logits_init=logits_init)

  def encode(self, images: Array, image_mask: Array, encoder_input_tokens: Array, *,
             train: bool = False) -> tuple[Array, Array]:
    """-> (encoded [B, N*P + L, d_model], encoder_mask [B, N*P + L] bool)."""
    dtype = layers.get_dtype(self.config.dtype)
    if images.ndim != 5:
      raise ValueError(f"images must be [B, N_img, H, W, 3], got shape {images.shape}.")
    b, n, h, w, c = images.shape
    text = self.token_embedder(encoder_input_tokens)
    text_mask = encoder_input_tokens != 0
    if n == 0:
      if self.is_initializing() and h and w:  # still create the image params
        self.img_proj(self.vit(jnp.zeros((1, h, w, c), jnp.float32)).astype(dtype))
      x, mask = text, text_mask
    else:
      # uint8 stays uint8 until here; normalise on device.
      pixels = images.reshape(b * n, h, w, c).astype(jnp.float32) / 127.5 - 1.0
      patches = self.vit(pixels, train=train)  # [B*N, P, width]
      p = patches.shape[1]
      img = self.img_proj(patches.astype(dtype)).reshape(b, n * p, -1)
      img_mask = jnp.repeat(image_mask > 0, p, axis=1)  # each image's mask over its P tokens
      x = jnp.concatenate([img.astype(text.dtype), text], axis=1)
      mask = jnp.concatenate([img_mask, text_mask], axis=1)
    x = layers.constrain(x, layers.ACT)
    return self.encoder(x, mask, train=train), mask

  def decode(self, encoded: Array, encoder_mask: Array, decoder_input_tokens: Array, *,
             train: bool = False, decode: bool = False,
             max_decode_length: int | None = None) -> Array:
    """-> float32 logits [B, T, vocab]; with decode=True reads/writes the `cache` collection."""
    y = self.token_embedder(decoder_input_tokens)
    return self.decoder(y, encoded, encoder_mask, train=train, decode=decode,
                        max_decode_length=max_decode_length)

  def __call__(self, batch: Mapping[str, Any], *, train: bool = False) -> Array:
    encoded, mask = self.encode(batch["images"], batch["image_mask"],
                                batch["encoder_input_tokens"], train=train)
    return self.decode(encoded, mask, batch["decoder_input_tokens"], train=train)


@gin.configurable
def build_model(config: PaliConfig | None = None) -> PaliModel:
  """The model for `config` (gin: `build_model.config = @PaliConfig()`, or bind the fields).
  With `loc_init='sincos'` and no `first_loc_id`, the id of `<loc0000>` comes from the
  project's vocabulary (pali.data.vocabulary)."""
  config = config if config is not None else PaliConfig()
  if config.loc_init == "sincos" and config.first_loc_id < 0:
    from pali.data import vocabulary  # the one place that knows the id layout
    config = dataclasses.replace(config, first_loc_id=vocabulary.get_vocabulary().first_loc_id)
  return PaliModel(config)


def build_model_for_image_size(image_size: int) -> PaliModel:
  """The gin-configured model with its learned position table sized for `image_size`."""
  config = build_model().config
  grid = image_size // config.vit.patch_size
  if config.vit.posemb_grid != grid:
    config = dataclasses.replace(config, vit=dataclasses.replace(config.vit, posemb_grid=grid))
  return build_model(config)


def num_image_tokens(config: PaliConfig, image_size) -> int:
  """Patch tokens per image at `image_size` (int or (h, w))."""
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  p = config.vit.patch_size
  if h % p or w % p:
    raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {p}.")
  return (h // p) * (w // p)


def dummy_batch(batch_size: int, image_size, max_images: int, input_len: int,
                target_len: int) -> dict[str, np.ndarray]:
  """All-zero host batch with the feature names, dtypes and shapes of docs/interfaces.md."""
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  return {
      "images": np.zeros((batch_size, max_images, h, w, 3), np.uint8),
      "image_mask": np.zeros((batch_size, max_images), np.int32),
      "encoder_input_tokens": np.zeros((batch_size, input_len), np.int32),
      "decoder_input_tokens": np.zeros((batch_size, target_len), np.int32),
      "decoder_target_tokens": np.zeros((batch_size, target_len), np.int32),
      "decoder_loss_weights": np.zeros((batch_size, target_len), np.float32),
  }


def init_cache(model: PaliModel, batch_size: int, max_decode_length: int) -> dict:
  """A zero decoding cache for `batch_size` sequences of up to `max_decode_length` tokens.

  Equivalent to `model.init(..., method=PaliModel.decode, decode=True)['cache']` on a
  [B, max_decode_length] token array, but computed abstractly (no forward pass). Under
  `jax.eval_shape` it gives the cache's shapes. Step with
  `model.apply({'params': p, 'cache': c}, encoded, mask, tok[:, None], decode=True,
  method=PaliModel.decode, mutable=['cache'])` -> (logits [B, 1, V], {'cache': new}).
  """
  d_model = model.config.t5.d_model

  def _init(rng):
    return model.init({"params": rng}, jnp.zeros((batch_size, 1, d_model), jnp.float32),
                      jnp.ones((batch_size, 1), bool),
                      jnp.zeros((batch_size, max_decode_length), jnp.int32),
                      decode=True, method=PaliModel.decode)["cache"]

  shapes = jax.eval_shape(_init, jax.random.key(0))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def count_params(tree) -> int:
  """Number of scalars in a (possibly boxed, possibly abstract) parameter tree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree))))
