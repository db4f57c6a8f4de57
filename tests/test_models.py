"""Model tests on tiny shapes: fusion, masks, KV-cache decoding, posemb resampling, scan,
partitioning metadata and the 55B config (abstractly)."""
import dataclasses
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pali.models import layers, pali, t5, vit

GIN_DIR = os.path.join(os.path.dirname(__file__), "..", "gin_configs", "models")
ATOL = 1e-5  # float32 tolerance for "the same computation, arranged differently".


def tiny_config(vit_kw=None, t5_kw=None) -> pali.PaliConfig:
  v = dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=2, posemb="learn",
           posemb_grid=2)
  t = dict(vocab_size=50, d_model=32, num_heads=2, head_dim=16, d_ff=64, num_encoder_layers=2,
           num_decoder_layers=2)
  v = vit.ViTConfig(**{**v, **(vit_kw or {})})
  t = t5.T5Config(**{**t, **(t5_kw or {})})
  return pali.PaliConfig(vit=v, t5=t)


def random_batch(seed, batch=2, image_size=16, num_images=1, in_len=5, out_len=4, vocab=50):
  rng = np.random.default_rng(seed)
  b = pali.dummy_batch(batch, image_size, num_images, in_len, out_len)
  b["images"] = rng.integers(0, 256, b["images"].shape, dtype=np.uint8)
  b["image_mask"][:] = 1
  b["encoder_input_tokens"] = rng.integers(1, vocab, (batch, in_len)).astype(np.int32)
  b["encoder_input_tokens"][:, -1] = 0  # some padding
  b["decoder_input_tokens"] = rng.integers(1, vocab, (batch, out_len)).astype(np.int32)
  b["decoder_input_tokens"][:, 0] = 0  # shifted-right targets start with 0
  return b


def init(model, batch, seed=0):
  return nn.meta.unbox(model.init(jax.random.key(seed), batch)["params"])


@pytest.fixture(scope="module")
def tiny():
  model = pali.build_model(tiny_config())
  return model, init(model, random_batch(0))


@pytest.mark.parametrize("num_images,mask", [(1, [1]), (2, [1, 1]), (2, [1, 0]), (1, [0]),
                                             (0, [])])
def test_call_shapes(tiny, num_images, mask):
  model, params = tiny
  batch = random_batch(1, num_images=num_images)
  batch["image_mask"][:] = np.asarray(mask, np.int32)
  logits = model.apply({"params": params}, batch)
  assert logits.shape == (2, 4, 50) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  encoded, enc_mask = model.apply({"params": params}, batch["images"], batch["image_mask"],
                                  batch["encoder_input_tokens"], method=pali.PaliModel.encode)
  n_img_tokens = num_images * pali.num_image_tokens(model.config, 16)
  assert encoded.shape == (2, n_img_tokens + 5, 32)
  expected = np.concatenate([np.repeat(batch["image_mask"] > 0, 4, axis=1),
                             batch["encoder_input_tokens"] != 0], axis=1)
  np.testing.assert_array_equal(np.asarray(enc_mask), expected)


def test_absent_image_does_not_change_logits(tiny):
  model, params = tiny
  batch = random_batch(2, num_images=2)
  batch["image_mask"] = np.array([[1, 0], [1, 1]], np.int32)
  base = np.asarray(model.apply({"params": params}, batch))
  changed = dict(batch, images=batch["images"].copy())
  changed["images"][:, 1] = 255 - changed["images"][:, 1]  # new pixels for image 2 of both
  out = np.asarray(model.apply({"params": params}, changed))
  np.testing.assert_array_equal(out[0], base[0])  # masked-out image: exactly no effect
  assert np.abs(out[1] - base[1]).max() > 1e-4  # present image: it matters


@pytest.mark.parametrize("scan", [False, True])
def test_incremental_decoding_matches_full_forward(scan):
  model = pali.build_model(tiny_config(t5_kw=dict(scan=scan)))
  batch = random_batch(3, out_len=6)
  params = init(model, batch)
  encoded, mask = model.apply({"params": params}, batch["images"], batch["image_mask"],
                              batch["encoder_input_tokens"], method=pali.PaliModel.encode)
  tokens = batch["decoder_input_tokens"]
  full = model.apply({"params": params}, encoded, mask, tokens, method=pali.PaliModel.decode)

  cache = pali.init_cache(model, 2, tokens.shape[1])
  ref_cache = model.init(jax.random.key(0), encoded, mask, tokens, decode=True,
                         method=pali.PaliModel.decode)["cache"]
  assert jax.tree.map(jnp.shape, cache) == jax.tree.map(jnp.shape, ref_cache)

  @jax.jit
  def step(cache, token):
    logits, state = model.apply({"params": params, "cache": cache}, encoded, mask, token,
                                decode=True, max_decode_length=tokens.shape[1],
                                method=pali.PaliModel.decode, mutable=["cache"])
    return logits, state["cache"]

  for i in range(tokens.shape[1]):
    logits, cache = step(cache, tokens[:, i:i + 1])
    np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(full[:, i]), atol=ATOL)


def test_learned_posemb_resampled_on_the_fly_equals_resampled_params():
  small = vit.ViT(tiny_config(vit_kw=dict(posemb_grid=4)).vit)  # 32 px native
  big = vit.ViT(tiny_config(vit_kw=dict(posemb_grid=8)).vit)  # 64 px native
  images = jax.random.uniform(jax.random.key(4), (2, 64, 64, 3), minval=-1, maxval=1)
  params = nn.meta.unbox(small.init(jax.random.key(0), images[:, :32, :32])["params"])
  out_small = small.apply({"params": params}, images)  # resamples 4x4 -> 8x8 inside

  table = params["pos_embedding"]
  assert table.shape == (16, 32)
  warm = dict(params, pos_embedding=vit.resample_posemb(table, 8))
  assert warm["pos_embedding"].shape == (64, 32)
  assert vit.resample_posemb(table[None], (8, 4)).shape == (1, 32, 32)
  assert out_small.shape == (2, 64, 32)
  np.testing.assert_allclose(np.asarray(out_small), np.asarray(big.apply({"params": warm}, images)),
                             atol=ATOL)
  with pytest.raises(ValueError, match="not divisible"):
    small.apply({"params": params}, images[:, :20, :20])


def _stack(tree):
  """Per-layer params `layers_i` -> one scanned `layers` subtree with a leading axis."""
  if not isinstance(tree, dict):
    return tree
  keys = sorted((k for k in tree if k.startswith("layers_")), key=lambda k: int(k[7:]))
  out = {k: _stack(v) for k, v in tree.items() if k not in keys}
  if keys:
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[k] for k in keys])
  return out


def test_scan_equals_unscanned_with_converted_params():
  loop = pali.build_model(tiny_config())
  scanned = pali.build_model(tiny_config(vit_kw=dict(scan=True, remat_policy="full"),
                                         t5_kw=dict(scan=True, remat_policy="dots")))
  batch = random_batch(5)
  params = init(loop, batch)
  scan_shapes = jax.eval_shape(lambda: nn.meta.unbox(
      scanned.init(jax.random.key(0), batch)["params"]))
  stacked = _stack(params)
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(lambda s: s.shape, scan_shapes)
  assert stacked["encoder"]["layers"]["mlp"]["wi_0"]["kernel"].shape == (2, 32, 64)
  np.testing.assert_allclose(np.asarray(scanned.apply({"params": stacked}, batch)),
                             np.asarray(loop.apply({"params": params}, batch)), atol=ATOL)


def _check_partitioned(boxed_params, scanned_prefixes=()):
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.Partitioned), f"{name} has no logical partitioning"
    assert len(leaf.names) == len(leaf.value.shape), f"{name}: {leaf.names} vs {leaf.value.shape}"
    if "['layers']" in name:
      assert leaf.names[0] == "layers", name
  return leaves


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_axes(scan):
  cfg = tiny_config(vit_kw=dict(scan=scan, stem="conv", center_input=True), t5_kw=dict(scan=scan))
  model = pali.build_model(cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), random_batch(0)))
  leaves = _check_partitioned(shapes["params"])
  names = {jax.tree_util.keystr(p): l.names for p, l in leaves}
  assert names["['img_proj']['kernel']"] == ("vit_embed", "embed")
  assert names["['token_embedder']['embedding']"] == ("vocab", "embed")
  assert names["['decoder']['logits_dense']['kernel']"] == ("embed", "vocab")
  assert names["['encoder']['relpos_bias']['rel_embedding']"] == ("heads", "relpos_buckets")
  assert names["['vit']['embedding']['kernel']"] == ("patch", "embed")
  assert names["['vit']['mean_colour']['kernel']"] == (None, "embed")


def test_conv_stem_channels():
  cfg = tiny_config(vit_kw=dict(stem="conv", stem_channels=(12, 20)))
  shapes = jax.eval_shape(lambda: pali.build_model(cfg).init(jax.random.key(0),
                                                             random_batch(0)))["params"]
  p = nn.meta.unbox(shapes)["vit"]
  assert p["stem_conv_0"]["kernel"].shape == (3, 3, 3, 12)
  assert p["stem_conv_1"]["kernel"].shape == (3, 3, 12, 20)
  assert p["embedding"]["kernel"].shape == (2 * 2 * 20, 32)  # (p/4)^2 blocks of 20 channels
  three = vit.ViTConfig(**{**dataclasses.asdict(cfg.vit), "stem_channels": (8, 12, 16)})
  images = jnp.zeros((2, 16, 16, 3), jnp.float32)
  params = jax.eval_shape(lambda: vit.ViT(three).init(jax.random.key(0), images))
  p = nn.meta.unbox(params)["params"]
  assert p["stem_conv_2"]["kernel"].shape == (3, 3, 12, 16)
  assert p["embedding"]["kernel"].shape == (1 * 1 * 16, 32)  # three halvings of an 8-px patch
  out = jax.eval_shape(lambda v: vit.ViT(three).apply(v, images), params)
  assert out.shape == (2, 2 * 2, 32)  # the patch stem's (16/8)^2 token grid
  with pytest.raises(ValueError, match="divisible by 16"):
    vit.ViTConfig(stem="conv", patch_size=8, stem_channels=(8, 8, 8, 8))


def test_patch_norm_normalises_the_patch_embedding():
  cfg = tiny_config(vit_kw=dict(patch_norm=True))
  model = vit.ViT(cfg.vit)
  images = jnp.asarray(np.random.default_rng(0).uniform(-0.05, 0.05, (2, 16, 16, 3)), jnp.float32)
  params = model.init(jax.random.key(0), images)
  p = nn.meta.unbox(params)["params"]
  assert p["patch_norm_in"]["scale"].shape == (8 * 8 * 3,)
  assert p["patch_norm_out"]["scale"].shape == (32,)
  _, inter = model.apply(params, images, capture_intermediates=True, mutable=["intermediates"])
  emb = inter["intermediates"]["patch_norm_out"]["__call__"][0]
  # Faint images still give unit-scale patch embeddings (what the position embedding meets).
  np.testing.assert_allclose(np.std(np.asarray(emb), axis=-1), 1.0, rtol=0.05)


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_center_input_sees_colour_only_through_mean_colour(stem):
  cfg = tiny_config(vit_kw=dict(center_input=True, stem=stem))
  model = vit.ViT(cfg.vit)
  images = jnp.asarray(np.random.default_rng(0).uniform(-0.5, 0.5, (2, 16, 16, 3)), jnp.float32)
  shifted = images + jnp.array([0.3, -0.2, 0.1])  # another background colour, same content
  params = model.init(jax.random.key(0), images)
  # At initialisation (mean_colour is zero) only the content relative to the mean counts...
  np.testing.assert_allclose(model.apply(params, shifted), model.apply(params, images),
                             atol=ATOL)
  # ...and the mean colour is still there for the model to learn from.
  p = nn.meta.unbox(params)
  kernel = p["params"]["mean_colour"]["kernel"]
  p["params"]["mean_colour"]["kernel"] = jax.random.normal(jax.random.key(1), kernel.shape)
  assert np.abs(np.asarray(model.apply(p, shifted) - model.apply(p, images))).max() > 1e-2


def test_sincos_loc_init_starts_neighbouring_bins_alike():
  base = tiny_config()
  cfg = dataclasses.replace(base, loc_init="sincos", first_loc_id=10, num_loc_tokens=32)
  params = nn.meta.unbox(pali.build_model(cfg).init(jax.random.key(0), random_batch(0)))
  emb = np.asarray(params["params"]["token_embedder"]["embedding"])
  logits = np.asarray(params["params"]["decoder"]["logits_dense"]["kernel"])  # (embed, vocab)
  code = np.asarray(pali.loc_code(32, 32))
  np.testing.assert_allclose(emb[10:42], code, atol=1e-6)
  np.testing.assert_allclose(logits[:, 10:42], code.T / np.sqrt(32), atol=1e-6)
  np.testing.assert_allclose(np.sqrt(np.mean(code ** 2)), 1.0, rtol=1e-6)  # the table's scale
  cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
  near, mid, far = (cos(emb[20], emb[20 + d]) for d in (1, 4, 20))
  assert near > 0.9 and near > mid > far and far < 0.7
  # The other rows keep the random initialisation.
  assert abs(np.std(emb[:10]) - 1.0) < 0.3 and not np.allclose(emb[42:], 0)


def test_sincos_loc_init_takes_the_vocabulary_layout():
  from pali.data import vocabulary
  vocab = vocabulary.get_vocabulary()
  cfg = dataclasses.replace(tiny_config(t5_kw=dict(vocab_size=vocab.vocab_size)),
                            loc_init="sincos")
  assert pali.build_model(cfg).config.first_loc_id == vocab.first_loc_id
  with pytest.raises(ValueError, match="first_loc_id"):
    dataclasses.replace(tiny_config(), loc_init="sincos", first_loc_id=40)  # 40 + 1024 > 50
  with pytest.raises(ValueError, match="loc_init"):
    dataclasses.replace(tiny_config(), loc_init="learned")


def test_palix_55b_builds_abstractly_with_valid_shardings():
  gin.parse_config_file(os.path.join(GIN_DIR, "palix_55b.gin"))
  model = pali.build_model()
  assert model.config.vit.parallel_block and model.config.vit.qk_norm
  assert model.config.t5.scan and model.config.t5.dtype == "bfloat16"
  batch = pali.dummy_batch(1, 224, 1, 8, 8)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))
  total = pali.count_params(shapes["params"])
  assert 50e9 <= total <= 60e9, total
  leaves = _check_partitioned(shapes["params"])
  assert all(l.names[0] == "layers" for p, l in leaves
             if jax.tree_util.keystr(p).startswith(("['vit']['layers']", "['encoder']['layers']")))
  partitioning = pytest.importorskip("pali.partitioning")
  rules = partitioning.logical_axis_rules()
  specs = nn.get_partition_spec(shapes["params"])
  mesh_sizes = {"data": 1, "fsdp": 4, "tensor": 2}
  for (path, leaf), spec in zip(leaves, jax.tree.leaves(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
    mesh_spec = nn.logical_to_mesh_axes(leaf.names, rules)
    for dim, axes in zip(leaf.value.shape, mesh_spec):
      axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
      size = int(np.prod([mesh_sizes[a] for a in axes]))
      assert dim % size == 0, (jax.tree_util.keystr(path), leaf.value.shape, mesh_spec)


def test_sharded_forward_equals_single_device():
  partitioning = pytest.importorskip("pali.partitioning")
  model = pali.build_model(tiny_config(vit_kw=dict(scan=True), t5_kw=dict(scan=True)))
  batch = random_batch(7, batch=4)
  params = init(model, batch)
  ref = model.apply({"params": params}, batch)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"),
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = partitioning.logical_axis_rules()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))["params"]
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    sharded = jax.device_put(params, nn.meta.unbox(shardings))
    kernel = sharded["decoder"]["layers"]["mlp"]["wi_0"]["kernel"]
    assert kernel.sharding.spec == nn.logical_to_mesh_axes(("layers", "embed", "mlp"), rules)
    out = jax.jit(lambda p, b: model.apply({"params": p}, b))(sharded, batch)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=ATOL)


@pytest.mark.parametrize("name", ["pali_tiny", "pali_small", "pali_base", "pali_large", "pali_xl"])
def test_gin_model_files_build(name):
  gin.parse_config_files_and_bindings([os.path.join(GIN_DIR, f"{name}.gin")], [])
  model = pali.build_model()
  size = model.config.vit.patch_size * model.config.vit.posemb_grid
  batch = pali.dummy_batch(1, size, 2, 8, 8)
  shapes = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), batch), batch))
  assert shapes.shape == (1, 8, model.config.t5.vocab_size) and shapes.dtype == jnp.float32


@pytest.mark.parametrize("vit_kw", [
    dict(parallel_block=True, qk_norm=True, use_bias=False, posemb="sincos2d"),
    dict(stem="conv", dropout_rate=0.1, scan=True, remat_policy="dots"),
])
def test_vit_variants_run_and_train(vit_kw):
  model = vit.ViT(tiny_config(vit_kw=vit_kw).vit)
  images = jax.random.uniform(jax.random.key(6), (2, 16, 16, 3), minval=-1, maxval=1)
  params = nn.meta.unbox(model.init(jax.random.key(0), images)["params"])

  def loss(p):
    out = model.apply({"params": p}, images, train=True, rngs={"dropout": jax.random.key(1)})
    return jnp.mean(jnp.square(out[:, :, 0] - 1.0))

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(float(value))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  if vit_kw.get("qk_norm"):
    attn = params["layers_0"]["attention"]
    assert "query_norm" in attn and "bias" not in attn["query"]
    assert "norm" in params["layers_0"] and "mlp_norm" not in params["layers_0"]
  if vit_kw.get("scan"):
    assert params["layers"]["mlp"]["wi"]["kernel"].shape == (2, 32, 64)
    assert params["stem_conv_0"]["kernel"].shape == (3, 3, 3, 8)


def test_bfloat16_model_with_dropout_gives_float32_logits():
  cfg = tiny_config(vit_kw=dict(depth=1, dtype="bfloat16"),
                    t5_kw=dict(num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.1,
                               dtype="bfloat16"))
  model = pali.build_model(dataclasses.replace(cfg, dtype="bfloat16"))
  batch = random_batch(6)

  @jax.jit
  def init_and_apply():  # one compilation for both
    params = init(model, batch)
    return params, model.apply({"params": params}, batch, train=True,
                               rngs={"dropout": jax.random.key(1)})

  params, logits = init_and_apply()
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_relative_position_buckets_match_t5():
  rel = jnp.array([0, -1, 1, -7, -8, -200, 200])
  bi = layers.relative_position_bucket(rel, bidirectional=True)
  # Key before the query (negative offset) -> low half; after -> +16; far -> last bucket.
  np.testing.assert_array_equal(np.asarray(bi), [0, 1, 17, 7, 8, 15, 31])
  causal = layers.relative_position_bucket(rel, bidirectional=False)
  np.testing.assert_array_equal(np.asarray(causal), [0, 1, 0, 7, 8, 31, 0])


def test_relative_position_bias_is_the_table_at_each_bucket():
  # The bias is a one-hot product (its gradient a small matmul, not a scatter-add).
  relpos = layers.RelativePositionBiases(num_heads=3, num_buckets=32, max_distance=128)
  q, k = jnp.arange(5), jnp.arange(9)
  variables = nn.meta.unbox(relpos.init(jax.random.key(0), q, k, bidirectional=True))
  bias = relpos.apply(variables, q, k, bidirectional=True)
  table = np.asarray(variables["params"]["rel_embedding"])
  buckets = np.asarray(layers.relative_position_bucket(k[None, :] - q[:, None], True, 32, 128))
  assert bias.shape == (1, 3, 5, 9)
  np.testing.assert_array_equal(np.asarray(bias)[0], table[:, buckets])


def test_config_errors_name_the_value():
  with pytest.raises(ValueError, match="posemb"):
    vit.ViTConfig(posemb="sincos")
  with pytest.raises(ValueError, match="remat_policy"):
    m = pali.build_model(tiny_config(t5_kw=dict(remat_policy="some")))
    m.init(jax.random.key(0), random_batch(0))
