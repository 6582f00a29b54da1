"""LM, DPO and reward-model steps end the same way (`apply_update`): the post-update (QK-clip)
gets the parameters the optimizer produced and the max attention logits of the loss's own
forward pass, which the metrics report."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kimi_jax.model import ModelConfig, apply_lm, init_params
from kimi_jax.training.dpo import dpo_step
from kimi_jax.training.reward_model import LM, VALUE_HEAD, init_value_head, rm_step
from kimi_jax.training.state import TrainState
from kimi_jax.training.steps import keep_params, lm_step

CFG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                  num_kv_heads=1, head_dim=8)
LR = 0.1
F32_TOL = 1e-5  # the same float32 ops in both paths; max-logit reductions may reorder sums


def batches(rng):
  tokens = rng.integers(1, CFG.vocab_size, (4, 9)).astype(np.int32)
  lm = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
        "loss_mask": np.ones((4, 8), np.float32)}
  dpo = {**lm, "ref_logp_sum": -np.full(4, 20.0, np.float32)}
  rm = {"tokens": tokens[:, :-1], "last_index": np.array([7, 5, 6, 7], np.int32),
        "labels": np.array([1.0, 0.0, 1.0, 0.0], np.float32)}
  return lm, dpo, rm


def scale_by_max_logit(params, max_logits_LxH):
  """A post-update whose effect shows both inputs: params times the largest attention logit."""
  return jax.tree.map(lambda x: x * max_logits_LxH.max(), params)


def state_of(params):
  tx = optax.sgd(LR)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    tx=tx)


STEPS = {"lm": lambda state, batch, post: lm_step(state, batch, CFG, post_update=post),
         "dpo": lambda state, batch, post: dpo_step(state, batch, CFG, 0.1, post_update=post),
         "rm": lambda state, batch, post: rm_step(state, batch, CFG, post_update=post)}


@pytest.mark.parametrize("kind", ["lm", "dpo", "rm"])
def test_every_step_hands_its_own_max_logits_to_the_post_update(kind):
  lm_params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))
  lm_batch, dpo_batch, rm_batch = batches(np.random.default_rng(0))
  batch = {"lm": lm_batch, "dpo": dpo_batch, "rm": rm_batch}[kind]
  params = lm_params if kind != "rm" else {
      LM: lm_params, VALUE_HEAD: init_value_head(CFG, jax.random.key(1))}
  step = jax.jit(STEPS[kind], static_argnums=2)
  plain, plain_metrics = step(state_of(params), batch, keep_params)
  clipped, metrics = step(state_of(params), batch, scale_by_max_logit)
  # The max logits are those of a forward pass of the pre-update LM on this batch's tokens.
  _, max_logits_LxH = jax.jit(apply_lm, static_argnums=0, static_argnames="return_max_logits")(
      CFG, lm_params, batch["tokens"], return_max_logits=True)
  top = float(max_logits_LxH.max())
  assert float(metrics["max_attention_logit"]) == pytest.approx(top, rel=F32_TOL)
  assert "max_logits" not in metrics and float(metrics["grad_norm"]) > 0
  # The post-update acts on the LM parameters after the optimizer step, and its result is kept.
  lm_of = (lambda p: p[LM]) if kind == "rm" else (lambda p: p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b * top, rtol=F32_TOL, atol=F32_TOL),
               lm_of(clipped.params), lm_of(plain.params))
  changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(lm_of(plain.params)),
                                                    jax.tree.leaves(lm_params))]
  assert any(changed)  # the optimizer moved the LM before the post-update saw it
  if kind == "rm":  # the value head is left to the optimizer alone
    np.testing.assert_array_equal(clipped.params[VALUE_HEAD]["kernel"],
                                  plain.params[VALUE_HEAD]["kernel"])
