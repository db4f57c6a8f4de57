"""Hugging Face T5 / ViT state dicts in safetensors -> our layout.

safetensors holds raw little-endian tensors behind a JSON header (no pickle). torch `Linear`
weights are (out_features, in_features): transposed here to our (in, out) kernels.

T5 (`T5ForConditionalGeneration`, T5.1.1 / UL2 style, gated-GELU `wi_0`/`wi_1`):
`shared.weight` (vocab, d); `{encoder,decoder}.block.{i}.layer.{j}.`
`SelfAttention|EncDecAttention.{q,k,v,o}.weight`, `...layer_norm.weight`,
`DenseReluDense.{wi_0,wi_1,wo}.weight`; the relative position table lives in block 0 as
`relative_attention_bias.weight` (buckets, heads); `final_layer_norm.weight`;
`lm_head.weight` (vocab, d). HF T5 applies no 1/sqrt(head_dim), like us. Without `lm_head`
(tied embeddings) HF scales the decoder output by d_model**-0.5 before the shared table.

ViT (`ViTModel`, optionally under `vit.`): `embeddings.patch_embeddings.projection.weight`
(w, 3, p, p), `embeddings.position_embeddings` (1, 1 + N, w) with the [cls] position first,
`encoder.layer.{i}.layernorm_before|layernorm_after`, `attention.attention.{query,key,value}`,
`attention.output.dense`, `intermediate.dense`, `output.dense`, `layernorm`. HF's attention
divides by sqrt(head_dim): folded into our query kernel. Note HF ViT uses the exact GELU and
LayerNorm eps 1e-12 where ours uses the tanh GELU and 1e-6: outputs agree only approximately.
"""
from __future__ import annotations

import os

import numpy as np

from pali.importers import Imported, SourceDict, stack_or_number, unflatten
from pali.models.t5 import T5Config
from pali.models.vit import ViTConfig, resample_posemb


def read_safetensors(path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  return load_file(os.fspath(path))


def _load(source) -> dict[str, np.ndarray]:
  return read_safetensors(source) if isinstance(source, (str, os.PathLike)) else dict(source)


def import_hf_t5(source, config: T5Config) -> Imported:
  """`source`: a `.safetensors` file or a {name: array} dict. Returns token_embedder,
  encoder and decoder."""
  src = SourceDict(_load(source), "Hugging Face T5 state dict")
  h, kv = config.num_heads, config.head_dim
  out = {"token_embedder/embedding": src.get("shared.weight")}
  for tied in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
    if tied in src:
      src.get(tied)  # the same table as `shared.weight`

  def attention(prefix):
    qkv = {f"{ours}/kernel": src.get(f"{prefix}.{theirs}.weight", lambda w: w.T.reshape(-1, h, kv))
           for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"))}
    qkv["out/kernel"] = src.get(f"{prefix}.o.weight", lambda w: w.T.reshape(h, kv, -1))
    return qkv

  def mlp(prefix):
    if f"{prefix}.wi.weight" in src:
      raise ValueError("HF T5 checkpoint has a single `wi` (T5 v1.0, ReLU); our model is "
                       "T5.1.1 (gated-GELU wi_0/wi_1).")
    return {f"{n}/kernel": src.get(f"{prefix}.{n}.weight", np.transpose)
            for n in ("wi_0", "wi_1", "wo")}

  for stack, n_layers in (("encoder", config.num_encoder_layers),
                          ("decoder", config.num_decoder_layers)):
    if f"{stack}.block.{n_layers}.layer.0.layer_norm.weight" in src:
      raise ValueError(f"HF T5 {stack} has more than {n_layers} blocks: check T5Config.")
    layers = []
    for i in range(n_layers):
      b = f"{stack}.block.{i}.layer"
      layer = {"pre_attention_norm/scale" if stack == "encoder" else
               "pre_self_attention_norm/scale": src.get(f"{b}.0.layer_norm.weight")}
      attn_name = "attention" if stack == "encoder" else "self_attention"
      layer.update({f"{attn_name}/{k}": v for k, v in attention(f"{b}.0.SelfAttention").items()})
      if stack == "decoder":
        layer["pre_cross_attention_norm/scale"] = src.get(f"{b}.1.layer_norm.weight")
        layer.update({f"encoder_decoder_attention/{k}": v
                      for k, v in attention(f"{b}.1.EncDecAttention").items()})
      m = 1 if stack == "encoder" else 2
      layer["pre_mlp_norm/scale"] = src.get(f"{b}.{m}.layer_norm.weight")
      layer.update({f"mlp/{k}": v for k, v in mlp(f"{b}.{m}.DenseReluDense").items()})
      layers.append(layer)
    out.update({f"{stack}/{k}": v for k, v in stack_or_number(layers, config.scan).items()})
    out[f"{stack}/relpos_bias/rel_embedding"] = src.get(
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", np.transpose)
    out[f"{stack}/{stack}_norm/scale"] = src.get(f"{stack}.final_layer_norm.weight")
  if "lm_head.weight" in src:
    out["decoder/logits_dense/kernel"] = src.get("lm_head.weight", np.transpose)
  else:
    out["decoder/logits_dense/kernel"] = out["token_embedder/embedding"].T / np.sqrt(
        config.d_model)
  return Imported(unflatten(out), src.unmapped())


def import_hf_vit(source, config: ViTConfig) -> Imported:
  """`source`: a `.safetensors` file or a {name: array} dict. Returns the `vit` subtree."""
  arrays = _load(source)
  prefix = "vit." if any(k.startswith("vit.") for k in arrays) else ""
  src = SourceDict(arrays, "Hugging Face ViT state dict")
  if config.parallel_block or config.qk_norm or not config.use_bias or config.stem != "patch":
    raise ValueError("HF ViT checkpoints are standard ViTs: use parallel_block=False, "
                     "qk_norm=False, use_bias=True, stem='patch'.")
  h, hd, p, w = config.num_heads, config.head_dim, config.patch_size, config.width
  e = f"{prefix}embeddings"
  out = {
      "embedding/kernel": src.get(f"{e}.patch_embeddings.projection.weight",
                                  lambda k: k.transpose(2, 3, 1, 0).reshape(p * p * 3, w)),
      "embedding/bias": src.get(f"{e}.patch_embeddings.projection.bias"),
  }
  if config.posemb == "learn":
    table = src.get(f"{e}.position_embeddings")[0]
    if int(round(np.sqrt(table.shape[0] - 1))) ** 2 == table.shape[0] - 1:
      table = table[1:]  # drop the [cls] position
    out["pos_embedding"] = np.asarray(resample_posemb(table, config.posemb_grid))
  scale = hd ** -0.5
  layers = []
  for i in range(config.depth):
    b = f"{prefix}encoder.layer.{i}"
    a = f"{b}.attention.attention"
    layer = {}
    for name in ("query", "key", "value"):
      s = scale if name == "query" else 1.0
      layer[f"attention/{name}/kernel"] = src.get(f"{a}.{name}.weight",
                                                  lambda k: k.T.reshape(w, h, hd)) * s
      layer[f"attention/{name}/bias"] = src.get(f"{a}.{name}.bias",
                                                lambda k: k.reshape(h, hd)) * s
    layer["attention/out/kernel"] = src.get(f"{b}.attention.output.dense.weight",
                                            lambda k: k.T.reshape(h, hd, w))
    layer["attention/out/bias"] = src.get(f"{b}.attention.output.dense.bias")
    for ours, theirs in (("attention_norm", "layernorm_before"), ("mlp_norm", "layernorm_after")):
      layer[f"{ours}/scale"] = src.get(f"{b}.{theirs}.weight")
      layer[f"{ours}/bias"] = src.get(f"{b}.{theirs}.bias")
    for ours, theirs in (("wi", "intermediate.dense"), ("wo", "output.dense")):
      layer[f"mlp/{ours}/kernel"] = src.get(f"{b}.{theirs}.weight", np.transpose)
      layer[f"mlp/{ours}/bias"] = src.get(f"{b}.{theirs}.bias")
    layers.append(layer)
  out.update(stack_or_number(layers, config.scan))
  out["encoder_norm/scale"] = src.get(f"{prefix}layernorm.weight")
  out["encoder_norm/bias"] = src.get(f"{prefix}layernorm.bias")
  return Imported(unflatten(out), src.unmapped())
