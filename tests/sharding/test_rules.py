"""make_mesh: axis names, device order, the -1 axis, and errors naming the shape."""
import jax
import numpy as np
import pytest

from kimi_jax.sharding.rules import MESH_AXES, make_mesh


def test_explicit_sizes_take_the_first_devices_in_order():
  mesh = make_mesh(data=2, fsdp=1, tensor=2)
  assert mesh.axis_names == MESH_AXES == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
  assert mesh.devices.ravel().tolist() == jax.devices()[:4]
  assert make_mesh(1, 1, 1).devices.ravel().tolist() == jax.devices()[:1]


@pytest.mark.parametrize("sizes,expected", [((2, -1, 2), (2, 2, 2)), ((-1, 1, 1), (8, 1, 1)),
                                            ((1, 1, -1), (1, 1, 8)), ((1, -1, 4), (1, 2, 4))])
def test_minus_one_takes_the_remaining_devices(sizes, expected):
  mesh = make_mesh(*sizes)
  assert tuple(mesh.shape[a] for a in MESH_AXES) == expected
  np.testing.assert_array_equal(mesh.devices.ravel(), np.asarray(jax.devices()))


def test_given_devices_are_used():
  devices = jax.devices()[4:]
  mesh = make_mesh(1, -1, 2, devices=devices)
  assert mesh.devices.ravel().tolist() == devices and mesh.shape["fsdp"] == 2


@pytest.mark.parametrize("sizes,message", [
    ((-1, -1, 1), r"at most one axis may be -1"),
    ((3, -1, 1), r"8 devices not divisible by 3"),
    ((4, 4, 1), r"needs 16 devices, have 8"),
])
def test_bad_shapes_are_named(sizes, message):
  with pytest.raises(ValueError, match=message):
    make_mesh(*sizes)
