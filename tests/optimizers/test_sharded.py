"""Muon on a 2x4 (fsdp, tensor) mesh of fake CPU devices equals unsharded Muon; state reset."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kimi_jax.optimizers.muon import muon
from kimi_jax.optimizers.reset import reset_optimizer_state
from kimi_jax.sharding.rules import logical_to_spec
from tests.optimizers import trees

# Sharded matmuls sum partial products in another order: float32 round-off, which NS spreads
# over the whole matrix (~1e-6 of its largest entry).
SHARDED_RTOL, SHARDED_FLOOR = 1e-5, 1e-6


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))


@pytest.fixture(scope="module")
def shardings(mesh):
  return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_spec(spec)),
                      trees.logical_specs(), is_leaf=lambda x: isinstance(x, PartitionSpec))


def _steps(tx, params, grads_list, put):
  """Update trees of successive jitted steps on `put`-placed params and grads; final state."""
  update, params, out = jax.jit(tx.update), put(params), []
  state = tx.init(params)
  for grads in grads_list:
    updates, state = update(put(grads), state, params)
    out.append(updates)
  return out, state


def test_sharded_update_equals_unsharded(shardings):
  params = trees.model_params()
  assert any(s.spec != PartitionSpec() for s in jax.tree.leaves(shardings))
  grads_list = [trees.random_grads(params, seed) for seed in range(2)]
  tx = muon(0.02)
  sharded, state = _steps(tx, params, grads_list, lambda t: jax.device_put(t, shardings))
  single, _ = _steps(tx, params, grads_list, lambda t: jax.device_put(t, jax.devices()[0]))
  for mine, reference in zip(sharded, single):
    trees.assert_trees_close(mine, reference, SHARDED_RTOL, SHARDED_FLOOR)
  momentum = state.inner_states["muon"].inner_state[0].momentum
  q_kernel = momentum["layers_0"]["attn"]["q_proj"]["kernel"]
  assert q_kernel.sharding.is_equivalent_to(
      shardings["layers_0"]["attn"]["q_proj"]["kernel"], q_kernel.ndim)


def test_reset_gives_fresh_state_with_previous_placement_and_no_recompile(shardings):
  tx = muon(0.02)
  params = jax.device_put(trees.model_params(), shardings)
  traces = []

  @jax.jit
  def update(grads, state, params):
    traces.append(1)
    return tx.update(grads, state, params)

  state = tx.init(params)
  for seed in range(2):
    _, state = update(jax.device_put(trees.random_grads(params, seed), shardings), state, params)
  # The eager init state is placed differently from the step's output (count on one device,
  # P(None) vs P()): the second call retraced. From here on the placement must stay put.
  traces_before_reset = len(traces)
  fresh = reset_optimizer_state(tx, params, state)
  for new, old, init in zip(jax.tree.leaves(fresh), jax.tree.leaves(state),
                            jax.tree.leaves(tx.init(params))):
    assert new.sharding == old.sharding
    np.testing.assert_array_equal(new, init)
  update(jax.device_put(trees.random_grads(params, 2), shardings), fresh, params)
  assert len(traces) == traces_before_reset
