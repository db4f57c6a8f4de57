"""Mesh layout on (fake) TPU pod topologies, as t5x's partitioning tests do it.

The fake devices carry what JAX's topology helpers read: id, process_index, coords,
core_on_chip, slice_index, platform and device_kind. Nothing runs on them; only the order of the
device array that `pali.partitioning.create_mesh` builds is checked.
"""
import dataclasses
import itertools

import gin
import numpy as np
import pytest

from pali import partitioning


@dataclasses.dataclass(frozen=True)
class FakeTpuDevice:
  id: int
  process_index: int
  coords: tuple[int, int, int]
  core_on_chip: int = 0
  slice_index: int = 0
  platform: str = "tpu"
  device_kind: str = "TPU v4"


def tpu_v4_slice(dims, *, slice_index=0, first_id=0):
  """A v4 slice of dims=(x, y, z) chips, 4 chips per host, ids in JAX's x-fastest order."""
  devices = []
  for z, y, x in itertools.product(range(dims[2]), range(dims[1]), range(dims[0])):
    i = first_id + len(devices)
    devices.append(FakeTpuDevice(id=i, process_index=i // 4, coords=(x, y, z),
                                 slice_index=slice_index))
  return devices


def _attr(mesh, name):
  return np.vectorize(lambda d: getattr(d, name), otypes=[object])(mesh.devices)


def test_single_slice_v4_mesh_puts_tensor_axis_on_a_physical_ring():
  devices = tpu_v4_slice((4, 4, 4))  # v4-128: 64 chips
  mesh = partitioning.create_mesh(data=1, fsdp=16, tensor=4, devices=devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 16, "tensor": 4}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(64))
  coords = _attr(mesh, "coords")
  for f in range(16):
    ring = [coords[0, f, t] for t in range(4)]
    # The 4 tensor-parallel chips share two coordinates and fill the third: one ICI ring.
    varying = [axis for axis in range(3) if len({c[axis] for c in ring}) > 1]
    assert len(varying) == 1, ring
    assert sorted(c[varying[0]] for c in ring) == [0, 1, 2, 3], ring


@pytest.mark.parametrize("ici_data", [1, 2])
def test_two_slices_split_only_the_data_axis_over_dcn(ici_data):
  per_slice = (2, 2, 4)  # 16 chips per slice
  devices = (tpu_v4_slice(per_slice, slice_index=0)
             + tpu_v4_slice(per_slice, slice_index=1, first_id=16))
  mesh = partitioning.create_mesh(data=ici_data, fsdp=-1, tensor=2, dcn_data=2,
                                  devices=devices)
  fsdp = 16 // (ici_data * 2)
  assert dict(mesh.shape) == {"data": 2 * ici_data, "fsdp": fsdp, "tensor": 2}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(32))
  slices = _attr(mesh, "slice_index")
  for s in range(2):
    # Slice s owns one contiguous block of the data axis, and all of fsdp and tensor in it:
    # the ICI axes (fsdp, tensor) never cross the DCN.
    block = slices[s * ici_data:(s + 1) * ici_data]
    assert (block == s).all(), slices


def test_dcn_data_is_configured_from_gin():
  devices = (tpu_v4_slice((2, 2, 2), slice_index=0)
             + tpu_v4_slice((2, 2, 2), slice_index=1, first_id=8))
  gin.parse_config("""
      create_mesh.data = 1
      create_mesh.fsdp = 4
      create_mesh.tensor = 2
      create_mesh.dcn_data = 2
  """)
  mesh = partitioning.create_mesh(devices=devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 2}
  assert (_attr(mesh, "slice_index")[0] == 0).all()
  assert (_attr(mesh, "slice_index")[1] == 1).all()


def test_dcn_data_that_does_not_match_the_slices_is_refused():
  devices = (tpu_v4_slice((2, 2, 2), slice_index=0)
             + tpu_v4_slice((2, 2, 2), slice_index=1, first_id=8))
  with pytest.raises(ValueError):
    partitioning.create_mesh(data=1, fsdp=-1, tensor=2, dcn_data=4, devices=devices)


@dataclasses.dataclass(frozen=True)
class FakeGpuDevice:
  id: int
  process_index: int
  platform: str = "gpu"
  device_kind: str = "NVIDIA H100 80GB HBM3"


def test_hosts_without_slices_use_processes_as_dcn_granules():
  devices = [FakeGpuDevice(id=i, process_index=i // 8) for i in range(16)]  # 2 hosts x 8 GPUs
  mesh = partitioning.create_mesh(data=1, fsdp=4, tensor=2, dcn_data=2, devices=devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 2}
  hosts = _attr(mesh, "process_index")
  assert (hosts[0] == 0).all() and (hosts[1] == 1).all()
