"""T5X checkpoints of T5.1.1 / UL2 -> our `token_embedder`, `encoder`, `decoder`.

A T5X checkpoint folder `checkpoint_N/` holds a msgpack file `checkpoint` (flax serialisation
of `{'version': 3, 'optimizer': {'target': params, 'state': ...}}`) in which each large array
is replaced by the JSON spec of a tensorstore zarr array whose `kvstore.path` is relative to the
folder (`target.encoder.layers_0.attention.query.kernel`); small arrays sit in the msgpack.

T5X names (t5x/examples/t5/network.py): `token_embedder/embedding` (vocab, embed);
`encoder|decoder/relpos_bias/rel_embedding` (heads, buckets); `encoder/layers_i/`
`pre_attention_layer_norm/scale`, `attention/{query,key,value}/kernel` (embed, joined_kv =
heads*head_dim), `attention/out/kernel` (joined_kv, embed), `pre_mlp_layer_norm/scale`,
`mlp/wi_0|wi_1|wo/kernel`; `decoder/layers_i/` `pre_self_attention_layer_norm`,
`self_attention`, `pre_cross_attention_layer_norm`, `encoder_decoder_attention`,
`pre_mlp_layer_norm`, `mlp`; `encoder_norm` / `decoder_norm`; `decoder/logits_dense/kernel`
(embed, vocab). T5X folds 1/sqrt(head_dim) into the query kernel, as we do, so kernels are
only reshaped. A checkpoint with tied embeddings (no `logits_dense`) computes logits as
y . E^T / sqrt(d_model); that is exactly a `logits_dense` of E^T / sqrt(d_model).

Optimizer state is ignored (reported as unmapped). UL2's released checkpoints use this layout;
its MLP activation must match ours (gated GELU) for the outputs to be the same.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from flax import serialization

from pali.importers import Imported, SourceDict, stack_or_number, unflatten
from pali.models.t5 import T5Config


def _is_ts_spec(value: Any) -> bool:
  return isinstance(value, dict) and "driver" in value and "kvstore" in value


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict) and not _is_ts_spec(value):
      out.update(_flatten(value, path + "/"))
    else:
      out[path] = value
  return out


def _read_tensorstore(spec: dict, checkpoint_dir: str) -> np.ndarray:
  import tensorstore as ts

  kvstore = dict(spec["kvstore"])
  if kvstore.get("driver") not in ("file", "gfile"):
    raise ValueError(f"T5X array on {kvstore.get('driver')!r}: copy the checkpoint to a local "
                     "folder first (only file-backed tensorstores are read here).")
  path = os.path.join(checkpoint_dir, kvstore["path"])
  store = ts.open({"driver": spec.get("driver", "zarr"),
                   "kvstore": {"driver": "file", "path": path}}, open=True).result()
  return np.asarray(store.read().result())


def read_t5x(checkpoint_dir: str) -> dict[str, np.ndarray]:
  """{'target/encoder/...': array, 'state/...': array} of a T5X `checkpoint_N` folder."""
  checkpoint_dir = os.fspath(checkpoint_dir)
  index = os.path.join(checkpoint_dir, "checkpoint")
  if not os.path.isfile(index):
    raise FileNotFoundError(f"{index} not found: pass a T5X `checkpoint_<step>` folder.")
  with open(index, "rb") as fh:
    state = serialization.msgpack_restore(fh.read())
  state = state.get("optimizer", state)
  return {key: (_read_tensorstore(value, checkpoint_dir) if _is_ts_spec(value)
                else np.asarray(value))
          for key, value in _flatten(state).items()}


def _attention(src: SourceDict, prefix: str, cfg: T5Config) -> dict[str, np.ndarray]:
  h, kv = cfg.num_heads, cfg.head_dim
  out = {}
  for name in ("query", "key", "value"):
    out[f"{name}/kernel"] = src.get(f"{prefix}/{name}/kernel", lambda w: w.reshape(-1, h, kv))
  out["out/kernel"] = src.get(f"{prefix}/out/kernel", lambda w: w.reshape(h, kv, -1))
  return out


def _mlp(src: SourceDict, prefix: str) -> dict[str, np.ndarray]:
  if f"{prefix}/wi/kernel" in src:
    raise ValueError("T5X checkpoint has a single-activation MLP (`mlp/wi`, T5.1.0 style); our "
                     "model is T5.1.1 (gated `wi_0`/`wi_1`).")
  return {f"{n}/kernel": src.get(f"{prefix}/{n}/kernel") for n in ("wi_0", "wi_1", "wo")}


_ENCODER_NORMS = (("pre_attention_norm", "pre_attention_layer_norm"),
                  ("pre_mlp_norm", "pre_mlp_layer_norm"))
_DECODER_NORMS = (("pre_self_attention_norm", "pre_self_attention_layer_norm"),
                  ("pre_cross_attention_norm", "pre_cross_attention_layer_norm"),
                  ("pre_mlp_norm", "pre_mlp_layer_norm"))


def import_t5x(source, config: T5Config) -> Imported:
  """`source`: a T5X `checkpoint_N` folder, or an already read {flat key: array} dict."""
  arrays = read_t5x(source) if isinstance(source, (str, os.PathLike)) else dict(source)
  src = SourceDict(arrays, "T5X checkpoint")
  t = "target"
  out = {"token_embedder/embedding": src.get(f"{t}/token_embedder/embedding")}
  for stack, n_layers, norms in (("encoder", config.num_encoder_layers, _ENCODER_NORMS),
                                 ("decoder", config.num_decoder_layers, _DECODER_NORMS)):
    if f"{t}/{stack}/layers_{n_layers}/mlp/wo/kernel" in src:
      raise ValueError(f"T5X {stack} has more than {n_layers} layers: check T5Config.")
    layers = []
    for i in range(n_layers):
      p = f"{t}/{stack}/layers_{i}"
      layer = {f"{ours}/scale": src.get(f"{p}/{theirs}/scale") for ours, theirs in norms}
      attns = ("attention",) if stack == "encoder" else ("self_attention",
                                                         "encoder_decoder_attention")
      for a in attns:
        layer.update({f"{a}/{k}": v for k, v in _attention(src, f"{p}/{a}", config).items()})
      layer.update({f"mlp/{k}": v for k, v in _mlp(src, f"{p}/mlp").items()})
      layers.append(layer)
    out.update({f"{stack}/{k}": v for k, v in stack_or_number(layers, config.scan).items()})
    out[f"{stack}/relpos_bias/rel_embedding"] = src.get(f"{t}/{stack}/relpos_bias/rel_embedding")
    out[f"{stack}/{stack}_norm/scale"] = src.get(f"{t}/{stack}/{stack}_norm/scale")
  if f"{t}/decoder/logits_dense/kernel" in src:
    out["decoder/logits_dense/kernel"] = src.get(f"{t}/decoder/logits_dense/kernel")
  else:  # tied embeddings: logits = y . E^T / sqrt(d_model)
    out["decoder/logits_dense/kernel"] = (out["token_embedder/embedding"].T
                                          / np.sqrt(config.d_model))
  return Imported(unflatten(out), src.unmapped())
