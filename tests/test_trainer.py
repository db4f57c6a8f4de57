"""Sharded state, train-step equivalences, overfitting, freezing, checkpoint resume."""
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from pali import partitioning
from pali.models import pali as pali_model
from pali.training import optimizer, step as step_lib, train_state, trainer
from tests import trainer_fixtures as fx


def _setup(mesh, model, *, batch_size=8, frozen_patterns=(), lr=1e-2, name="adamw",
           grad_accum_steps=1, eps=1e-8):
  rules = partitioning.logical_axis_rules()
  dummy = pali_model.dummy_batch(batch_size // grad_accum_steps, fx.IMAGE_SIZE, 1,
                                 fx.INPUT_LEN, fx.TARGET_LEN)
  schedule = optax.constant_schedule(lr)
  tx_fn = lambda p: optimizer.create_optimizer(  # noqa: E731
      p, name=name, schedule=schedule, frozen_patterns=frozen_patterns, clip_grad_norm=1.0,
      eps=eps)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    tx, abstract, shardings = train_state.abstract_state(model, tx_fn, dummy, mesh, rules)
    state = train_state.create_state(model, tx, dummy, shardings)
    frozen = optimizer.frozen_mask(abstract.params, frozen_patterns) if frozen_patterns else None
    fn = step_lib.make_train_step(model, tx, schedule, frozen=frozen,
                                  grad_accum_steps=grad_accum_steps)
    batch_sh = {k: partitioning.batch_sharding(mesh, v.ndim, rules) for k, v in dummy.items()}
    jitted = jax.jit(fn, in_shardings=(shardings, batch_sh, partitioning.replicated(mesh)),
                     out_shardings=(shardings, partitioning.replicated(mesh)))

  def run(state, host_batch, n=1):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      metrics = []
      for _ in range(n):
        batch = partitioning.host_batch_to_global(host_batch, mesh, rules)
        state, m = jitted(state, batch, jax.random.key(1))
        metrics.append(jax.device_get(m))
    return state, metrics

  return state, run, tx


def test_named_kernels_are_sharded_as_the_rules_say():
  mesh = partitioning.create_mesh(data=2, fsdp=2, tensor=2)
  state, _, _ = _setup(mesh, fx.tiny_model())
  p = state.params
  wi = p["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert wi.sharding.spec == P("fsdp", "tensor")
  assert wi.addressable_shards[0].data.shape == (wi.shape[0] // 2, wi.shape[1] // 2)
  q = p["encoder"]["layers_0"]["attention"]["query"]["kernel"]
  assert q.sharding.spec == P("fsdp", "tensor", None)  # (embed, heads, kv)
  emb = p["token_embedder"]["embedding"]
  assert emb.sharding.spec == P("tensor", "fsdp")  # (vocab, embed)
  # Optimizer state mirrors its parameter's sharding.
  mu = state.opt_state[1][0].mu["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert mu.sharding.spec == P("fsdp", "tensor")


def test_one_step_on_one_and_eight_devices_agree():
  batch = fx.random_batch(8)
  results = []
  for mesh in (partitioning.create_mesh(devices=jax.devices()[:1]),
               partitioning.create_mesh(data=2, fsdp=2, tensor=2)):
    state, run, _ = _setup(mesh, fx.tiny_model(), eps=1e-3)
    state, metrics = run(state, batch, n=2)
    results.append((metrics, jax.device_get(state.params)))
  (m1, p1), (m8, p8) = results
  # Tolerance: float32 reductions run in another order on 8 devices. Loss: 1e-5 relative;
  # parameters (size ~0.1-1) after two steps: 1e-5 absolute. AdamW's eps is 1e-3 here: with
  # eps 1e-8 Adam divides a near-zero gradient by its own magnitude, turning rounding noise
  # into a full +-lr step (seen: 1 element of 2048 off by 2e-4).
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p1, p8)


def test_gradient_accumulation_matches_the_full_batch():
  mesh = partitioning.create_mesh(data=2, fsdp=2, tensor=2)
  batch = fx.random_batch(16)
  state, run, _ = _setup(mesh, fx.tiny_model(), batch_size=16, eps=1e-3)  # eps: see above
  full, mf = run(state, batch)
  state, run, _ = _setup(mesh, fx.tiny_model(), batch_size=16, grad_accum_steps=2, eps=1e-3)
  acc, ma = run(state, batch)
  np.testing.assert_allclose(mf[0]["loss"], ma[0]["loss"], rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                         jax.device_get(full.params), jax.device_get(acc.params))


def test_tiny_model_overfits_a_fixed_batch():
  mesh = partitioning.create_mesh(data=2, fsdp=4, tensor=1)
  state, run, _ = _setup(mesh, fx.tiny_model(), lr=3e-3)
  _, metrics = run(state, fx.random_batch(8), n=60)
  first, last = metrics[0]["loss"], metrics[-1]["loss"]
  assert last < first / 4, (first, last)  # stated factor: at least 4x lower after 60 steps


def test_frozen_parameters_are_bit_identical_and_hold_no_state():
  mesh = partitioning.create_mesh(data=2, fsdp=2, tensor=2)
  state0, run, _ = _setup(mesh, fx.tiny_model(), frozen_patterns=["^vit/"])
  vit0 = jax.device_get(state0.params["vit"])
  enc0 = jax.device_get(state0.params["encoder"])
  state, _ = run(state0, fx.random_batch(8), n=3)
  jax.tree_util.tree_map(np.testing.assert_array_equal, vit0, jax.device_get(state.params["vit"]))
  moved = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), enc0,
                                 jax.device_get(state.params["encoder"]))
  assert any(jax.tree_util.tree_leaves(moved))
  n_vit = sum(x.size for x in jax.tree_util.tree_leaves(vit0))
  n_all = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  n_opt = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state))
  assert n_opt <= 2 * (n_all - n_vit) + 16  # AdamW: mu and nu for trainable params only


def test_nonfinite_batch_leaves_the_state_unchanged():
  mesh = partitioning.create_mesh(data=2, fsdp=2, tensor=2)
  state0, run, _ = _setup(mesh, fx.tiny_model())
  before = jax.device_get(state0.params)
  bad = fx.random_batch(8)
  bad["decoder_loss_weights"][0, 0] = np.nan
  state, metrics = run(state0, bad)
  assert metrics[0]["nonfinite"] == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.device_get(state.params))


def _train(model_dir, steps, *, mesh_kw=None, checkpoint_every=2):
  import gin
  gin.clear_config()
  mesh_kw = mesh_kw or dict(data=2, fsdp=4, tensor=1)
  gin.bind_parameter("create_mesh.data", mesh_kw["data"])
  gin.bind_parameter("create_mesh.fsdp", mesh_kw["fsdp"])
  gin.bind_parameter("create_mesh.tensor", mesh_kw["tensor"])
  gin.bind_parameter("create_optimizer.name", "adafactor")
  gin.bind_parameter("learning_rate_schedule.warmup_steps", 2)
  return trainer.train(
      model_dir=str(model_dir), mixture="unused", train_steps=steps, batch_size=8,
      task_feature_lengths={"inputs": fx.INPUT_LEN, "targets": fx.TARGET_LEN},
      image_size=fx.IMAGE_SIZE, checkpoint_every=checkpoint_every, log_every=1,
      model=fx.tiny_model(), dataset_fn=fx.random_dataset_fn)


def test_resume_equals_an_uninterrupted_run(tmp_path):
  straight = _train(tmp_path / "a", 6)
  _train(tmp_path / "b", 3, checkpoint_every=3)  # stops (and saves) at step 3
  resumed = _train(tmp_path / "b", 6)
  assert resumed.step == 6
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(straight.state.params),
                         jax.device_get(resumed.state.params))
  assert (tmp_path / "a" / "train").exists()  # TensorBoard events


def test_restore_onto_a_different_mesh(tmp_path):
  first = _train(tmp_path / "run", 2, mesh_kw=dict(data=1, fsdp=8, tensor=1))
  saved = jax.device_get(first.state.params)
  mesh = partitioning.create_mesh(data=2, fsdp=2, tensor=2)
  rules = partitioning.logical_axis_rules()
  dummy = pali_model.dummy_batch(8, fx.IMAGE_SIZE, 1, fx.INPUT_LEN, fx.TARGET_LEN)
  import gin
  gin.bind_parameter("create_optimizer.name", "adafactor")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, abstract, _ = train_state.abstract_state(
        fx.tiny_model(), lambda p: optimizer.create_optimizer(p), dummy, mesh, rules)
  from pali import checkpoints
  ckpt = checkpoints.Checkpointer(str(tmp_path / "run" / "checkpoints"), save_every=1)
  state, data = ckpt.restore(2, abstract)
  ckpt.close()
  assert data == {"batches_consumed": 2}
  wi = state.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert wi.sharding.spec == P("fsdp", "tensor")
  jax.tree_util.tree_map(np.testing.assert_array_equal, saved, jax.device_get(state.params))


def test_relative_model_dir(tmp_path, monkeypatch):
  """`MODEL_DIR = 'runs/x'` (the quickstart's default) works: orbax needs absolute paths."""
  monkeypatch.chdir(tmp_path)
  result = _train("runs/relative", 2)
  assert result.step == 2
  assert (tmp_path / "runs" / "relative" / "checkpoints" / "2").is_dir()
