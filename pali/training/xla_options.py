"""XLA compile options for the train step, chosen by backend and matmul dtype.

On x86 CPUs, float32 dots go to oneDNN (`xla_cpu_use_onednn` with XLA's "individual dot"
library fusion). XLA's default library, YNNPACK, runs a batched dot (attention's
[B, H, L, L] x [B, H, L, D] products) on one core. oneDNN runs them on both cores of the
2-core benchmark machine, ~2x faster, and its 2048^3 float32 matmul is 6-9% faster too. The
float32 pali_small step took 0.875x and 0.946x the time in two A/Bs (BENCHMARKS.md, "Training
step").

On every CPU, copy insertion uses region analysis (`xla_cpu_copy_insertion_use_region_analysis`).
Without it, XLA:CPU copies an input buffer that the step donates and updates in place whenever
it cannot prove that every reader of the old value runs before the writer of the new one: in
the pali_small train step, 391 copies (105 MB a step) of Adafactor's second moments, whose old
value the update's reductions read while the moment's new value is written over it. With it,
none; the optimizer half alone took 129 against 141 ms (BENCHMARKS.md, "Training step").

What stays as XLA chooses:
- bfloat16 dots (mixed precision). This XLA hands oneDNN no bf16 x bf16 -> f32 dot, and the
  option gave the mixed step nothing (0.968x and 1.035x in two A/Bs).
- The fused 'dot' library type (dots together with their elementwise neighbours). XLA's oneDNN
  graph fails to compile a fusion of two dots summed ("partition compile failed"), and the
  process then dies of SIGILL.
- Other programs (evaluation, decoding). Decoding's matrix-vector dots ran 6x slower on
  oneDNN.

An XLA without these options (another jaxlib, another CPU) gets a logged warning and the
default compile.

Two costs of XLA's oneDNN thunks (jaxlib 0.10.2):
- JAX's persistent compilation cache cannot store them ("ToProto is not implemented for thunk
  kind: onednn-fusion", a warning): a float32 train step compiles anew in every process.
- Destroying an executable just after its last run can abort the process: the thunk returns
  its oneDNN objects to a pool after the run's outputs are ready, and the destructor checks the
  pool is full (`object_pool.h: Check failed: available_.size() == num_created_`; seen 4 times
  in 12 runs of a 256^3 matmul compiled, run and dropped on a loaded machine).
  `compile_lowered` keeps the last `_KEEP_ALIVE` such executables referenced, so none is
  destroyed while its last run may still be returning them.
"""
from __future__ import annotations

import collections
import platform

import gin
import jax
from absl import logging

_KEEP_ALIVE = 16
_recent_onednn_executables: collections.deque = collections.deque(maxlen=_KEEP_ALIVE)

REGION_ANALYSIS_COPIES = {"xla_cpu_copy_insertion_use_region_analysis": True}
ONEDNN_DOTS = {"xla_cpu_use_onednn": True,
               "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@gin.configurable("train_xla_options")
def train_step_compiler_options(matmul_dtype: str, onednn_float32_dots: bool = True,
                                region_analysis_copies: bool = True) -> dict:
  """XLA options for a train step whose matmuls run in `matmul_dtype` ('float32' or 'mixed',
  `mfu.run_matmul_dtype`); {} where there is nothing to change."""
  if jax.default_backend() != "cpu":
    return {}
  options = dict(REGION_ANALYSIS_COPIES) if region_analysis_copies else {}
  if (onednn_float32_dots and matmul_dtype == "float32"
      and platform.machine().lower() in ("x86_64", "amd64")):
    options.update(ONEDNN_DOTS)
  return options


def compile_lowered(lowered, compiler_options: dict | None):
  """`lowered.compile(compiler_options=...)`, falling back to XLA's defaults (with a warning)
  where this XLA refuses the options."""
  if not compiler_options:
    return lowered.compile()
  try:
    compiled = lowered.compile(compiler_options=compiler_options)
  except jax.errors.JaxRuntimeError as e:
    logging.warning("XLA refused the compile options %s (%s); compiling with its defaults.",
                    compiler_options, str(e).splitlines()[0])
    return lowered.compile()
  if compiler_options.get("xla_cpu_use_onednn"):
    _recent_onednn_executables.append(compiled)  # see the module docstring
  return compiled
