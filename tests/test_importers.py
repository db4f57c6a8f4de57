"""Checkpoint importers: write a tiny model's parameters in a foreign layout, import them back,
and get the same logits.

The writers below follow the foreign formats (big_vision npz, T5X msgpack + tensorstore zarr,
Hugging Face safetensors) independently of the importers, so a layout error on either side
shows up as different outputs. Head dims are 16 (a power of two), so folding 1/sqrt(head_dim)
into a query kernel and back is exact and logits can be compared bit for bit.
"""
import dataclasses
import functools
import os

import flax
import jax
import numpy as np
import pytest
from flax import serialization, traverse_util

from pali import importers
from pali.importers import bigvision_vit, hf_safetensors, t5x_checkpoint
from pali.models import pali as pali_model
from tests import trainer_fixtures as fx


def _init(cfg, seed):
  """The model and random parameters of its shapes (any values do for a layout test; this
  skips the slow eager init)."""
  model = pali_model.build_model(cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), fx.random_batch(2))["params"])
  rng = np.random.default_rng(seed)
  return model, jax.tree_util.tree_map(
      lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
      flax.linen.meta.unbox(shapes))


def _flat(tree) -> dict:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg):
  return jax.jit(pali_model.build_model(cfg).apply)


def _logits(model, params, image_size=fx.IMAGE_SIZE):
  batch = fx.random_batch(2, seed=7)
  if image_size != fx.IMAGE_SIZE:
    rng = np.random.default_rng(0)
    batch["images"] = rng.integers(0, 256, (2, 1, image_size, image_size, 3)).astype(np.uint8)
  return np.asarray(_jitted_apply(model.config)({"params": params}, batch))


def _layer(flat, prefix, i, scan):
  """Our per-layer parameters {suffix: array} of layer i (scanned or not)."""
  if scan:
    start = f"{prefix}layers/"
    return {k[len(start):]: v[i] for k, v in flat.items() if k.startswith(start)}
  p = f"{prefix}layers_{i}/"
  return {k[len(p):]: v for k, v in flat.items() if k.startswith(p)}


# ---- Writers of the foreign layouts --------------------------------------------------------

def write_bigvision(path, vit_cfg, flat, *, scanned_file=False, cls_position=False):
  p, w, hd = vit_cfg.patch_size, vit_cfg.width, vit_cfg.head_dim
  att = "MultiHeadDotProductAttention_0"
  out = {"embedding/kernel": flat["vit/embedding/kernel"].reshape(p, p, 3, w),
         "head/kernel": np.zeros((w, 10), np.float32)}  # a classifier head: unmapped
  pos = flat["vit/pos_embedding"][None]
  if cls_position:
    pos = np.concatenate([np.full((1, 1, w), 7.0, np.float32), pos], axis=1)
  out["pos_embedding"] = pos
  bias = vit_cfg.use_bias
  if bias:
    out["embedding/bias"] = flat["vit/embedding/bias"]
  q_scale = 1.0 if vit_cfg.qk_norm else hd ** -0.5
  blocks = []
  for i in range(vit_cfg.depth):
    ours = _layer(flat, "vit/", i, vit_cfg.scan)
    b = {}
    for n in ("query", "key", "value", "out"):
      s = q_scale if n == "query" else 1.0
      b[f"{att}/{n}/kernel"] = ours[f"attention/{n}/kernel"] / s
      if bias:
        b[f"{att}/{n}/bias"] = ours[f"attention/{n}/bias"] / s
    if vit_cfg.qk_norm:
      b[f"{att}/query_ln/scale"] = ours["attention/query_norm/scale"]
      b[f"{att}/key_ln/scale"] = ours["attention/key_norm/scale"]
    norms = [("LayerNorm_0", "norm")] if vit_cfg.parallel_block else [
        ("LayerNorm_0", "attention_norm"), ("LayerNorm_1", "mlp_norm")]
    for theirs, mine in norms:
      b[f"{theirs}/scale"] = ours[f"{mine}/scale"]
      if bias:
        b[f"{theirs}/bias"] = ours[f"{mine}/bias"]
    for theirs, mine in (("Dense_0", "wi"), ("Dense_1", "wo")):
      b[f"MlpBlock_0/{theirs}/kernel"] = ours[f"mlp/{mine}/kernel"]
      if bias:
        b[f"MlpBlock_0/{theirs}/bias"] = ours[f"mlp/{mine}/bias"]
    blocks.append(b)
  if scanned_file:
    out.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks])
                for k in blocks[0]})
  else:
    for i, b in enumerate(blocks):
      out.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in b.items()})
  out["Transformer/encoder_norm/scale"] = flat["vit/encoder_norm/scale"]
  if bias:
    out["Transformer/encoder_norm/bias"] = flat["vit/encoder_norm/bias"]
  np.savez(path, **out)


def _t5x_target(t5_cfg, flat):
  target = {"token_embedder/embedding": flat["token_embedder/embedding"],
            "decoder/logits_dense/kernel": flat["decoder/logits_dense/kernel"]}
  norms = {"encoder": [("pre_attention_layer_norm", "pre_attention_norm"),
                       ("pre_mlp_layer_norm", "pre_mlp_norm")],
           "decoder": [("pre_self_attention_layer_norm", "pre_self_attention_norm"),
                       ("pre_cross_attention_layer_norm", "pre_cross_attention_norm"),
                       ("pre_mlp_layer_norm", "pre_mlp_norm")]}
  for stack in ("encoder", "decoder"):
    n = t5_cfg.num_encoder_layers if stack == "encoder" else t5_cfg.num_decoder_layers
    for i in range(n):
      ours = _layer(flat, f"{stack}/", i, t5_cfg.scan)
      p = f"{stack}/layers_{i}"
      for theirs, mine in norms[stack]:
        target[f"{p}/{theirs}/scale"] = ours[f"{mine}/scale"]
      attns = ["attention"] if stack == "encoder" else ["self_attention",
                                                       "encoder_decoder_attention"]
      for a in attns:
        for q in ("query", "key", "value"):
          k = ours[f"{a}/{q}/kernel"]
          target[f"{p}/{a}/{q}/kernel"] = k.reshape(k.shape[0], -1)  # (embed, joined_kv)
        o = ours[f"{a}/out/kernel"]
        target[f"{p}/{a}/out/kernel"] = o.reshape(-1, o.shape[-1])  # (joined_kv, embed)
      for m in ("wi_0", "wi_1", "wo"):
        target[f"{p}/mlp/{m}/kernel"] = ours[f"mlp/{m}/kernel"]
    target[f"{stack}/relpos_bias/rel_embedding"] = flat[f"{stack}/relpos_bias/rel_embedding"]
    target[f"{stack}/{stack}_norm/scale"] = flat[f"{stack}/{stack}_norm/scale"]
  return target


def write_t5x(ckpt_dir, t5_cfg, flat):
  """T5X's layout: arrays of rank >= 2 in tensorstore zarr (gzip), the rest in the msgpack."""
  import tensorstore as ts

  os.makedirs(ckpt_dir)
  tree = {}
  for name, value in _t5x_target(t5_cfg, flat).items():
    name = f"target/{name}"
    if value.ndim >= 2:
      rel = name.replace("/", ".")
      metadata = {"compressor": {"id": "gzip"}, "shape": list(value.shape),
                  "chunks": list(value.shape)}
      spec = {"driver": "zarr", "dtype": "float32",
              "kvstore": {"driver": "file", "path": rel}, "metadata": metadata}
      store = ts.open({**spec, "kvstore": {"driver": "file",
                                           "path": os.path.join(ckpt_dir, rel)}},
                      create=True).result()
      store.write(value.astype(np.float32)).result()
      tree[name] = spec
    else:
      tree[name] = value
  tree["state/step"] = np.asarray(1000, np.int32)
  tree["state/param_states/encoder/encoder_norm/scale/v"] = np.ones(4, np.float32)
  nested = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in tree.items()})
  with open(os.path.join(ckpt_dir, "checkpoint"), "wb") as fh:
    fh.write(serialization.msgpack_serialize({"version": 3, "optimizer": nested}))


def write_hf_t5(path, t5_cfg, flat):
  from safetensors.numpy import save_file
  out = {"shared.weight": flat["token_embedder/embedding"],
         "encoder.embed_tokens.weight": flat["token_embedder/embedding"],
         "decoder.embed_tokens.weight": flat["token_embedder/embedding"],
         "lm_head.weight": flat["decoder/logits_dense/kernel"].T}

  def attn(prefix, ours, name):
    for q, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
      k = ours[f"{name}/{q}/kernel"]
      out[f"{prefix}.{theirs}.weight"] = k.reshape(k.shape[0], -1).T  # torch (out, in)
    o = ours[f"{name}/out/kernel"]
    out[f"{prefix}.o.weight"] = o.reshape(-1, o.shape[-1]).T

  for stack in ("encoder", "decoder"):
    n = t5_cfg.num_encoder_layers if stack == "encoder" else t5_cfg.num_decoder_layers
    for i in range(n):
      ours = _layer(flat, f"{stack}/", i, t5_cfg.scan)
      b = f"{stack}.block.{i}.layer"
      if stack == "encoder":
        out[f"{b}.0.layer_norm.weight"] = ours["pre_attention_norm/scale"]
        attn(f"{b}.0.SelfAttention", ours, "attention")
        mlp_j = 1
      else:
        out[f"{b}.0.layer_norm.weight"] = ours["pre_self_attention_norm/scale"]
        attn(f"{b}.0.SelfAttention", ours, "self_attention")
        out[f"{b}.1.layer_norm.weight"] = ours["pre_cross_attention_norm/scale"]
        attn(f"{b}.1.EncDecAttention", ours, "encoder_decoder_attention")
        mlp_j = 2
      out[f"{b}.{mlp_j}.layer_norm.weight"] = ours["pre_mlp_norm/scale"]
      for m in ("wi_0", "wi_1", "wo"):
        out[f"{b}.{mlp_j}.DenseReluDense.{m}.weight"] = ours[f"mlp/{m}/kernel"].T
    out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        flat[f"{stack}/relpos_bias/rel_embedding"].T)
    out[f"{stack}.final_layer_norm.weight"] = flat[f"{stack}/{stack}_norm/scale"]
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}, str(path))


def write_hf_vit(path, vit_cfg, flat):
  from safetensors.numpy import save_file
  p, w, h, hd = vit_cfg.patch_size, vit_cfg.width, vit_cfg.num_heads, vit_cfg.head_dim
  e = "vit.embeddings"
  pos = flat["vit/pos_embedding"][None]
  out = {f"{e}.patch_embeddings.projection.weight":
         flat["vit/embedding/kernel"].reshape(p, p, 3, w).transpose(3, 2, 0, 1),
         f"{e}.patch_embeddings.projection.bias": flat["vit/embedding/bias"],
         f"{e}.position_embeddings": np.concatenate([np.ones((1, 1, w), np.float32), pos], 1),
         f"{e}.cls_token": np.zeros((1, 1, w), np.float32),
         "vit.layernorm.weight": flat["vit/encoder_norm/scale"],
         "vit.layernorm.bias": flat["vit/encoder_norm/bias"],
         "classifier.weight": np.zeros((10, w), np.float32)}
  for i in range(vit_cfg.depth):
    ours = _layer(flat, "vit/", i, vit_cfg.scan)
    b = f"vit.encoder.layer.{i}"
    for n in ("query", "key", "value"):
      s = hd ** -0.5 if n == "query" else 1.0
      out[f"{b}.attention.attention.{n}.weight"] = (
          ours[f"attention/{n}/kernel"].reshape(w, h * hd).T / s)
      out[f"{b}.attention.attention.{n}.bias"] = ours[f"attention/{n}/bias"].reshape(-1) / s
    out[f"{b}.attention.output.dense.weight"] = ours["attention/out/kernel"].reshape(-1, w).T
    out[f"{b}.attention.output.dense.bias"] = ours["attention/out/bias"]
    for theirs, mine in (("layernorm_before", "attention_norm"), ("layernorm_after", "mlp_norm")):
      out[f"{b}.{theirs}.weight"] = ours[f"{mine}/scale"]
      out[f"{b}.{theirs}.bias"] = ours[f"{mine}/bias"]
    out[f"{b}.intermediate.dense.weight"] = ours["mlp/wi/kernel"].T
    out[f"{b}.intermediate.dense.bias"] = ours["mlp/wi/bias"]
    out[f"{b}.output.dense.weight"] = ours["mlp/wo/kernel"].T
    out[f"{b}.output.dense.bias"] = ours["mlp/wo/bias"]
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}, str(path))


# ---- Tests ---------------------------------------------------------------------------------

def _non_vit(params):
  return {k: v for k, v in params.items() if k != "vit"}


@pytest.mark.parametrize("scanned_file,cls_position", [(False, False), (True, True)])
def test_bigvision_vit_round_trip_gives_the_same_logits(tmp_path, scanned_file, cls_position):
  cfg = fx.tiny_config()
  model, source = _init(cfg, seed=0)
  _, fresh = _init(cfg, seed=1)
  path = tmp_path / "vit.npz"
  write_bigvision(path, cfg.vit, _flat(source), scanned_file=scanned_file,
                  cls_position=cls_position)
  imported = bigvision_vit.import_vit(str(path), cfg.vit)
  assert imported.unmapped == ["head/kernel"]
  params = importers.load_into(fresh, imported, prefix="vit")
  params = importers.load_into(params, _non_vit(source))
  np.testing.assert_array_equal(_logits(model, params), _logits(model, source))
  assert not np.array_equal(_logits(model, fresh), _logits(model, source))


def test_vit22b_variant_with_position_resampling(tmp_path):
  """Written at a 2x2 patch grid, imported into a model stored at 4x4 (scanned, parallel
  blocks, qk norm, no biases): equals the source model resampling on the fly at 32 px."""
  variant = dict(parallel_block=True, qk_norm=True, use_bias=False, scan=True)
  src_cfg = fx.tiny_config(**variant)  # posemb_grid 2
  dst_cfg = fx.tiny_config(**variant, posemb_grid=4)
  src_model, source = _init(src_cfg, seed=0)
  dst_model, fresh = _init(dst_cfg, seed=1)
  path = tmp_path / "vit22b.npz"
  write_bigvision(path, src_cfg.vit, _flat(source))
  imported = bigvision_vit.import_vit(str(path), dst_cfg.vit)
  assert imported.params["pos_embedding"].shape == (16, 32)
  assert "query_norm" in imported.params["layers"]["attention"]
  params = importers.load_into(fresh, imported, prefix="vit")
  params = importers.load_into(params, _non_vit(source))
  np.testing.assert_allclose(_logits(dst_model, params, 32), _logits(src_model, source, 32),
                             rtol=1e-6, atol=1e-6)


def test_bigvision_config_mismatch_is_reported(tmp_path):
  cfg = fx.tiny_config()
  _, source = _init(cfg, seed=0)
  path = tmp_path / "vit.npz"
  write_bigvision(path, cfg.vit, _flat(source))
  with pytest.raises(ValueError, match="depth"):
    bigvision_vit.import_vit(str(path), dataclasses.replace(cfg.vit, depth=3))
  with pytest.raises(ValueError, match="parallel_block"):
    bigvision_vit.import_vit(str(path), dataclasses.replace(cfg.vit, parallel_block=True))


def test_npz_with_pickled_objects_is_refused(tmp_path):
  path = tmp_path / "evil.npz"
  np.savez(path, x=np.array([{"a": 1}], dtype=object))
  with pytest.raises(ValueError, match="pickle"):
    bigvision_vit.read_npz(str(path))


def test_t5x_checkpoint_round_trip_gives_the_same_logits(tmp_path):
  cfg = fx.tiny_config()
  model, source = _init(cfg, seed=0)
  _, fresh = _init(cfg, seed=1)
  ckpt = tmp_path / "checkpoint_1000"
  write_t5x(str(ckpt), cfg.t5, _flat(source))
  assert (ckpt / "target.encoder.layers_0.attention.query.kernel" / ".zarray").exists()
  imported = t5x_checkpoint.import_t5x(str(ckpt), cfg.t5)
  assert imported.unmapped == ["state/param_states/encoder/encoder_norm/scale/v", "state/step"]
  assert set(imported.params) == {"token_embedder", "encoder", "decoder"}
  params = importers.load_into(fresh, imported)
  params = importers.load_into(params, {k: source[k] for k in ("vit", "img_proj")})
  np.testing.assert_array_equal(_logits(model, params), _logits(model, source))


def test_hf_t5_into_a_scanned_model(tmp_path):
  cfg = fx.tiny_config()
  scanned_cfg = dataclasses.replace(cfg, t5=dataclasses.replace(cfg.t5, scan=True))
  model, source = _init(cfg, seed=0)
  scanned_model, fresh = _init(scanned_cfg, seed=1)
  path = tmp_path / "model.safetensors"
  write_hf_t5(path, cfg.t5, _flat(source))
  imported = hf_safetensors.import_hf_t5(str(path), scanned_cfg.t5)
  assert imported.unmapped == []
  assert imported.params["encoder"]["layers"]["mlp"]["wi_0"]["kernel"].shape == (2, 32, 64)
  params = importers.load_into(fresh, imported)
  params = importers.load_into(params, {k: source[k] for k in ("vit", "img_proj")})
  # Scanned and unrolled stacks run the same ops; allow only float reassociation.
  np.testing.assert_allclose(_logits(scanned_model, params), _logits(model, source),
                             rtol=1e-6, atol=1e-6)


def test_hf_vit_round_trip_gives_the_same_logits(tmp_path):
  cfg = fx.tiny_config()
  model, source = _init(cfg, seed=0)
  _, fresh = _init(cfg, seed=1)
  path = tmp_path / "vit.safetensors"
  write_hf_vit(path, cfg.vit, _flat(source))
  imported = hf_safetensors.import_hf_vit(str(path), cfg.vit)
  assert imported.unmapped == ["classifier.weight", "vit.embeddings.cls_token"]
  params = importers.load_into(fresh, imported, prefix="vit")
  params = importers.load_into(params, _non_vit(source))
  np.testing.assert_array_equal(_logits(model, params), _logits(model, source))


def test_load_into_checks_names_and_shapes():
  cfg = fx.tiny_config()
  _, params = _init(cfg, seed=0)
  with pytest.raises(importers.CheckpointImportError, match="no place"):
    importers.load_into(params, {"vit": {"nonexistent": np.zeros(3)}})
  with pytest.raises(importers.CheckpointImportError, match="shape"):
    importers.load_into(params, {"encoder_norm": {"scale": np.zeros(3)}}, prefix="vit")
