"""Analytic FLOPs of one PaLI forward pass and one training step, for MFU.

The one FLOP model of the project (DESIGN.md). It counts the matrix multiplications, 2 FLOPs
per multiply-add: every projection (ViT patch embedding and conv stem, q/k/v/out, MLPs,
`img_proj`, `logits_dense`) and the two attention products (q.k and weights.v). Norms,
softmax, GELU, the loss and the optimizer update are left out (MaxText and PaLM count the same
way); on the small models of the tests they are under 10% of what XLA counts.

Conventions, so the figures compare with other MFU reports:
- Attention is counted over every (query, key) pair the model actually multiplies: the
  causal decoder self-attention is counted in full, as it is computed in full.
- Padding counts: the model runs on the padded batch, so the FLOPs are those of the padded
  shapes (every image slot, whatever its `image_mask`).
- A training step is forward + backward; the backward pass of a matmul costs two matmuls of
  the forward's size (one for the input gradient, one for the weight gradient). Two of them
  are never computed and not counted: the input gradient of the ViT's first layer (the pixels
  need none). With a frozen ViT (`frozen_vit=True`) the whole ViT needs no backward at all
  (nothing before it is trained) and `img_proj` needs its weight gradient only.
- Rematerialisation re-runs forward work; those FLOPs are hardware FLOPs, not model FLOPs,
  and are not counted (as in the MFU definition of the PaLM paper).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class BatchShapes:
  """The padded shapes of one (global) batch."""
  batch: int
  image_size: Any  # int or (height, width)
  max_images: int
  input_len: int
  target_len: int

  @property
  def hw(self) -> tuple[int, int]:
    s = self.image_size
    return (s, s) if isinstance(s, int) else tuple(s)

  @classmethod
  def from_batch(cls, batch: Mapping[str, Any]) -> "BatchShapes":
    """From a batch dict (arrays or anything with `.shape`) with the feature names."""
    b, n, h, w, _ = batch["images"].shape
    return cls(batch=b, image_size=(h, w), max_images=n,
               input_len=batch["encoder_input_tokens"].shape[1],
               target_len=batch["decoder_target_tokens"].shape[1])


def _mm(m: float, k: float, n: float) -> float:
  """FLOPs of an [m, k] @ [k, n] product."""
  return 2.0 * m * k * n


def vit_forward_flops(vit, num_images: int, hw: tuple[int, int]) -> dict[str, float]:
  """Forward FLOPs of the ViT on `num_images` images of size `hw`, split into the first layer
  (`stem`: the patch embedding and conv stem, whose input gradient is never needed) and the rest."""
  h, w = hw
  p = vit.patch_size
  n = (h // p) * (w // p)  # patches per image
  d = vit.width
  if vit.stem == "conv":
    # 3x3 stride-2 SAME convolutions, each halving the map, then a Dense over the
    # (p/2^k)^2 * channels features of each patch.
    stem, c_in, scale = 0.0, 3, 1
    for c_out in vit.conv_stem_channels:
      scale *= 2
      stem += _mm((h // scale) * (w // scale), 9 * c_in, c_out)
      c_in = c_out
    stem += _mm(n, (p // scale) ** 2 * c_in, d)
  else:
    stem = _mm(n, p * p * 3, d)
  attn_proj = 4 * _mm(n, d, d)  # q, k, v, out (heads * head_dim == width)
  attn_core = 2 * _mm(n, d, n)  # q.k over head_dim for every head, then weights.v
  mlp = 2 * _mm(n, d, vit.mlp_dim)
  layers = vit.depth * (attn_proj + attn_core + mlp)
  return {"vit_stem": num_images * stem, "vit_layers": num_images * layers}


def forward_flops(config, shapes: BatchShapes) -> dict[str, float]:
  """Forward FLOPs per part: vit_stem, vit_layers, img_proj, encoder, decoder, logits."""
  t5, vit = config.t5, config.vit
  b = shapes.batch
  num_images = b * shapes.max_images
  if shapes.max_images:
    h, w = shapes.hw
    patches = (h // vit.patch_size) * (w // vit.patch_size)
    out = vit_forward_flops(vit, num_images, (h, w))
    out["img_proj"] = _mm(num_images * patches, vit.width, t5.d_model)
  else:
    patches = 0
    out = {"vit_stem": 0.0, "vit_layers": 0.0, "img_proj": 0.0}
  s = shapes.max_images * patches + shapes.input_len  # encoder length
  t = shapes.target_len
  d, inner, ff = t5.d_model, t5.num_heads * t5.head_dim, t5.d_ff
  enc_layer = (4 * _mm(s, d, inner) + 2 * _mm(s, inner, s) + 3 * _mm(s, d, ff))
  dec_layer = (4 * _mm(t, d, inner) + 2 * _mm(t, inner, t)  # causal self-attention, in full
               + 2 * _mm(t, d, inner) + 2 * _mm(s, d, inner)  # cross q, out; k, v on encoded
               + 2 * _mm(t, inner, s)  # cross-attention products
               + 3 * _mm(t, d, ff))  # gated MLP: wi_0, wi_1, wo
  out["encoder"] = b * t5.num_encoder_layers * enc_layer
  out["decoder"] = b * t5.num_decoder_layers * dec_layer
  out["logits"] = b * _mm(t, d, t5.vocab_size)
  return out


def train_step_flops_breakdown(config, shapes: BatchShapes, *,
                               frozen_vit: bool = False) -> dict[str, float]:
  """FLOPs of forward + backward per part (see the module docstring for what is counted)."""
  fwd = forward_flops(config, shapes)
  out = {k: 3.0 * v for k, v in fwd.items()}
  out["vit_stem"] = 2.0 * fwd["vit_stem"]  # no input gradient for the pixels
  if frozen_vit:
    out["vit_stem"] = fwd["vit_stem"]
    out["vit_layers"] = fwd["vit_layers"]
    out["img_proj"] = 2.0 * fwd["img_proj"]  # weight gradient only
  return out


def train_step_flops(config, shapes: BatchShapes, *, frozen_vit: bool = False) -> float:
  """Model FLOPs of one training step on a (global) batch of `shapes`."""
  return float(sum(train_step_flops_breakdown(config, shapes, frozen_vit=frozen_vit).values()))


def forward_total(config, shapes: BatchShapes) -> float:
  return float(sum(forward_flops(config, shapes).values()))


def vit_is_frozen(frozen) -> bool:
  """True when a frozen mask (a tree of bools like the parameters, as the trainer builds it)
  freezes every ViT parameter; None means nothing is frozen."""
  if frozen is None or "vit" not in frozen:
    return False
  import jax
  leaves = jax.tree_util.tree_leaves(frozen["vit"])
  return bool(leaves) and all(bool(x) for x in leaves)
