"""big_vision ViT checkpoints (`.npz`, '/'-flattened keys) -> our `vit` subtree.

big_vision names (big_vision/models/vit.py): `embedding/kernel` conv (p, p, 3, w) + `bias`;
`pos_embedding` (1, N, w) (older files: `Transformer/pos_embedding`, or N = g*g + 1 with the
[cls] position first); `Transformer/encoderblock_{i}/` (or `Transformer/encoderblock/` with a
leading depth axis when trained with scan) holding `LayerNorm_0` (before attention),
`MultiHeadDotProductAttention_0/{query,key,value}/kernel` (w, heads, head_dim) + bias
(heads, head_dim), `out/kernel` (heads, head_dim, w), `LayerNorm_1`, `MlpBlock_0/Dense_0|1`;
`Transformer/encoder_norm`. Heads (`head`, `pre_logits`, `MAPHead_0`, `cls`) are reported as
unmapped: PaLI uses every patch token.

ViT-22B variant (config.parallel_block / qk_norm / use_bias=False): one `LayerNorm_0` feeds both
branches, flax's qk normalisation adds `MultiHeadDotProductAttention_0/query_ln|key_ln/scale`,
and there are no biases.

flax attention divides q.k by sqrt(head_dim); our attention folds that scale into the query
kernel (T5 convention) unless qk_norm is on (then it is applied after the norm), so the query
kernel and bias are scaled on import when qk_norm is off. The position table is resampled to
`config.posemb_grid` with `pali.models.vit.resample_posemb`.
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from pali.importers import Imported, SourceDict, stack_or_number, unflatten
from pali.models.vit import ViTConfig, resample_posemb

_ATT = "MultiHeadDotProductAttention_0"


def read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of an `.npz` file (never unpickled)."""
  with np.load(os.fspath(path), allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def _block_sources(src: SourceDict, depth: int) -> list[dict]:
  """One flat {name: array} per layer, unstacking a scanned `encoderblock` if present."""
  if any(k.startswith("Transformer/encoderblock/") for k in src.arrays):
    prefix = "Transformer/encoderblock/"
    stacked = {k[len(prefix):]: src.get(k) for k in list(src.arrays) if k.startswith(prefix)}
    n = {v.shape[0] for v in stacked.values()}
    if n != {depth}:
      raise ValueError(f"Scanned big_vision ViT has depth {n}, the config says {depth}.")
    return [{k: v[i] for k, v in stacked.items()} for i in range(depth)]
  blocks = []
  for i in range(depth):
    prefix = f"Transformer/encoderblock_{i}/"
    keys = [k for k in src.arrays if k.startswith(prefix)]
    if not keys:
      raise ValueError(f"big_vision ViT: no {prefix}* in the checkpoint; the config has depth "
                       f"{depth}. Check ViTConfig.depth.")
    blocks.append({k[len(prefix):]: src.get(k) for k in keys})
  extra = [k for k in src.arrays if k.startswith(f"Transformer/encoderblock_{depth}/")]
  if extra:
    raise ValueError(f"big_vision ViT has more than {depth} blocks; check ViTConfig.depth.")
  return blocks


def _convert_block(block: Mapping[str, np.ndarray], cfg: ViTConfig) -> dict[str, np.ndarray]:
  block = dict(block)
  used: set[str] = set()

  def take(name):
    if name not in block:
      raise ValueError(f"big_vision ViT block lacks {name!r} (has {sorted(block)[:12]}); "
                       "check parallel_block / qk_norm / use_bias in the ViTConfig.")
    used.add(name)
    return np.asarray(block[name])

  out: dict[str, np.ndarray] = {}
  q_scale = 1.0 if cfg.qk_norm else cfg.head_dim ** -0.5
  for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value"), ("out", "out")):
    scale = q_scale if ours == "query" else 1.0
    out[f"attention/{ours}/kernel"] = take(f"{_ATT}/{theirs}/kernel") * scale
    if cfg.use_bias:
      out[f"attention/{ours}/bias"] = take(f"{_ATT}/{theirs}/bias") * scale
  if cfg.qk_norm:
    for ours, theirs in (("query_norm", "query_ln"), ("key_norm", "key_ln")):
      for p in ("scale", "bias") if cfg.use_bias else ("scale",):
        out[f"attention/{ours}/{p}"] = take(f"{_ATT}/{theirs}/{p}")
  norms = (("norm", "LayerNorm_0"),) if cfg.parallel_block else (
      ("attention_norm", "LayerNorm_0"), ("mlp_norm", "LayerNorm_1"))
  for ours, theirs in norms:
    for p in ("scale", "bias") if cfg.use_bias else ("scale",):
      out[f"{ours}/{p}"] = take(f"{theirs}/{p}")
  for ours, theirs in (("wi", "Dense_0"), ("wo", "Dense_1")):
    out[f"mlp/{ours}/kernel"] = take(f"MlpBlock_0/{theirs}/kernel")
    if cfg.use_bias:
      out[f"mlp/{ours}/bias"] = take(f"MlpBlock_0/{theirs}/bias")
  left = sorted(set(block) - used)
  if left:
    raise ValueError(f"big_vision ViT block has parameters the config does not use: {left}; "
                     "check parallel_block / qk_norm / use_bias in the ViTConfig.")
  return out


def import_vit(source, config: ViTConfig) -> Imported:
  """`source`: path to an `.npz` or a {flat key: array} dict. Returns the `vit` subtree."""
  if config.stem != "patch":
    raise ValueError("big_vision ViTs have a patch stem; set ViTConfig.stem='patch'.")
  arrays = read_npz(source) if isinstance(source, (str, os.PathLike)) else dict(source)
  src = SourceDict(arrays, "big_vision ViT")
  out: dict[str, np.ndarray] = {}
  conv = src.get("embedding/kernel")  # (p, p, 3, width): rows in our (y, x, channel) order
  p = config.patch_size
  if conv.shape != (p, p, 3, config.width):
    raise ValueError(f"big_vision embedding/kernel is {conv.shape}; the config expects "
                     f"{(p, p, 3, config.width)} (patch_size, width).")
  out["embedding/kernel"] = conv.reshape(p * p * 3, config.width)
  if config.use_bias:
    out["embedding/bias"] = src.get("embedding/bias")

  if config.posemb == "learn":
    key = "pos_embedding" if "pos_embedding" in src else "Transformer/pos_embedding"
    table = src.get(key)[0]  # (N, width)
    n = table.shape[0]
    if int(round(np.sqrt(n - 1))) ** 2 == n - 1:
      table = table[1:]  # old layout: the [cls] position comes first; PaLI has no [cls]
    out["pos_embedding"] = np.asarray(resample_posemb(table, config.posemb_grid))

  blocks = [_convert_block(b, config) for b in _block_sources(src, config.depth)]
  out.update(stack_or_number(blocks, config.scan))
  for p_name in ("scale", "bias") if config.use_bias else ("scale",):
    out[f"encoder_norm/{p_name}"] = src.get(f"Transformer/encoder_norm/{p_name}")
  return Imported(unflatten(out), src.unmapped())
