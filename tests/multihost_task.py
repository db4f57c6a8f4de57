"""Test-only configuration for the multi-process training test (tests/test_multihost.py).

Importing this module (`--module_import=tests.multihost_task`) registers a deterministic random
dataset function with gin, so the launcher trains the tiny fixture model without the data
pipeline. `gin_config(...)` is the whole configuration; the test writes it to a gin file for the
subprocesses and parses the same text in-process for the single-process reference run.
"""
from __future__ import annotations

import gin

from tests import trainer_fixtures as fx

# The global batch is the same whatever the number of hosts; host `shard_id` gets its rows.
gin.external_configurable(fx.random_dataset_fn, name="multihost_random_dataset")


def gin_config(model_dir: str, train_steps: int, *, checkpoint_every: int = 2) -> str:
  # One layer per stack keeps the compile short. No ViT biases: a key bias has an exactly zero
  # gradient (softmax ignores a shift shared by all keys), so Adafactor would turn its rounding
  # noise into lr-sized steps that differ with the reduction order of 1 vs 2 processes.
  vit = fx.tiny_config(depth=1, use_bias=False).vit
  t5 = fx.tiny_config().t5
  lines = [
      f"MODEL_DIR = '{model_dir}'",
      "MIXTURE = 'unused (dataset_fn is bound)'",
      "train.model_dir = %MODEL_DIR",
      "train.mixture = %MIXTURE",
      f"train.train_steps = {train_steps}",
      "train.batch_size = 8",
      f"train.task_feature_lengths = {{'inputs': {fx.INPUT_LEN}, 'targets': {fx.TARGET_LEN}}}",
      f"train.image_size = {fx.IMAGE_SIZE}",
      f"train.checkpoint_every = {checkpoint_every}",
      "train.log_every = 1",
      "train.dataset_fn = @multihost_random_dataset",
      "create_mesh.data = 2",
      "create_mesh.fsdp = 2",
      "create_mesh.tensor = 2",
      "create_optimizer.name = 'adafactor'",
      "learning_rate_schedule.warmup_steps = 2",
      "build_model.config = @PaliConfig()",
  ]
  for prefix, cfg in (("ViTConfig", vit), ("T5Config", t5)):
    for field in ("patch_size", "width", "depth", "mlp_dim", "num_heads", "posemb",
                  "posemb_grid", "use_bias") if prefix == "ViTConfig" else (
                      "vocab_size", "d_model", "num_heads", "head_dim", "d_ff",
                      "num_encoder_layers", "num_decoder_layers"):
      value = getattr(cfg, field)
      if field.startswith("num_") and field.endswith("layers"):
        value = 1
      lines.append(f"{prefix}.{field} = {value!r}")
  return "\n".join(lines) + "\n"
