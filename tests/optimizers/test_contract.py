"""The optax contract: convergence, dtypes, inject_hyperparams, MultiSteps, stable jit."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kimi_jax.optimizers.muon import muon
from tests.optimizers import trees

# The same maths compiled differently (loop vs unrolled NS, fused or not): float32 round-off,
# which NS spreads over the matrix (~1e-6 of its largest entry).
F32_RTOL, F32_FLOOR = 1e-5, 1e-6


def _train(loss_fn, params, tx, steps):
  """(initial loss, final loss) after `steps` jitted updates in one scan."""
  def step(carry, _):
    params, state = carry
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  run = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), None, length=steps)[0][0])
  return loss_fn(params), loss_fn(run(params))


def test_converges_on_quadratic():
  rng = np.random.default_rng(0)
  target = {"kernel": rng.normal(size=(8, 16)), "bias": rng.normal(size=16)}  # Muon, AdamW
  loss_fn = lambda p: 0.5 * sum(jnp.sum((p["proj"][k] - target[k]) ** 2) for k in target)
  params = {"proj": {"kernel": jnp.zeros((8, 16)), "bias": jnp.zeros(16)}}
  tx = muon(optax.cosine_decay_schedule(0.1, 300), weight_decay=0.0)
  initial, final = _train(loss_fn, params, tx, 300)
  assert final < 1e-6 * initial, (initial, final)


def test_converges_on_matrix_factorisation():
  rng = np.random.default_rng(1)
  target_16x16 = jnp.asarray(rng.normal(size=(16, 4)) @ rng.normal(size=(4, 16)) / 2, jnp.float32)
  params = {"u": {"kernel": jnp.asarray(0.1 * rng.normal(size=(16, 4)), jnp.float32)},
            "v": {"kernel": jnp.asarray(0.1 * rng.normal(size=(4, 16)), jnp.float32)}}
  loss_fn = lambda p: jnp.mean((p["u"]["kernel"] @ p["v"]["kernel"] - target_16x16) ** 2)
  tx = muon(optax.cosine_decay_schedule(0.1, 300), weight_decay=0.0)
  initial, final = _train(loss_fn, params, tx, 300)
  assert final < 1e-6 * initial, (initial, final)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_preserves_parameter_dtypes(dtype):
  params = trees.small_params(dtype)
  tx = muon(0.01)
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(trees.random_grads(params, 0), state, params)
  new_params = optax.apply_updates(params, updates)
  for tree in (updates, new_params):
    assert {leaf.dtype for leaf in jax.tree.leaves(tree)} == {jnp.dtype(dtype)}
  assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype, state)


def test_float32_momentum_for_bfloat16_params():
  params = trees.small_params(jnp.bfloat16)
  tx = muon(0.01, mu_dtype="float32")
  updates, state = jax.jit(tx.update)(trees.random_grads(params, 0), tx.init(params), params)
  momentum = state.inner_states["muon"].inner_state[0].momentum
  assert momentum["mlp"]["up_proj"]["kernel"].dtype == jnp.float32
  assert updates["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16


def test_inject_hyperparams_matches_and_learning_rate_is_live():
  params = trees.small_params()
  grads = [trees.random_grads(params, seed) for seed in range(2)]
  injected = optax.inject_hyperparams(muon)(learning_rate=0.02)
  plain = muon(0.02)
  update_i, update_p = jax.jit(injected.update), jax.jit(plain.update)
  state_i, state_p = injected.init(params), plain.init(params)
  for g in grads:
    u_i, state_i = update_i(g, state_i, params)
    u_p, state_p = update_p(g, state_p, params)
    trees.assert_trees_close(u_i, u_p, F32_RTOL, F32_FLOOR)
  # Same state and params, learning rate doubled: the update doubles (lr multiplies last).
  doubled = state_i._replace(hyperparams={**state_i.hyperparams, "learning_rate": 0.04})
  u_2, _ = update_i(grads[1], doubled, params)
  u_1, _ = update_i(grads[1], state_i, params)
  trees.assert_trees_close(u_2, jax.tree.map(lambda u: 2 * u, u_1), F32_RTOL, F32_FLOOR)


def test_multisteps_applies_muon_to_the_mean_gradient():
  params = trees.small_params()
  g1, g2 = trees.random_grads(params, 1), trees.random_grads(params, 2)
  accumulated = optax.MultiSteps(muon(0.02), every_k_schedule=2)
  update = jax.jit(accumulated.update)
  state = accumulated.init(params)
  first, state = update(g1, state, params)
  assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(first))
  second, _ = update(g2, state, params)
  single = muon(0.02)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  expected, _ = jax.jit(single.update)(mean, single.init(params), params)
  trees.assert_trees_close(second, expected, F32_RTOL, F32_FLOOR)


def test_second_call_does_not_recompile_and_state_is_stable():
  params = trees.small_params()
  tx = muon(0.02)
  traces = []

  @jax.jit
  def update(grads, state, params):
    traces.append(1)
    return tx.update(grads, state, params)

  state = initial = tx.init(params)
  for seed in range(3):
    _, state = update(trees.random_grads(params, seed), state, params)
  assert len(traces) == 1
  describe = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert jax.tree.structure(state) == jax.tree.structure(initial)
  assert describe(state) == describe(initial)
