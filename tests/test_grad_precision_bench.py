"""bench/grad_precision.py reads a mixture's batch and a training checkpoint's parameters."""
import flax.linen as nn
import gin
import jax
import numpy as np

from bench import grad_precision, train_step
from pali import checkpoints
from pali.models import pali as pali_model

ARGS = ["--config", "gin_configs/models/pali_tiny.gin", "--image_size", "32", "--batch", "2",
        "--input_len", "8", "--target_len", "8", "--modes", "mixed"]


def test_mixture_batch_has_the_benchmark_shapes_and_real_padding():
  args = grad_precision.parse_args(ARGS + ["--mixture", "pali_synthetic_pretrain"])
  batch = grad_precision._mixture_batch(args)
  assert batch["images"].shape == (2, 1, 32, 32, 3)
  assert batch["encoder_input_tokens"].shape == (2, 8)
  assert batch["decoder_target_tokens"].shape == (2, 8)
  # The pipeline's loss weights mark exactly the non-padding targets.
  np.testing.assert_array_equal(batch["decoder_loss_weights"] > 0,
                                batch["decoder_target_tokens"] > 0)
  args.mixture_batch = 1
  assert not np.array_equal(grad_precision._mixture_batch(args)["decoder_target_tokens"],
                            batch["decoder_target_tokens"])


def test_checkpoint_parameters_are_read_back_and_measured(tmp_path):
  args = grad_precision.parse_args(ARGS)
  rows = grad_precision.run(args)  # a fresh initialisation
  assert [r["mode"] for r in rows] == ["mixed"]
  assert 0 < rows[0]["rel_l2"] < 0.05

  # A checkpoint of other parameters (another seed's init), saved as the trainer saves its state.
  gin.clear_config()
  gin.parse_config_files_and_bindings([args.config], ["DTYPE = 'float32'"],
                                      finalize_config=False)
  model = pali_model.build_model_for_image_size(32)
  batch = train_step.random_batch(args, model.config.t5.vocab_size)
  init = lambda r: model.init(r, batch)["params"]  # noqa: E731
  params = nn.unbox(jax.jit(init)(jax.random.key(1)))
  saver = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), save_every=1,
                                   asynchronous=False)
  saver.save(7, {"step": np.int32(7), "params": params})
  saver.close()

  read = grad_precision._checkpoint_params(str(tmp_path), jax.eval_shape(init, jax.random.key(0)))
  jax.tree.map(np.testing.assert_array_equal, read, params)

  with_ckpt = grad_precision.run(grad_precision.parse_args(ARGS + ["--checkpoint", str(tmp_path)]))
  assert 0 < with_ckpt[0]["rel_l2"] < 0.05
  assert with_ckpt[0]["rel_l2"] != rows[0]["rel_l2"]  # other parameters, another gradient
