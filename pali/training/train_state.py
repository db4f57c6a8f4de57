"""The training state and its shardings, created directly in their shards.

`abstract_state` runs `init` under `jax.eval_shape` (no memory), reads the logical partitioning
of every parameter, derives the optimizer state's shardings from its parameters', and
`create_state` then runs one jit with those `out_shardings`, so no full copy ever lands on one
device.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pali import partitioning


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def unbox_abstract(tree):
  """Strips partitioning boxes without applying their sharding constraints (which only make
  sense on traced arrays, not on eval_shape results)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  return jax.tree_util.tree_map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x,
                                tree, is_leaf=is_box)


def _opt_leaf_spec(leaf, param_spec: P, param_shape) -> P:
  """A spec for an optimizer-state leaf that mirrors a parameter.

  Same shape -> the parameter's spec. Adafactor's factored moments drop the last or the
  second-to-last dimension: drop that entry from the spec. Anything else is replicated.
  """
  shape = tuple(getattr(leaf, "shape", ()))
  spec = tuple(param_spec) + (None,) * (len(param_shape) - len(tuple(param_spec)))
  if shape == tuple(param_shape):
    return P(*spec)
  if len(shape) == len(param_shape) - 1 and len(param_shape) >= 2:
    if shape == tuple(param_shape[:-1]):
      return P(*spec[:-1])
    if shape == tuple(param_shape[:-2]) + tuple(param_shape[-1:]):
      return P(*(spec[:-2] + spec[-1:]))
  return P()


def opt_state_specs(abstract_opt_state, param_specs, abstract_params):
  """PartitionSpecs for an optax state, leaf by leaf, from the parameters' specs.

  A state leaf belongs to the parameter whose dict-key path ends its own path (optax nests
  parameter-shaped trees such as `mu`, `nu`, `v_row` inside its state tuples, and multi_transform
  masks frozen parameters out); leaves that belong to no parameter (counts) are replicated.
  """
  flat_specs = {tuple(k.key for k in path): spec for path, spec in
                jax.tree_util.tree_flatten_with_path(
                    param_specs, is_leaf=lambda x: isinstance(x, P))[0]}
  flat_shapes = {tuple(k.key for k in path): tuple(x.shape) for path, x in
                 jax.tree_util.tree_flatten_with_path(abstract_params)[0]}

  def leaf_spec(path, leaf):
    keys = []
    for entry in reversed(path):
      if not isinstance(entry, jax.tree_util.DictKey):
        break
      keys.insert(0, entry.key)
    keys = tuple(keys)
    if keys in flat_specs:
      return _opt_leaf_spec(leaf, flat_specs[keys], flat_shapes[keys])
    return P()

  return jax.tree_util.tree_map_with_path(leaf_spec, abstract_opt_state)


def abstract_state(model: nn.Module, tx_fn: Callable[[Any], optax.GradientTransformation],
                   dummy_batch: dict, mesh: Mesh, rules=None, seed: int = 0):
  """Returns (tx, abstract TrainState with shardings, TrainState of NamedShardings)."""
  rules = rules or partitioning.logical_axis_rules()

  def init_params(rng):
    return model.init({"params": rng, "dropout": rng}, dummy_batch, train=False)["params"]

  boxed = jax.eval_shape(init_params, jax.random.key(seed))
  param_specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), rules)
  abstract_params = unbox_abstract(boxed)
  tx = tx_fn(abstract_params)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_specs = opt_state_specs(abstract_opt, param_specs, abstract_params)
  specs = TrainState(step=P(), params=param_specs, opt_state=opt_specs)
  shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                     is_leaf=lambda x: isinstance(x, P))
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=abstract_opt)
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  _check_divisible(abstract)
  return tx, abstract, shardings


def _check_divisible(abstract) -> None:
  """A dimension that its mesh axes do not divide would be padded silently: refuse it."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    sharding = leaf.sharding
    for dim, axes in zip(leaf.shape, tuple(sharding.spec)):
      if axes is None:
        continue
      axes = axes if isinstance(axes, tuple) else (axes,)
      size = int(np.prod([sharding.mesh.shape[a] for a in axes]))
      if dim % size:
        name = jax.tree_util.keystr(path)
        raise ValueError(
            f"Parameter {name} of shape {leaf.shape} cannot be sharded {sharding.spec} on mesh "
            f"{dict(sharding.mesh.shape)}: dimension {dim} is not divisible by {size}. Change "
            "the mesh sizes or map that logical axis to None in logical_axis_rules.overrides.")


def create_state(model: nn.Module, tx: optax.GradientTransformation, dummy_batch: dict,
                 shardings: TrainState, seed: int = 0) -> TrainState:
  """Initialises parameters and optimizer state directly in their shards."""

  def init(rng):
    params = model.init({"params": rng, "dropout": rng}, dummy_batch, train=False)["params"]
    params = nn.meta.unbox(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
