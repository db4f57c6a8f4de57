"""The resolution ladder on CPU: each stage warm-starts from the previous stage's checkpoint."""
import gin
import jax
import numpy as np
import pytest

from launch import fault_injection, run_stages
from pali.models import pali as pali_model
from pali.training import train_state

SIZES = (32, 48, 64, 80)
PATCH = 8


@pytest.mark.slow
def test_cpu_ladder(tmp_path):
  bindings = [f"RUN_ROOT = '{tmp_path}'"]
  results = [run_stages.run_stage_in_process(f, bindings=bindings)
             for f in run_stages.CPU_LADDER]
  assert [r.step for r in results] == [40, 6, 6, 6]

  fresh_loss = results[0].first_loss  # the freshly initialised model's first loss
  for prev, cur, size in zip(results, results[1:], SIZES[1:]):
    last = prev.last_metrics["loss"]
    assert last < fresh_loss - 1.0, (fresh_loss, last)
    # Close to where the previous stage stopped; far below a fresh initialisation.
    assert cur.first_loss < last + 0.3 * (fresh_loss - last), (size, fresh_loss, last,
                                                              cur.first_loss)

  for i, (result, size) in enumerate(zip(results, SIZES)):
    grid = size // PATCH
    posemb = result.state.params["vit"]["pos_embedding"]
    assert posemb.shape[0] == grid * grid  # the table was resampled to this stage's grid
    assert fault_injection.finished_checkpoints(str(tmp_path / f"stage{i + 1}_{size}")) == [
        result.step]

  # Image tokens grow as (size / patch)^2: encode one image at each stage's size.
  gin.parse_config_file("gin_configs/models/pali_tiny.gin")
  gin.bind_parameter("ViTConfig.posemb", "learn")
  for result, size in zip(results, SIZES):
    model = pali_model.build_model_for_image_size(size)
    batch = pali_model.dummy_batch(1, size, 1, 24, 24)
    batch["image_mask"][:] = 1
    encoded, mask = model.apply({"params": result.state.params}, batch["images"],
                                batch["image_mask"], batch["encoder_input_tokens"],
                                method=model.encode)
    assert encoded.shape[1] == (size // PATCH) ** 2 + 24

  # Stage 1 freezes the ViT: its parameters are still the initial ones, bit for bit.
  model = pali_model.build_model_for_image_size(SIZES[0])
  key = jax.random.key(0)
  init = jax.jit(lambda k: model.init({"params": k, "dropout": k},
                                      pali_model.dummy_batch(8, 32, 1, 24, 24))["params"])(key)
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         jax.device_get(train_state.unbox_abstract(init)["vit"]),
                         jax.device_get(results[0].state.params["vit"]))
