"""Which checkpoints to evaluate, and the abstract parameters to restore them onto a mesh."""
from __future__ import annotations

import os
from typing import Mapping, Optional

import flax.linen as nn
import jax


def abstract_params(model: nn.Module, mesh, rules, *, image_size: int, max_images: int,
                    task_feature_lengths: Mapping[str, int]):
  """ShapeDtypeStructs (with their NamedShardings on `mesh`) of the model's parameters."""
  from pali.models import pali as pali_model
  from pali.training.train_state import unbox_abstract
  dummy = pali_model.dummy_batch(1, image_size, max_images, task_feature_lengths["inputs"],
                                 task_feature_lengths["targets"])
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda r: model.init({"params": r, "dropout": r}, dummy)["params"],
                           jax.random.key(0))
  specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), rules)
  return jax.tree_util.tree_map(
      lambda a, sp: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                         sharding=jax.sharding.NamedSharding(mesh, sp)),
      unbox_abstract(boxed), specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def resolve_checkpoint_path(path: str) -> tuple[str, Optional[int]]:
  """A run folder (with `checkpoints/`), a checkpoints folder, or one step folder
  -> (checkpoints folder, step or None)."""
  import tensorflow as tf
  path = os.fspath(path).rstrip("/")
  if tf.io.gfile.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  base = os.path.basename(path)
  if base.isdigit():
    return os.path.dirname(path), int(base)
  return path, None


def checkpoint_steps(directory: str) -> list[int]:
  """Finished checkpoints in `directory` (orbax renames a step folder when it is complete)."""
  import orbax.checkpoint as ocp
  import tensorflow as tf
  if not tf.io.gfile.isdir(directory):
    return []
  return sorted(int(s) for s in ocp.utils.checkpoint_steps(directory))


def model_dir_for(checkpoint_dir: str) -> str:
  """The run folder of `.../run/checkpoints` (else the checkpoint folder itself)."""
  checkpoint_dir = checkpoint_dir.rstrip("/")
  if os.path.basename(checkpoint_dir) == "checkpoints":
    return os.path.dirname(checkpoint_dir)
  return checkpoint_dir
