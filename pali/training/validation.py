"""Checks of a training configuration that run before anything is compiled.

Each failure raises ConfigError with a message that names the value and the fix.
"""
from __future__ import annotations

import os
import tempfile

from etils import epath
from jax.sharding import Mesh

from pali import partitioning


class ConfigError(ValueError):
  pass


def check_writable(model_dir: str) -> None:
  path = epath.Path(model_dir)
  if str(path).startswith(("gs://", "s3://")):
    return  # remote stores: permissions are checked by the first write
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=os.fspath(path), prefix=".write-test-"):
      pass
  except OSError as e:
    raise ConfigError(f"MODEL_DIR={model_dir!r} is not writable ({e.strerror or e}). Point "
                      "--gin.MODEL_DIR at a directory you can write to.") from e


def check_registered(name: str) -> None:
  import seqio

  import tasks  # noqa: F401  (registers the project's tasks and mixtures)

  if name in seqio.MixtureRegistry.names() or name in seqio.TaskRegistry.names():
    return
  known = sorted(set(seqio.MixtureRegistry.names()) | set(seqio.TaskRegistry.names()))
  raise ConfigError(
      f"MIXTURE={name!r} is not a registered seqio Task or Mixture. Known: {', '.join(known)}. "
      "If it lives in your own module, pass --module_import=your.module.")


def check_vocab_fits(model_vocab_size: int) -> None:
  """Token ids at or above the model's vocabulary size would be clamped silently by the
  embedding lookup: refuse the run instead."""
  from pali.data import vocabulary

  needed = vocabulary.get_vocabulary().vocab_size
  if model_vocab_size < needed:
    raise ConfigError(
        f"VOCAB_SIZE={model_vocab_size} (T5Config.vocab_size) is smaller than the tokenizer's "
        f"{needed} ids (SentencePiece pieces + 1024 loc + 3 mode tokens + 100 sentinels). Set "
        f"VOCAB_SIZE to at least {needed} (a multiple of 128 is fastest).")


def validate_train_config(*, model_dir, mixture, batch_size, image_size, patch_size, mesh: Mesh,
                          rules, grad_accum_steps=1, on_nonfinite="stop", init_from=None,
                          check_mixture: bool = True, model_vocab_size: int | None = None
                          ) -> None:
  import jax

  if not model_dir:
    raise ConfigError("MODEL_DIR is not set: add --gin.MODEL_DIR=\"'/path/to/run'\".")
  if not mixture:
    raise ConfigError("MIXTURE is not set: add --gin.MIXTURE=\"'pali_synthetic_pretrain'\".")
  if image_size <= 0 or image_size % patch_size:
    raise ConfigError(
        f"IMAGE_SIZE={image_size} is not divisible by the ViT patch size {patch_size}. Use a "
        f"multiple of {patch_size}, e.g. {max(1, round(image_size / patch_size)) * patch_size}.")
  if grad_accum_steps < 1 or batch_size % grad_accum_steps:
    raise ConfigError(f"BATCH_SIZE={batch_size} is not divisible by grad_accum_steps="
                      f"{grad_accum_steps}; choose a divisor of the batch size.")
  dp = partitioning.data_parallel_size(mesh, rules)
  micro = batch_size // grad_accum_steps
  if micro % dp:
    raise ConfigError(
        f"BATCH_SIZE={batch_size} (microbatch {micro} with grad_accum_steps={grad_accum_steps}) "
        f"is not divisible by the data-parallel size {dp} of mesh {dict(mesh.shape)}. Use a "
        f"batch size that is a multiple of {dp * grad_accum_steps}, or change the mesh.")
  if batch_size % jax.process_count():
    raise ConfigError(f"BATCH_SIZE={batch_size} is not divisible by the {jax.process_count()} "
                      "processes (each host reads an equal share).")
  if on_nonfinite not in ("stop", "skip"):
    raise ConfigError(f"train.on_nonfinite={on_nonfinite!r}: use 'stop' or 'skip'.")
  if init_from and not epath.Path(init_from).exists():
    raise ConfigError(f"INIT_FROM={init_from!r} does not exist. Point it at the previous stage's "
                      "MODEL_DIR (or its checkpoints/ folder), or unset it to start fresh.")
  if check_mixture:
    check_registered(mixture)
    if model_vocab_size is not None:
      check_vocab_fits(model_vocab_size)
  check_writable(model_dir)
