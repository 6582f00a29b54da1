"""Train state whose shardings come from the logical rules table.

The abstract state comes from `jax.eval_shape`; parameter shardings from the model's logical
axis names; optimizer-state leaves that mirror a parameter (Adam moments, Muon momentum, ...)
take that parameter's sharding, everything else (counts, scalars) is replicated. The real
state is then materialised directly in place by `jit(init, out_shardings=...)`.
"""
from typing import Any

import jax
import optax
from flax import struct
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kimi_jax.model import ModelConfig, init_params, param_logical_specs
from kimi_jax.optimizers.reset import reset_optimizer_state
from kimi_jax.sharding.rules import logical_shardings


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  def apply_gradients(self, grads) -> "TrainState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state)


def state_around(params, tx: optax.GradientTransformation) -> TrainState:
  """Step 0 with a fresh optimizer state for `params`."""
  return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                    opt_state=tx.init(params), tx=tx)


def create_train_state(config: ModelConfig, tx: optax.GradientTransformation, rng) -> TrainState:
  return state_around(init_params(config, rng), tx)


def _trailing_dict_keys(path) -> tuple:
  keys = []
  for entry in reversed(path):
    if not isinstance(entry, jax.tree_util.DictKey):
      break
    keys.append(entry.key)
  return tuple(reversed(keys))


def mirror_param_shardings(tree, params_abstract, params_shardings, mesh: Mesh):
  """Shardings for `tree` (e.g. an optimizer state): a leaf whose trailing dict path and shape
  match a parameter gets that parameter's sharding; any other leaf is replicated."""
  shapes = traverse_util.flatten_dict(params_abstract)
  shardings = traverse_util.flatten_dict(params_shardings)
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    key = _trailing_dict_keys(path)
    # Try every suffix so that wrappers adding dict levels above the params still match.
    for start in range(len(key)):
      sub = key[start:]
      if sub in shapes and shapes[sub].shape == getattr(leaf, "shape", None):
        return shardings[sub]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def train_state_shardings(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh):
  """(abstract state, NamedSharding tree) for `create_train_state(config, tx, rng)`."""
  abstract = jax.eval_shape(lambda: create_train_state(config, tx, jax.random.key(0)))
  params_shardings = logical_shardings(mesh, param_logical_specs(config))
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = TrainState(
      step=replicated, params=params_shardings,
      opt_state=mirror_param_shardings(abstract.opt_state, abstract.params, params_shardings, mesh),
      tx=tx)
  return abstract, shardings


def init_train_state(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rng):
  """Materialise a sharded TrainState on `mesh`. Returns (state, shardings)."""
  _, shardings = train_state_shardings(config, tx, mesh)
  state = jax.jit(lambda r: create_train_state(config, tx, r), out_shardings=shardings)(rng)
  return state, shardings


def train_state_from_params(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                            params):
  """A sharded TrainState around existing `params` (a checkpoint, a previous stage) with a
  fresh optimizer state. Returns (state, shardings)."""
  _, shardings = train_state_shardings(config, tx, mesh)
  params = jax.device_put(params, shardings.params)
  state = jax.jit(lambda p: state_around(p, tx), out_shardings=shardings)(params)
  return state, shardings


def reset_opt_state(state: TrainState) -> TrainState:
  """Fresh optimizer state (k1.5 resets it every iteration), placed like the old one."""
  return state.replace(opt_state=reset_optimizer_state(state.tx, state.params, state.opt_state))
