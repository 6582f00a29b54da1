"""Sharded train state and the LM step: placement, equivalence to one device, learning."""
import dataclasses
import functools

import jax
import numpy as np
import optax
import pytest

from kimi_jax.model import ModelConfig, apply_lm
from kimi_jax.optimizers.qk_clip import qk_clip
from kimi_jax.sharding.rules import make_mesh
from kimi_jax.training.state import init_train_state, reset_opt_state
from kimi_jax.training.steps import jit_step, lm_step

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)


def batch(seed=0):
  toks = np.random.default_rng(seed).integers(0, CFG.vocab_size, (8, 12))
  return {"tokens": toks, "targets": np.roll(toks, -1, axis=1),
          "loss_mask": np.ones((8, 12), np.float32)}


def run(mesh, steps=4):
  state, shardings = init_train_state(CFG, optax.adamw(3e-3), mesh, jax.random.key(0))
  step = jit_step(lm_step, mesh, shardings, config=CFG)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch())
    losses.append(float(metrics["loss"]))
  return state, shardings, losses


@pytest.fixture(scope="module")
def sharded_run():
  return run(make_mesh(data=2, fsdp=2, tensor=2))


def test_optimizer_state_mirrors_param_shardings(sharded_run):
  state, _, _ = sharded_run
  kernel = state.params["layers_0"]["mlp"]["gate_proj"]["kernel"]
  adam = state.opt_state[0]
  assert adam.mu["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding == kernel.sharding
  assert adam.nu["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding == kernel.sharding
  assert adam.count.sharding.is_fully_replicated


def test_sharded_steps_equal_single_device(sharded_run):
  _, _, sharded_losses = sharded_run
  _, _, single_losses = run(make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  # float32 with different reduction orders across 8 shards: 1e-5 relative.
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  assert sharded_losses[-1] < sharded_losses[0] - 0.05  # it learns the fixed batch


def test_context_parallel_steps_equal_single_device(sharded_run):
  """The LM step with each sequence split over 4 devices (ring attention), batch over 2."""
  _, _, ring_losses = run(make_mesh(data=1, fsdp=2, tensor=1, sequence=4))
  _, _, sharded_losses = sharded_run
  np.testing.assert_allclose(ring_losses, sharded_losses, rtol=1e-5)


def test_reset_opt_state_zeroes_moments_and_keeps_placement(sharded_run):
  state, shardings, _ = sharded_run
  fresh = reset_opt_state(state)
  mu = fresh.opt_state[0].mu["layers_1"]["attn"]["q_proj"]["kernel"]
  assert not np.any(np.asarray(mu))
  assert int(fresh.opt_state[0].count) == 0
  assert mu.sharding == state.params["layers_1"]["attn"]["q_proj"]["kernel"].sharding


def test_lm_step_applies_qk_clip_from_its_own_forward():
  config = dataclasses.replace(CFG, num_layers=1)  # deeper layers see the clipped layer's output
  mesh = make_mesh(1, 1, 1)
  state, shardings = init_train_state(config, optax.sgd(0.0), mesh, jax.random.key(1))
  b = batch()
  max_logits = jax.jit(lambda params: apply_lm(config, params, b["tokens"],
                                               return_max_logits=True)[1])
  before_LxH = max_logits(state.params)
  tau = float(np.median(before_LxH))  # half the heads exceed it
  step = jit_step(lm_step, mesh, shardings, config=config,
                  post_update=functools.partial(qk_clip, tau=tau))
  state, metrics = step(state, b)
  after_LxH = max_logits(state.params)
  assert float(metrics["max_attention_logit"]) == pytest.approx(float(before_LxH.max()), rel=1e-5)
  over = np.asarray(before_LxH) > tau
  assert over.any() and (~over).any()
  # lr 0: only the clip changes params, so clipped heads land on tau, others are unchanged.
  np.testing.assert_allclose(np.asarray(after_LxH)[over], tau, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(after_LxH)[~over], np.asarray(before_LxH)[~over], rtol=1e-5)
