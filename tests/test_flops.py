"""pali.flops against XLA's own FLOP count of the compiled forward pass and train step."""
import jax
import numpy as np
import optax
import pytest

from pali import flops
from pali.models import pali as pali_model
from pali.models.t5 import T5Config
from pali.models.vit import ViTConfig
from pali.training import optimizer as optimizer_lib
from pali.training import step as step_lib
from pali.training.train_state import TrainState

SHAPES = flops.BatchShapes(batch=2, image_size=32, max_images=1, input_len=16, target_len=16)


def _config(stem="patch", stem_channels=()):
  # Big enough that matmuls dominate the elementwise work XLA also counts.
  return pali_model.PaliConfig(
      vit=ViTConfig(patch_size=8, width=128, depth=2, mlp_dim=512, num_heads=4, posemb="learn",
                    posemb_grid=4, stem=stem, stem_channels=stem_channels),
      t5=T5Config(vocab_size=512, d_model=128, num_heads=4, head_dim=32, d_ff=256,
                  num_encoder_layers=2, num_decoder_layers=2))


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def _setup(stem="patch", stem_channels=()):
  cfg = _config(stem, stem_channels)
  model = pali_model.build_model(cfg)
  batch = pali_model.dummy_batch(SHAPES.batch, SHAPES.image_size, SHAPES.max_images,
                                 SHAPES.input_len, SHAPES.target_len)
  # Abstract parameters: lowering and compiling need shapes only.
  params = jax.eval_shape(lambda r: model.init(r, batch)["params"], jax.random.key(0))
  return cfg, model, batch, params


@pytest.mark.parametrize("stem,stem_channels", [("patch", ()), ("conv", ()),
                                                ("conv", (32, 64, 128))])
def test_forward_flops_match_xla(stem, stem_channels):
  cfg, model, batch, params = _setup(stem, stem_channels)
  xla = _xla_flops(lambda p, b: model.apply({"params": p}, b), params, batch)
  ours = flops.forward_total(cfg, SHAPES)
  assert ours == pytest.approx(xla, rel=0.10), (ours, xla)


@pytest.mark.parametrize("frozen_vit", [False, True])
def test_train_step_flops_match_xla(frozen_vit):
  cfg, model, batch, params = _setup()
  frozen = optimizer_lib.frozen_mask(params, ["^vit/"]) if frozen_vit else None
  tx = optax.sgd(0.1)
  step = step_lib.make_train_step(model, tx, lambda s: 0.1, frozen=frozen)
  state = TrainState(step=jax.ShapeDtypeStruct((), np.int32), params=params,
                     opt_state=jax.eval_shape(tx.init, params))
  xla = _xla_flops(step, state, batch, jax.random.key(1))
  assert flops.vit_is_frozen(frozen) == frozen_vit
  ours = flops.train_step_flops(cfg, SHAPES, frozen_vit=frozen_vit)
  assert ours == pytest.approx(xla, rel=0.10), (ours, xla)
  if frozen_vit:  # the frozen ViT saves about 2/3 of its FLOPs
    assert ours < flops.train_step_flops(cfg, SHAPES) * 0.95


def test_breakdown_by_hand():
  """One hand-counted case: no images, 1 layer each, so every term can be written out."""
  cfg = pali_model.PaliConfig(
      vit=ViTConfig(), t5=T5Config(vocab_size=100, d_model=8, num_heads=2, head_dim=4, d_ff=16,
                                   num_encoder_layers=1, num_decoder_layers=1))
  shapes = flops.BatchShapes(batch=3, image_size=224, max_images=0, input_len=5, target_len=7)
  f = flops.forward_flops(cfg, shapes)
  s, t, d, inner, ff = 5, 7, 8, 8, 16
  enc = 2 * (4 * s * d * inner + 2 * s * s * inner + 3 * s * d * ff)
  dec = 2 * (4 * t * d * inner + 2 * t * t * inner + 2 * t * d * inner + 2 * s * d * inner
             + 2 * t * s * inner + 3 * t * d * ff)
  assert f["vit_layers"] == f["vit_stem"] == f["img_proj"] == 0
  assert f["encoder"] == 3 * enc and f["decoder"] == 3 * dec
  assert f["logits"] == 3 * 2 * t * d * 100
  assert flops.train_step_flops(cfg, shapes) == 3 * sum(f.values())
  # Batch shapes read off a batch dict.
  b = pali_model.dummy_batch(2, (32, 48), 3, 11, 13)
  assert flops.BatchShapes.from_batch(b) == flops.BatchShapes(2, (32, 48), 3, 11, 13)


def test_peaks_and_mfu_meter():
  from pali.training import mfu, trainer
  assert mfu.accelerator_peak_flops("TPU v5 lite") == 197e12
  assert mfu.accelerator_peak_flops("TPU v5p") == 459e12
  assert mfu.accelerator_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert mfu.accelerator_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
  assert mfu.accelerator_peak_flops("cpu") is None
  # CPU: measured once per process and dtype, shared by the 8 simulated devices.
  peak = mfu.measure_cpu_peak_flops("float32", n=256, reps=2)
  assert peak > 1e8 and mfu.measure_cpu_peak_flops("float32", n=256, reps=2) == peak
  cfg = _config()
  dummy = pali_model.dummy_batch(2, 32, 1, 16, 16)
  shapes = {k: v.shape for k, v in dummy.items()}
  meter = mfu.MfuMeter.for_run(cfg, shapes, num_devices=8)
  assert meter.step_flops == flops.train_step_flops(cfg, SHAPES)
  m = mfu.MfuMeter(4e12, num_devices=2, peak_per_device=1e12).metrics(steps_per_s=0.25)
  assert m == {"model_tflops_per_device": 0.5, "mfu": 0.5}
  # The trainer's log summary carries both keys.
  fetched = [(1, {"loss": 1.0, "learning_rate": 0.1, "nonfinite": 0})]
  summary = trainer._summarise(fetched, 0.25, 8, 100, mfu.MfuMeter(4e12, 2, 1e12))
  assert summary["mfu"] == 0.5 and summary["model_tflops_per_device"] == 0.5


def test_cpu_matmul_meter_measures_again_inside_another_mesh():
  # The trainer calls the meter inside its own (8-device) mesh context.
  from pali import partitioning
  from pali.training import mfu
  meter = mfu.cpu_matmul_meter("float32", n=128)
  with jax.set_mesh(partitioning.create_mesh()):
    assert meter(1) > 1e7 and meter(1) > 1e7
