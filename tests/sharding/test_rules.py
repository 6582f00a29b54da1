"""make_mesh: axis names, device order, the -1 axis, and errors naming the shape."""
import jax
import numpy as np
import pytest

from kimi_jax.sharding.rules import MESH_AXES, make_mesh


def axis_sizes(mesh):
  return {axis: mesh.shape[axis] for axis in MESH_AXES}


def test_explicit_sizes_take_the_first_devices_in_order():
  mesh = make_mesh(data=2, fsdp=1, tensor=2)
  assert mesh.axis_names == MESH_AXES == ("data", "fsdp", "sequence", "tensor")
  assert axis_sizes(mesh) == {"data": 2, "fsdp": 1, "sequence": 1, "tensor": 2}
  assert mesh.devices.ravel().tolist() == jax.devices()[:4]
  assert make_mesh(1, 1, 1).devices.ravel().tolist() == jax.devices()[:1]


@pytest.mark.parametrize("sizes,expected", [
    (dict(data=2, fsdp=-1, tensor=2), dict(data=2, fsdp=2, sequence=1, tensor=2)),
    (dict(data=-1, fsdp=1), dict(data=8, fsdp=1, sequence=1, tensor=1)),
    (dict(fsdp=1, tensor=-1), dict(data=1, fsdp=1, sequence=1, tensor=8)),
    (dict(fsdp=2, sequence=-1, tensor=2), dict(data=1, fsdp=2, sequence=2, tensor=2)),
])
def test_minus_one_takes_the_remaining_devices(sizes, expected):
  mesh = make_mesh(**sizes)
  assert axis_sizes(mesh) == expected
  np.testing.assert_array_equal(mesh.devices.ravel(), np.asarray(jax.devices()))


def test_given_devices_are_used():
  devices = jax.devices()[4:]
  mesh = make_mesh(1, -1, 2, devices=devices)
  assert mesh.devices.ravel().tolist() == devices and mesh.shape["fsdp"] == 2


@pytest.mark.parametrize("sizes,message", [
    (dict(data=-1, fsdp=-1), r"at most one axis may be -1"),
    (dict(data=3, fsdp=-1), r"8 devices not divisible by 3"),
    (dict(data=4, fsdp=4), r"needs 16 devices, have 8"),
])
def test_bad_shapes_are_named(sizes, message):
  with pytest.raises(ValueError, match=message):
    make_mesh(**sizes)
