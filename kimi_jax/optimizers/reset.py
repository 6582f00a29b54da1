"""Fresh optimizer state placed exactly like the previous one (k1.5 resets every iteration)."""
import jax
import optax


def reset_optimizer_state(tx: optax.GradientTransformation, params, previous_state):
  """`tx.init(params)`, built directly with the shardings of `previous_state`'s leaves.

  Keeping every leaf's sharding (moments follow their parameter, counts stay replicated)
  means the jitted train step sees the same input layout and does not recompile.
  """
  shardings = jax.tree.map(lambda leaf: leaf.sharding, previous_state)
  return jax.jit(tx.init, out_shardings=shardings)(params)
