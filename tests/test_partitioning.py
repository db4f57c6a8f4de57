"""Mesh construction and the logical-axis rules table."""
import gin
import jax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from pali import partitioning


def test_resolve_mesh_shape_fills_the_rest():
  assert partitioning.resolve_mesh_shape(1, -1, 1, 8) == (1, 8, 1)
  assert partitioning.resolve_mesh_shape(2, -1, 2, 8) == (2, 2, 2)


@pytest.mark.parametrize("sizes", [(3, -1, 1), (2, 2, 3), (-1, -1, 1), (0, 8, 1)])
def test_resolve_mesh_shape_rejects_bad_meshes(sizes):
  with pytest.raises(ValueError, match="Mesh"):
    partitioning.resolve_mesh_shape(*sizes, 8)


def test_create_mesh_auto_axes():
  mesh = partitioning.create_mesh(data=2, fsdp=2, tensor=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_default_rules_map_names_as_designed():
  rules = partitioning.logical_axis_rules()
  assert partitioning.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
  assert partitioning.logical_to_spec(("vocab", "embed"), rules) == P("tensor", "fsdp")
  assert partitioning.logical_to_spec(("batch", "length"), rules) == P(("data", "fsdp"), None)
  mesh = partitioning.create_mesh(data=2, fsdp=2, tensor=2)
  assert partitioning.data_parallel_size(mesh, rules) == 4


def test_rules_are_overridable_from_gin():
  gin.parse_config("logical_axis_rules.overrides = [('embed', None), ('batch', 'data')]")
  rules = partitioning.logical_axis_rules()
  assert partitioning.logical_to_spec(("embed", "mlp"), rules) == P(None, "tensor")
  assert partitioning.logical_to_spec(("batch",), rules) == P("data")


def test_override_with_unknown_mesh_axis_is_refused():
  with pytest.raises(ValueError, match="unknown mesh axis"):
    partitioning.logical_axis_rules(overrides=[("embed", "model")])


def test_host_batch_becomes_global_sharded_array():
  import numpy as np
  mesh = partitioning.create_mesh(data=2, fsdp=2, tensor=2)
  batch = {"x": np.arange(16 * 3, dtype=np.int32).reshape(16, 3)}
  out = partitioning.host_batch_to_global(batch, mesh)
  assert out["x"].shape == (16, 3)
  assert out["x"].sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
  assert len(out["x"].addressable_shards) == 8
  assert out["x"].addressable_shards[0].data.shape == (4, 3)
