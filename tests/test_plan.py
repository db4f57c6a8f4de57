"""The planner's abstract figures against the real sharded state on 8 CPU devices, and the
PaLI-X 55B plans of the README."""
import math
import os
import subprocess
import sys

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import optax
import pytest

from pali import flops, partitioning, planning
from pali.models import pali as pali_model
from pali.training import optimizer, train_state
from tests import trainer_fixtures as fx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def _device0_bytes(tree) -> int:
  """Bytes that device 0 really holds for a tree of sharded arrays."""
  dev = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree_util.tree_leaves(tree)
             for s in x.addressable_shards if s.device == dev)


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_abstract_bytes_equal_what_a_real_sharded_state_holds(name):
  cfg = fx.tiny_config()
  model = pali_model.build_model(cfg)
  mesh = partitioning.create_mesh(**MESH)
  rules = partitioning.logical_axis_rules()
  dummy = pali_model.dummy_batch(8, fx.IMAGE_SIZE, 1, fx.INPUT_LEN, fx.TARGET_LEN)
  tx_fn = lambda p: optimizer.create_optimizer(  # noqa: E731
      p, name=name, schedule=optax.constant_schedule(1e-3))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, abstract, shardings = train_state.abstract_state(model, tx_fn, dummy, mesh, rules)
    # The trainer's state shapes and shardings, filled with zeros (a cheap compile).
    state = jax.jit(lambda: jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                                   abstract), out_shardings=shardings)()
  result = planning.plan(cfg, MESH, "tpu_v4", batch=8, image_size=fx.IMAGE_SIZE,
                         input_len=fx.INPUT_LEN, target_len=fx.TARGET_LEN, optimizer=name)
  assert result.problems == []
  assert result.params_bytes == _device0_bytes(state.params)
  assert result.optimizer_bytes == _device0_bytes(state.opt_state)
  assert result.num_params == pali_model.count_params(state.params)
  if name == "adamw":  # mu and nu, each like the parameters (+ scalar counts)
    assert abs(result.optimizer_bytes - 2 * result.params_bytes) < 64


def test_flops_step_time_and_activation_scaling():
  cfg = fx.tiny_config()
  kw = dict(image_size=fx.IMAGE_SIZE, input_len=fx.INPUT_LEN, target_len=fx.TARGET_LEN)
  small = planning.plan(cfg, MESH, "h100", batch=8, mfu=0.4, **kw)
  big = planning.plan(cfg, MESH, "h100", batch=16, mfu=0.4, **kw)
  expected = flops.train_step_flops(cfg, flops.BatchShapes(8, fx.IMAGE_SIZE, 1, fx.INPUT_LEN,
                                                           fx.TARGET_LEN))
  assert small.flops_per_step == expected
  assert math.isclose(small.step_seconds, expected / (8 * 989e12 * 0.4))
  assert small.per_device_batch == 2  # batch over data x fsdp
  assert math.isclose(big.activations_bytes, 2 * small.activations_bytes)
  assert small.activations_remat_bytes < small.activations_bytes
  assert small.params_bytes == big.params_bytes


def test_activation_estimate_by_hand_for_one_encoder_layer():
  """A text-only, 1-layer encoder/decoder in float32 on one device: the formula, by hand."""
  import dataclasses
  cfg = fx.tiny_config()
  t5 = dataclasses.replace(cfg.t5, num_encoder_layers=1, num_decoder_layers=0)
  vit = dataclasses.replace(cfg.vit, depth=0)
  cfg = dataclasses.replace(cfg, vit=vit, t5=t5)
  s, d, ff, h, v = 8, 32, 64, 2, 64
  enc = (2 * s * d * 4 + 3 * s * d * 4 + h * s * s * 8 + s * d * 4 + s * d * 4 + 4 * s * ff * 4)
  logits = 3 * 1 * v * 4
  inputs = 0 + s * d * 4 + 1 * d * 4
  got = planning.activation_bytes(cfg, per_device_examples=1, image_size=16, max_images=0,
                                  input_len=s, target_len=1, tensor=1, vocab_split=1,
                                  remat=False)
  assert got == enc + logits + inputs


def test_indivisible_mesh_is_reported():
  cfg = fx.tiny_config()
  result = planning.plan(cfg, {"data": 1, "fsdp": 1, "tensor": 3}, "tpu_v4", batch=8,
                         image_size=fx.IMAGE_SIZE, input_len=8, target_len=8)
  assert not result.fits
  assert any("not divisible" in p for p in result.problems)


def test_parse_mesh():
  assert planning.parse_mesh("data:64,fsdp:16,tensor:4") == {"data": 64, "fsdp": 16,
                                                            "tensor": 4}
  assert planning.parse_mesh("fsdp:8") == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(ValueError, match="axis:size"):
    planning.parse_mesh("model:4")


def _palix_55b():
  gin.parse_config_file(os.path.join(REPO, "gin_configs", "models", "palix_55b.gin"))
  return pali_model.build_model().config


def test_palix_55b_fits_tpu_v4_on_fsdp16_tensor4_but_not_on_8_chips():
  cfg = _palix_55b()
  kw = dict(batch=256, image_size=224, input_len=128, target_len=64)
  ok = planning.plan(cfg, {"data": 1, "fsdp": 16, "tensor": 4}, "tpu_v4", **kw)
  assert 54e9 < ok.num_params < 56e9
  # 55B float32 parameters over the 64 chips that hold distinct shards.
  assert math.isclose(ok.params_bytes, ok.num_params * 4 / 64, rel_tol=0.01)
  assert ok.remat and ok.fits, ok.report()
  too_few = planning.plan(cfg, {"data": 1, "fsdp": 8, "tensor": 1}, "tpu_v4", **kw)
  assert not too_few.fits


@pytest.mark.slow
def test_cli_prints_the_plan_and_exits_by_fit():
  cmd = [sys.executable, os.path.join(REPO, "launch", "plan.py"),
         "--gin_file=gin_configs/models/palix_55b.gin", "--device=tpu_v5p", "--batch=256",
         "--image_size=224", "--input_len=128", "--target_len=64"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  fits = subprocess.run(cmd + ["--mesh=data:1,fsdp:16,tensor:2"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert fits.returncode == 0, fits.stderr[-2000:]
  assert "FITS" in fits.stdout and "TPU v5p" in fits.stdout
  no = subprocess.run(cmd + ["--mesh=fsdp:4"], cwd=REPO, env=env, capture_output=True,
                      text=True, timeout=120)
  assert no.returncode == 1 and "DOES NOT FIT" in no.stdout
