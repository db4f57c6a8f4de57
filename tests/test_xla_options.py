"""The train step's XLA options: copy insertion by region analysis on CPU, oneDNN for float32
dots on x86 CPUs, XLA's defaults elsewhere."""
import platform
import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging

from pali.training import xla_options

X86 = platform.machine().lower() in ("x86_64", "amd64")


def _batched_dot():
  a = jax.random.normal(jax.random.key(0), (6, 24, 40))
  b = jax.random.normal(jax.random.key(1), (6, 40, 16))
  return jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", a, b)).lower(a, b), (a, b)


def test_options_by_matmul_dtype_and_gin():
  region = xla_options.REGION_ANALYSIS_COPIES
  assert xla_options.train_step_compiler_options("mixed") == region
  expected = {**region, **xla_options.ONEDNN_DOTS} if X86 else region
  assert xla_options.train_step_compiler_options("float32") == expected
  gin.parse_config("train_xla_options.onednn_float32_dots = False")
  assert xla_options.train_step_compiler_options("float32") == region
  gin.parse_config("train_xla_options.region_analysis_copies = False")
  assert xla_options.train_step_compiler_options("mixed") == {}


def test_region_analysis_copies_less_of_the_donated_state_and_changes_no_value():
  from bench import train_step
  key = next(iter(xla_options.REGION_ANALYSIS_COPIES))
  states, copies = [], []
  for on in (False, True):
    args = train_step.parse_args(["--dtype", "mixed", "--config",
                                  "gin_configs/models/pali_tiny.gin", "--image_size", "32",
                                  "--input_len", "8", "--target_len", "8", "--batch", "8"])
    args.xla_options = {key: on}
    ns = train_step.compile_step(args)
    # Copies of the step's inputs (named %state... on one device, %param... when partitioned):
    # without region analysis XLA copies Adafactor's donated moments before updating them.
    copies.append(len(re.findall(r" copy\(%(?:state|param)", ns.compiled.as_text())))
    state, metrics = ns.compiled(ns.state, ns.batch, ns.rng)
    states.append(jax.device_get((state.params, state.opt_state, metrics["loss"])))
  assert copies[1] < copies[0]
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not X86, reason="oneDNN dots are chosen on x86 only")
def test_float32_dots_run_on_onednn_with_the_same_values():
  lowered, args = _batched_dot()
  ours = xla_options.compile_lowered(lowered, xla_options.train_step_compiler_options("float32"))
  assert "__onednn_fusion" in ours.as_text()
  default = lowered.compile()
  assert "__onednn_fusion" not in default.as_text()
  np.testing.assert_allclose(ours(*args), default(*args), rtol=1e-5, atol=1e-5)
  # Kept referenced: XLA may abort when such an executable is destroyed right after a run.
  assert any(c is ours for c in xla_options._recent_onednn_executables)


def test_refused_options_fall_back_to_the_defaults_with_a_warning(monkeypatch):
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
  lowered, args = _batched_dot()
  compiled = xla_options.compile_lowered(lowered, {"xla_cpu_no_such_option": True})
  np.testing.assert_allclose(compiled(*args), lowered.compile()(*args), rtol=1e-6)
  assert len(warnings) == 1 and "xla_cpu_no_such_option" in warnings[0]
