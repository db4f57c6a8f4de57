"""Importers of foreign checkpoints into our parameter layout.

- `bigvision_vit.import_vit(path_or_arrays, config)`: big_vision ViT `.npz` (incl. the
  ViT-22B variant), returns the `vit` subtree.
- `t5x_checkpoint.import_t5x(checkpoint_dir, config)`: a T5X T5.1.1 / UL2 checkpoint (msgpack
  index + tensorstore zarr arrays), returns `token_embedder`, `encoder`, `decoder`.
- `hf_safetensors.import_hf_t5(path, config)` / `import_hf_vit(path, config)`: Hugging Face
  state dicts in safetensors.

Each returns an `Imported` (a nested dict of numpy arrays in OUR layout, plus the source keys
it did not use); `load_into(params, imported, prefix)` puts it into a full parameter tree.
Nothing is read with pickle.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import traverse_util


@dataclasses.dataclass
class Imported:
  params: dict  # nested dict of numpy arrays, our names and shapes
  unmapped: list[str] = dataclasses.field(default_factory=list)  # source keys not used

  def flat(self) -> dict[str, np.ndarray]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(self.params).items()}


class CheckpointImportError(ValueError):
  """A checkpoint that does not fit the target configuration."""


def unflatten(flat: Mapping[str, Any]) -> dict:
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def stack_or_number(layers: list[dict[str, np.ndarray]], scan: bool) -> dict[str, np.ndarray]:
  """Per-layer flat dicts -> `layers/...` stacked on axis 0 (scan) or `layers_i/...`."""
  out: dict[str, np.ndarray] = {}
  if scan:
    for key in layers[0]:
      out[f"layers/{key}"] = np.stack([layer[key] for layer in layers])
  else:
    for i, layer in enumerate(layers):
      out.update({f"layers_{i}/{k}": v for k, v in layer.items()})
  return out


class SourceDict:
  """A flat {key: array} checkpoint that remembers which keys were read."""

  def __init__(self, arrays: Mapping[str, Any], describe: str):
    self.arrays = dict(arrays)
    self.describe = describe
    self.used: set[str] = set()

  def __contains__(self, key: str) -> bool:
    return key in self.arrays

  def get(self, key: str, transform: Callable[[np.ndarray], np.ndarray] | None = None):
    if key not in self.arrays:
      near = sorted(k for k in self.arrays if k.rsplit("/", 1)[0] == key.rsplit("/", 1)[0])
      raise CheckpointImportError(f"{self.describe}: key {key!r} is missing (keys next to it: "
                         f"{near[:8]}). Is the target configuration the checkpoint's?")
    self.used.add(key)
    value = np.asarray(self.arrays[key])
    return transform(value) if transform else value

  def unmapped(self) -> list[str]:
    return sorted(set(self.arrays) - self.used)


def load_into(params, imported: Imported | Mapping, prefix: str = ""):
  """Returns a copy of `params` (nested dict) with the imported leaves put in at `prefix`.

  Every imported leaf must exist in `params` with the same shape (dtype is cast to the
  target's); a target that is a sharded jax.Array gets the new value with its sharding.
  """
  tree = imported.params if isinstance(imported, Imported) else imported
  new_flat = {tuple(k.split("/")) if isinstance(k, str) else k: v
              for k, v in traverse_util.flatten_dict(dict(tree)).items()}
  base = tuple(p for p in prefix.strip("/").split("/") if p)
  target = traverse_util.flatten_dict(_to_dict(params))
  missing = [("/".join(base + k)) for k in new_flat if base + k not in target]
  if missing:
    raise CheckpointImportError(f"Imported parameters have no place in the model: {missing[:10]}"
                       f"{' ...' if len(missing) > 10 else ''} (prefix {prefix!r}).")
  for key, value in new_flat.items():
    full = base + key
    old = target[full]
    value = np.asarray(value)
    if tuple(value.shape) != tuple(old.shape):
      raise CheckpointImportError(f"Imported {'/'.join(full)} has shape {value.shape}, the model "
                         f"expects {tuple(old.shape)}.")
    value = value.astype(old.dtype)
    sharding = getattr(old, "sharding", None)
    target[full] = jax.device_put(value, sharding) if isinstance(old, jax.Array) else value
  return traverse_util.unflatten_dict(target)


def _to_dict(tree):
  if hasattr(tree, "unfreeze"):
    return tree.unfreeze()
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree
