"""The train step's XLA options: oneDNN for float32 dots on x86 CPUs, XLA's defaults elsewhere."""
import platform

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
  assert xla_options.train_step_compiler_options("mixed") == {}
  expected = xla_options.ONEDNN_DOTS if X86 else {}
  assert xla_options.train_step_compiler_options("float32") == expected
  gin.parse_config("train_xla_options.onednn_float32_dots = False")
  assert xla_options.train_step_compiler_options("float32") == {}


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
