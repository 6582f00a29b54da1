"""The one logical-axis -> mesh-axis rules table, and helpers that apply it.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with sharded params),
`sequence` (context parallel: one sequence's activations split over devices, attention as a
ring), `tensor` (Megatron-style model parallel). Parameters and activations name logical axes;
this table alone decides where they live.
"""
import contextlib
import contextvars

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

LOGICAL_RULES = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("head_dim", None),
    ("patch", None),  # flattened image patch (C * T * P * P) entering the vision tower
    # activations
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

_ACTIVE_MESH = contextvars.ContextVar("kimi_jax_active_mesh", default=None)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, sequence: int = 1,
              devices=None) -> Mesh:
  """A (data, fsdp, sequence, tensor) mesh; one axis may be -1 to take the remaining devices.

  Without -1 the mesh takes the first data*fsdp*sequence*tensor devices (e.g. a 1-device run).
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  sizes = dict(data=data, fsdp=fsdp, sequence=sequence, tensor=tensor)
  shape = [sizes[axis] for axis in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {sizes}: at most one axis may be -1")
  if -1 not in shape:
    devices = devices[:int(np.prod(shape))]
  else:
    known = int(np.prod([s for s in shape if s != -1]))
    if devices.size % known:
      raise ValueError(f"mesh shape {sizes}: {devices.size} devices not divisible by {known}")
    shape[shape.index(-1)] = devices.size // known
  if int(np.prod(shape)) != devices.size:
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} "
                     f"devices, have {devices.size}")
  return Mesh(devices.reshape(shape), MESH_AXES)


def logical_to_spec(logical_axes) -> PartitionSpec:
  return nn.logical_to_mesh_axes(logical_axes, LOGICAL_RULES)


def logical_shardings(mesh: Mesh, logical_spec_tree):
  """Map a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return jax.tree.map(
      lambda spec: NamedSharding(mesh, logical_to_spec(spec)),
      logical_spec_tree,
      is_leaf=lambda x: isinstance(x, PartitionSpec))


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None):
  """While tracing inside this context, `constrain` pins activations to `mesh`."""
  token = _ACTIVE_MESH.set(mesh)
  try:
    yield
  finally:
    _ACTIVE_MESH.reset(token)


def active_mesh() -> Mesh | None:
  """The mesh set by the enclosing `activation_mesh`, or None."""
  return _ACTIVE_MESH.get()


def check_sequence_split(length: int) -> None:
  """Raise a ValueError naming mesh.sequence when the active mesh cannot split `length` evenly
  over its `sequence` axis."""
  mesh = _ACTIVE_MESH.get()
  ring = 1 if mesh is None else mesh.shape.get("sequence", 1)
  if length % ring:
    raise ValueError(f"sequence length {length} must be divisible by mesh.sequence={ring}")


def constrain(x: jax.Array, logical_axes: tuple) -> jax.Array:
  """Sharding constraint by logical names; identity when no mesh is active."""
  mesh = _ACTIVE_MESH.get()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes)))
