"""A tiny model and a deterministic random dataset for trainer tests (no data pipeline)."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from pali.models import pali as pali_model
from pali.models.t5 import T5Config
from pali.models.vit import ViTConfig

IMAGE_SIZE = 16
INPUT_LEN = 8
TARGET_LEN = 8
VOCAB = 64


def tiny_config(**vit_overrides) -> pali_model.PaliConfig:
  vit = dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=2, posemb="learn",
             posemb_grid=IMAGE_SIZE // 8)
  vit.update(vit_overrides)
  return pali_model.PaliConfig(
      vit=ViTConfig(**vit),
      t5=T5Config(vocab_size=VOCAB, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                  num_encoder_layers=2, num_decoder_layers=2))


def tiny_model(**vit_overrides):
  return pali_model.build_model(tiny_config(**vit_overrides))


def random_batch(batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  targets = rng.integers(3, VOCAB, (batch_size, TARGET_LEN)).astype(np.int32)
  targets[:, -2:] = 0  # some padding
  weights = (targets > 0).astype(np.float32)
  return {
      "images": rng.integers(0, 256, (batch_size, 1, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8),
      "image_mask": np.ones((batch_size, 1), np.int32),
      "encoder_input_tokens": rng.integers(3, VOCAB, (batch_size, INPUT_LEN)).astype(np.int32),
      "decoder_input_tokens": np.concatenate(
          [np.zeros((batch_size, 1), np.int32), targets[:, :-1]], axis=1),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": weights,
  }


def random_dataset_fn(mixture, *, split, task_feature_lengths, batch_size, image_size,
                      max_images, shuffle, seed, shard_id, num_shards, num_batches=64):
  """Deterministic batches; host `shard_id` gets its own rows of each global batch."""
  del mixture, split, task_feature_lengths, image_size, max_images, shuffle
  batches = [random_batch(batch_size * num_shards, seed=seed * 1000 + i) for i in range(num_batches)]
  rows = slice(shard_id * batch_size, (shard_id + 1) * batch_size)
  stacked = {k: np.stack([b[k][rows] for b in batches]) for k in batches[0]}
  return tf.data.Dataset.from_tensor_slices(stacked).repeat()
