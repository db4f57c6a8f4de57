"""`get_dataset`: a seqio task or mixture -> batches of the model's features.

    import tasks  # registers every task and mixture
    from pali.data import pipeline
    ds = pipeline.get_dataset("pali_synthetic_pretrain", split="train",
                              task_feature_lengths={"inputs": 64, "targets": 32},
                              batch_size=8, image_size=64, max_images=1,
                              shuffle=True, seed=0, shard_id=0, num_shards=1)
    for batch in ds.as_numpy_iterator(): ...

Batches (drop_remainder=True): images uint8 [B, N, S, S, 3], image_mask int32 [B, N],
encoder_input_tokens int32 [B, L_in], decoder_input_tokens int32 [B, L_out],
decoder_target_tokens int32 [B, L_out], decoder_loss_weights float32 [B, L_out].
With `shuffle=True` and a `seed`, two calls give identical batch sequences; with
`shuffle=False` the order is fixed. `shard_id` / `num_shards` select this host's shard.

`skip_counts()` returns how many examples the input pipeline skipped (bad input) so far, by
reason; see `pali.data.robust`.
"""
import importlib
from typing import Dict, Mapping, Optional

import seqio
import tensorflow as tf

from pali.data import feature_converter as fc_lib
from pali.data import images as images_lib
from pali.data import robust


def skip_counts() -> Dict[str, int]:
  """{reason: examples skipped or repaired so far} in this process (see pali.data.robust)."""
  return robust.skip_counts()


def _lookup(name: str):
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    pass
  try:  # tasks registers on import; a caller may have forgotten it
    importlib.import_module("tasks")
    return seqio.get_mixture_or_task(name)
  except (ImportError, ValueError):
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    raise ValueError(
        f"Unknown task or mixture {name!r}. Registered: {known}. Import the module that "
        "registers it first (e.g. `import tasks`, or --module_import=your_module).") from None


def get_dataset(mixture_or_task_name: str, *, split: str,
                task_feature_lengths: Mapping[str, int], batch_size: int, image_size: int,
                max_images: int = 1, shuffle: bool = True, seed: Optional[int] = None,
                shard_id: int = 0, num_shards: int = 1, num_epochs: Optional[int] = None,
                resize_method: Optional[str] = None, prefetch: bool = True) -> tf.data.Dataset:
  """Batches of a task or mixture with exactly the model's features (see module docstring).

  batch_size is per host (this shard). image_size / max_images: the stage's resolution and
  images per example (every task renders/resizes to it; text-only tasks carry zeros).
  resize_method: 'resize' (default) or 'pad' (keep aspect, pad to square).
  num_epochs=None repeats forever.
  """
  if set(task_feature_lengths) != {"inputs", "targets"}:
    raise ValueError(f"task_feature_lengths must have exactly 'inputs' and 'targets', got "
                     f"{dict(task_feature_lengths)}")
  for k, v in task_feature_lengths.items():
    if int(v) < 2:
      raise ValueError(f"task_feature_lengths[{k!r}]={v}: need at least 2 (a token and EOS)")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if not 0 <= shard_id < num_shards:
    raise ValueError(f"shard_id must be in [0, num_shards={num_shards}), got {shard_id}")
  if image_size <= 0 or max_images < 0:
    raise ValueError(f"image_size must be > 0 and max_images >= 0, got {image_size}, "
                     f"{max_images}")
  provider = _lookup(mixture_or_task_name)
  lengths = {k: int(v) for k, v in task_feature_lengths.items()}
  shard_info = seqio.ShardInfo(index=shard_id, num_shards=num_shards) if num_shards > 1 else None
  with images_lib.image_config(image_size, max_images, resize_method):
    kwargs = dict(sequence_length=lengths, split=split, use_cached=False, shuffle=shuffle,
                  seed=seed, shard_info=shard_info, num_epochs=num_epochs,
                  try_in_mem_cache=False)  # caching would freeze per-epoch randomness
    if isinstance(provider, seqio.Mixture):
      kwargs["copy_pretokenized"] = False
    ds = provider.get_dataset(**kwargs)
    ds = fc_lib.PaliFeatureConverter()(ds, lengths)
  ds = ds.batch(batch_size, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  if prefetch:
    ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds
