"""Model FLOP/s per device and model-FLOPs utilisation (MFU) for training logs and benchmarks.

MFU = (model FLOPs of a step from `pali.flops`) * steps/s / (devices * peak FLOP/s of one
device). Accelerator peaks are the vendors' dense bfloat16 figures (the usual MFU convention,
also for float32 runs). A CPU has no data-sheet figure that XLA reaches, so its peak is
measured once per process and dtype: the FLOP/s of a large jitted matmul in the run's
matmul dtype, shared by the process's devices.
"""
from __future__ import annotations

import functools
import time
import types
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pali import flops as flops_lib
from pali.training import xla_options

# Dense bfloat16 TFLOP/s per chip (vendor data sheets; sparsity figures are twice these).
PEAK_BF16_TFLOPS = (
    # (substring of jax's device_kind, lower-cased; first match wins)
    ("v6 lite", 918.0), ("v6e", 918.0),
    ("v5 lite", 197.0), ("v5e", 197.0),
    ("v5p", 459.0), ("v5", 459.0),
    ("v4", 275.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0), ("h100", 989.0),
    ("a100", 312.0),
)

MATMUL_DTYPES = ("float32", "bfloat16", "mixed")  # mixed: bf16 operands, float32 accumulation


def accelerator_peak_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of one accelerator chip, or None when unknown (e.g. CPU)."""
  kind = device_kind.lower()
  for key, tflops in PEAK_BF16_TFLOPS:
    if key in kind:
      return tflops * 1e12
  return None


def cpu_matmul_meter(matmul_dtype: str = "float32", n: int = 2048):
  """A function reps -> FLOP/s of a jitted n^3 matmul on the CPU (best of `reps`), compiled once.

  'float32': f32 x f32 -> f32; 'bfloat16': bf16 x bf16 -> bf16; 'mixed': bf16 x bf16 with
  float32 accumulation and output (what the mixed-precision matmuls of the model run). Calling
  it again re-measures: a benchmark can pair each timed step with the peak of that moment.
  The matmul compiles with the train step's XLA options for that dtype
  (`xla_options.train_step_compiler_options`), so it runs on the library the step's dots run on.
  """
  if matmul_dtype not in MATMUL_DTYPES:
    raise ValueError(f"matmul_dtype={matmul_dtype!r}: use one of {MATMUL_DTYPES}.")
  in_dtype = jnp.float32 if matmul_dtype == "float32" else jnp.bfloat16
  out_dtype = jnp.float32 if matmul_dtype == "mixed" else in_dtype
  device = jax.local_devices(backend="cpu")[0]
  # A one-device mesh of its own: the caller may be inside the training mesh's context.
  mesh = jax.sharding.Mesh(np.array([device]), ("x",))
  with jax.set_mesh(mesh):
    a = jax.device_put(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    a = a.astype(in_dtype)
    mm = xla_options.compile_lowered(
        jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=out_dtype)).lower(a, a),
        xla_options.train_step_compiler_options("float32" if matmul_dtype == "float32"
                                                else "mixed"))
    mm(a, a).block_until_ready()

  def measure(reps: int = 5) -> float:
    best = float("inf")
    with jax.set_mesh(mesh):  # not the caller's (training) mesh
      for _ in range(reps):
        t0 = time.perf_counter()
        mm(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best

  return measure


@functools.lru_cache(maxsize=None)
def measure_cpu_peak_flops(matmul_dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of a jitted n^3 matmul on the CPU (best of `reps`; `cpu_matmul_meter`), cached per
  process."""
  return cpu_matmul_meter(matmul_dtype, n)(reps)


def peak_flops_per_device(matmul_dtype: str = "float32", device=None) -> float:
  """The peak one device can reach: the data-sheet figure, or on CPU the measured matmul
  FLOP/s divided among the process's CPU devices (simulated devices share the cores)."""
  device = device or jax.local_devices()[0]
  peak = accelerator_peak_flops(device.device_kind)
  if peak is not None:
    return peak
  if device.platform != "cpu":
    raise ValueError(f"No peak FLOP/s known for device kind {device.device_kind!r}; add it to "
                     "pali.training.mfu.PEAK_BF16_TFLOPS.")
  return measure_cpu_peak_flops(matmul_dtype) / len(jax.local_devices(backend="cpu"))


def run_matmul_dtype(model_config) -> str:
  """'float32' or 'mixed': the dtype the model's matmuls run in (bfloat16 operands always
  accumulate in float32, pali/models/matmul.py)."""
  from pali.models import matmul
  if matmul.get_precision() == "mixed" or str(model_config.t5.dtype) != "float32":
    return "mixed"
  return "float32"


class MfuMeter:
  """Turns steps/s into `model_tflops_per_device` and `mfu` for a fixed model and batch."""

  def __init__(self, step_flops: float, num_devices: int, peak_per_device: float):
    self.step_flops = float(step_flops)
    self.num_devices = int(num_devices)
    self.peak_per_device = float(peak_per_device)

  @classmethod
  def for_run(cls, model_config, global_batch_shapes: Mapping[str, tuple], *, frozen=None,
              num_devices: int | None = None) -> "MfuMeter":
    """`global_batch_shapes`: feature name -> shape of the global batch; `frozen`: the
    trainer's frozen mask (a tree of bools) or None."""
    shapes = flops_lib.BatchShapes.from_batch(
        {k: types.SimpleNamespace(shape=tuple(v)) for k, v in global_batch_shapes.items()})
    step = flops_lib.train_step_flops(model_config, shapes,
                                      frozen_vit=flops_lib.vit_is_frozen(frozen))
    return cls(step, num_devices or jax.device_count(),
               peak_flops_per_device(run_matmul_dtype(model_config)))

  def metrics(self, steps_per_s: float) -> dict[str, float]:
    per_device = self.step_flops * steps_per_s / self.num_devices
    return {"model_tflops_per_device": per_device / 1e12,
            "mfu": per_device / self.peak_per_device}
