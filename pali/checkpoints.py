"""Checkpoints of the training state (and the data position) with orbax.

A checkpoint is complete or absent: orbax writes into a temporary folder and renames it when the
save has finished; leftovers of a save that was killed are removed at the next start. Restores
always go through an abstract target carrying shardings, so a checkpoint written on one mesh
restores onto another (or onto one device).
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

_TMP_PATTERN = re.compile(r"\.orbax-checkpoint-tmp")


def absolute(path: str) -> str:
  """orbax needs absolute paths; remote ones (gs://...) are left as they are."""
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


def remove_partial_checkpoints(directory: str) -> list[str]:
  """Deletes folders left by a save that never finished; returns what was removed."""
  path = epath.Path(directory)
  removed = []
  if jax.process_index() != 0 or not path.exists():
    return removed
  for child in path.iterdir():
    if _TMP_PATTERN.search(child.name):
      logging.warning("Removing a partially written checkpoint: %s", child)
      shutil.rmtree(os.fspath(child), ignore_errors=True)
      removed.append(child.name)
  return removed


class Checkpointer:
  """Saves {state, data} every `save_every` steps, keeps the last `keep`, restores the latest."""

  def __init__(self, directory: str, *, save_every: int, keep: int = 3,
               asynchronous: bool = True):
    self.directory = absolute(directory)
    self.save_every = save_every
    remove_partial_checkpoints(self.directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=asynchronous,
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step: int, state: Any, data_state: dict | None = None) -> bool:
    saved = self._manager.save(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {})), force=True)
    if saved:
      logging.info("Saving checkpoint for step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    restored = self._manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore()))
    return restored.state, dict(restored.data or {})

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_params(directory: str, step: int | None, abstract_params: Any) -> Any:
  """Reads only the parameters of a training checkpoint (for evaluation and warm starts)."""
  manager = ocp.CheckpointManager(absolute(directory), item_names=("state", "data"))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {directory}.")
    abstract = {"params": abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=jax.tree_util.tree_map(
                lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                               dtype=a.dtype), abstract),
            partial_restore=True)))
    return restored.state["params"]
  finally:
    manager.close()
