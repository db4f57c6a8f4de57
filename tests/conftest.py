"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

assert jax.device_count() == 8, "conftest must run before JAX initialises its backend"


@pytest.fixture(autouse=True)
def _clear_gin():
  import gin
  gin.clear_config()
  yield
  gin.clear_config()
