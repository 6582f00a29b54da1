"""build_optimizer: every name is the optax / Muon transformation it names, clipping and the
schedule are the closed forms, and bad blocks name their key."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.rl_arith import optimizer
from kimi_jax.optimizers.muon import muon
from kimi_jax.optimizers.qk_clip import qk_clip
from kimi_jax.training.optim import build_optimizer, build_post_update, learning_rate
from kimi_jax.training.steps import keep_params

PARAMS = {"w": jnp.arange(12.0).reshape(3, 4) / 10, "b": jnp.ones(4)}
GRADS = [jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)) + 0.1 * i, PARAMS) for i in range(3)]
F32_TOL = 1e-6  # float32 updates of O(1) values, same operations in the same order


def run(tx, grads=GRADS):
  params, state = PARAMS, tx.init(PARAMS)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize("block,reference", [
    (optimizer("adamw", 1e-2, weight_decay=0.1, b2=0.95),
     optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.1)),
    (optimizer("sgd", 1e-2), optax.sgd(1e-2)),
    (optimizer("muon", 1e-2, weight_decay=0.1), muon(1e-2, weight_decay=0.1)),
])
def test_each_name_is_the_transformation_it_names(block, reference):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=F32_TOL, atol=F32_TOL),
               run(build_optimizer(block)), run(reference))


def test_grad_clip_rescales_to_the_global_norm_before_the_optimizer():
  clip = 0.5
  big = [jax.tree.map(lambda g: 10.0 * g, GRADS[0])]
  norm = float(optax.global_norm(big[0]))
  got = run(build_optimizer(optimizer("sgd", 1.0, grad_clip=clip)), big)
  want = jax.tree.map(lambda p, g: p - g * clip / norm, PARAMS, big[0])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=F32_TOL, atol=F32_TOL), got, want)


def test_schedule_warms_up_linearly_then_decays_to_the_fraction():
  block = optimizer("adamw", 2e-3, warmup_steps=10, decay_to=0.1)
  schedule = learning_rate(block, total_steps=110)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(60), schedule(110)],
                             [0.0, 1e-3, 2e-3, 2e-4 + 0.5 * 1.8e-3, 2e-4], rtol=1e-5)
  assert learning_rate(optimizer("sgd", 5e-3), None) == 5e-3  # constant: a plain float


def test_bad_blocks_name_their_key():
  with pytest.raises(ValueError, match=r"config.sft.optimizer.name='lion'"):
    build_optimizer(optimizer("lion", 1e-3), 10, key="sft.optimizer")
  with pytest.raises(ValueError, match=r"config.optimizer.warmup_steps=5.*constant learning rate"):
    build_optimizer(optimizer("adamw", 1e-3, warmup_steps=5))


def test_post_update_is_qk_clip_only_when_tau_is_set():
  assert build_post_update(optimizer("sgd", 1.0)) is keep_params
  post = build_post_update(optimizer("sgd", 1.0, qk_clip_tau=30.0))
  assert post.func is qk_clip and post.keywords == {"tau": 30.0}
