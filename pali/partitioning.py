"""The device mesh and the ONE table that maps logical axis names to mesh axes.

Mesh axes are `data`, `fsdp` and `tensor`. Parameters and activations name their dimensions
with logical axes (DESIGN.md); `logical_axis_rules()` maps them to mesh axes and is the only
place that does. Override it from gin with `logical_axis_rules.overrides = [...]`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
_DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # Activations.
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    # Parameters.
    ("embed", "fsdp"),
    ("vit_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("joined_kv", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("layers", None),
    ("patch", None),
    ("relpos_buckets", None),
    ("posemb_len", None),
)


@gin.configurable
def logical_axis_rules(overrides: Sequence[tuple[str, Any]] = ()) -> tuple[tuple[str, Any], ...]:
  """Returns the rules table; `overrides` entries replace rules of the same logical name."""
  overrides = [(name, tuple(m) if isinstance(m, list) else m) for name, m in overrides]
  names = {name for name, _ in overrides}
  for name, mesh_axes in overrides:
    for axis in (mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(
            f"logical_axis_rules override {name!r} -> {mesh_axes!r}: unknown mesh axis "
            f"{axis!r}; mesh axes are {MESH_AXES}.")
  return tuple(overrides) + tuple(r for r in _DEFAULT_RULES if r[0] not in names)


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Replaces one -1 with the rest of the devices; checks the product divides exactly."""
  sizes = [data, fsdp, tensor]
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"Mesh (data={data}, fsdp={fsdp}, tensor={tensor}): at most one axis may be "
                     "-1 ('the rest of the devices').")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"Mesh (data={data}, fsdp={fsdp}, tensor={tensor}): sizes must be positive "
                     "or -1.")
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(
          f"Mesh (data={data}, fsdp={fsdp}, tensor={tensor}) does not divide the {num_devices} "
          f"devices: the fixed axes multiply to {known}. Choose sizes whose product divides "
          f"{num_devices}.")
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"Mesh (data={data}, fsdp={fsdp}, tensor={tensor}) has {math.prod(sizes)} devices but "
        f"{num_devices} are available. Set the sizes so their product is {num_devices}, or use "
        "-1 for one axis.")
  return tuple(sizes)


@gin.configurable
def create_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, dcn_data: int = 1,
                devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh with Auto axis types.

  Device order comes from JAX's topology-aware helpers: `create_device_mesh` lays ICI axes out
  within a slice; with `dcn_data > 1` (multi-slice jobs) `create_hybrid_device_mesh` puts
  `dcn_data` slices along the data axis so that only data parallelism crosses the DCN.
  """
  from jax.experimental import mesh_utils

  devices = list(jax.devices() if devices is None else devices)
  if dcn_data > 1:
    if len(devices) % dcn_data:
      raise ValueError(f"dcn_data={dcn_data} does not divide the {len(devices)} devices.")
    per_slice = len(devices) // dcn_data
    ici = resolve_mesh_shape(data, fsdp, tensor, per_slice)
    # TPU devices name their slice; elsewhere (GPU hosts) each process is one DCN granule.
    device_array = mesh_utils.create_hybrid_device_mesh(
        ici, (dcn_data, 1, 1), devices=devices, allow_split_physical_axes=True,
        process_is_granule=not hasattr(devices[0], "slice_index"))
  else:
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    try:
      device_array = mesh_utils.create_device_mesh(
          shape, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
      # Device kinds without a topology model (or fakes): plain order.
      device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: Mesh, rules=None) -> int:
  """How many ways the batch dimension is split."""
  spec = logical_to_spec(("batch",), rules)
  axes = spec[0] if spec and spec[0] is not None else ()
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(logical_axes: Sequence[str | None], rules=None) -> P:
  return nn.logical_to_mesh_axes(logical_axes, rules or logical_axis_rules())


def logical_shardings(abstract_tree, mesh: Mesh, rules=None):
  """NamedShardings for a tree of (possibly nn.Partitioned-boxed) abstract values."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules or logical_axis_rules())


def batch_sharding(mesh: Mesh, ndim: int, rules=None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_batch_to_global(batch: dict[str, np.ndarray], mesh: Mesh, rules=None) -> dict[str, jax.Array]:
  """Turns this host's slice of the batch into global arrays sharded over the batch axes."""
  return {
      k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v), rules), v)
      for k, v in batch.items()
  }
