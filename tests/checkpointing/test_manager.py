"""RunCheckpointer: sharded state + JSON extras round trip, latest step, keep-N."""
import jax
import numpy as np
import optax

from kimi_jax.checkpointing.manager import RunCheckpointer
from kimi_jax.model import ModelConfig
from kimi_jax.sharding.rules import make_mesh
from kimi_jax.training.state import init_train_state, train_state_shardings

CFG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                  num_kv_heads=2, head_dim=8)


def test_round_trip_into_shardings_and_keep_n(tmp_path):
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  tx = optax.adamw(1e-3)
  state, shardings = init_train_state(CFG, tx, mesh, jax.random.key(3))
  ckpt = RunCheckpointer(str(tmp_path), max_to_keep=2)
  extra = {"iteration": 5, "sampler": {"table": [0.5, 0.25]}, "buffer": []}
  for step in (1, 2, 3):
    ckpt.save(step, {"params": state.params, "opt_state": state.opt_state}, {**extra, "iteration": step})
  ckpt.wait()
  assert ckpt.latest_step() == 3
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 3]

  abstract, _ = train_state_shardings(CFG, tx, mesh)
  target = {"params": abstract.params, "opt_state": abstract.opt_state}
  target_shardings = {"params": shardings.params, "opt_state": shardings.opt_state}
  restored, restored_extra = RunCheckpointer(str(tmp_path)).restore(3, target, target_shardings)
  assert restored_extra == {**extra, "iteration": 3}
  kernel = restored["params"]["layers_0"]["attn"]["q_proj"]["kernel"]
  assert kernel.sharding == state.params["layers_0"]["attn"]["q_proj"]["kernel"].sharding
  jax.tree.map(np.testing.assert_array_equal, restored["params"], state.params)
  ckpt.close()
