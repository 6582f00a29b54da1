"""DPO training: pair-batch layout, the gradient through a tiny LM against a hand-derived form,
and a sharded run that opens a chosen-vs-rejected margin on its training pairs."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kimi_jax.sharding.processes import Processes
from kimi_jax.model import ModelConfig, apply_lm, init_params
from kimi_jax.sharding.rules import make_mesh
from kimi_jax.training.dpo import dpo_objective, pair_batch, run_dpo
from kimi_jax.training.state import init_train_state

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
BETA = 0.5
# float32 forward (and different XLA programs for the reference and the policy) against float64
# numpy from the same logits: agreement to ~1e-6 relative, 1e-5 leaves a margin.
F32_TOL = 1e-5
forward = jax.jit(apply_lm, static_argnums=0)


def random_pairs(num_pairs, seed):
  rng = np.random.default_rng(seed)
  ids = lambda n: rng.integers(1, CFG.vocab_size, n).tolist()
  return [(ids(rng.integers(2, 5)), ids(rng.integers(2, 7)), ids(rng.integers(2, 7)))
          for _ in range(num_pairs)]


def np_log_softmax(logits):
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_response_logp(params, batch):
  """Masked log-prob sums [2B] in float64 numpy from our model's logits."""
  logits = np.asarray(forward(CFG, params, batch["tokens"]), np.float64)
  logp = np.take_along_axis(np_log_softmax(logits), batch["targets"][..., None], axis=-1)[..., 0]
  return (logp * batch["loss_mask"]).sum(-1)


def test_pair_batch_puts_chosen_first_and_masks_responses():
  pairs = [([1, 2], [3, 4, 5], [6]), ([7], [8, 9], [10, 11, 12])]
  batch = pair_batch(pairs, seq_len=6, pad_id=0)
  np.testing.assert_array_equal(batch["tokens"], [[1, 2, 3, 4, 5, 0], [7, 8, 9, 0, 0, 0],
                                                  [1, 2, 6, 0, 0, 0], [7, 10, 11, 12, 0, 0]])
  np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0],
                                                     [0, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
  responses = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
  for row, response in enumerate(responses):
    assert batch["targets"][row][batch["loss_mask"][row] > 0].tolist() == response


def test_pair_batch_rejects_bad_pairs():
  with pytest.raises(ValueError, match=r"pair 1 \(rejected\).*seq_len\+1=5"):
    pair_batch([([1], [2], [3]), ([1, 2], [3], [4, 5, 6, 7])], seq_len=4, pad_id=0)
  with pytest.raises(ValueError, match=r"pair 0 \(chosen\).*non-empty"):
    pair_batch([([1], [], [3])], seq_len=4, pad_id=0)


def test_each_process_builds_its_rows_of_the_pair_batch():
  # 3 pairs -> 6 rows; process i of 3 builds rows 2i, 2i + 1 (process 1: chosen of pair 2,
  # rejected of pair 0). A bad pair fails on every process, not only on the one holding it.
  pairs = random_pairs(3, seed=5)
  whole = pair_batch(pairs, seq_len=12, pad_id=0)
  parts = [pair_batch(pairs, 12, 0, Processes(i, 3, None)) for i in range(3)]
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    assert parts[0][key].shape[0] == 2
  bad = pairs[:2] + [(pairs[2][0], pairs[2][1], [])]
  for i in range(3):
    with pytest.raises(ValueError, match=r"pair 2 \(rejected\).*non-empty"):
      pair_batch(bad, 12, 0, Processes(i, 3, None))


def test_lm_head_gradient_matches_hand_derivation():
  """logits = H W, so dL/dW = sum_rt h_rt (x) g_rt with g_rt = c_r mask_rt (onehot - softmax),
  c_r = -beta sigmoid(-beta m_b) / B for chosen rows and its negative for rejected ones."""
  params = init_params(CFG, jax.random.key(1))
  batch = pair_batch(random_pairs(3, seed=1), seq_len=10, pad_id=0)
  ref_sums = np_response_logp(params, batch) + np.random.default_rng(2).normal(size=6)
  batch["ref_logp_sum"] = ref_sums.astype(np.float32)
  grads, _ = jax.jit(jax.grad(dpo_objective, has_aux=True), static_argnums=(2, 3))(
      params, batch, CFG, BETA)

  d, v = CFG.hidden_size, CFG.vocab_size
  probe = jax.tree.map(lambda x: x, params)
  probe["lm_head"]["kernel"] = np.eye(d, v, dtype=np.float32)  # logits[..., :d] = H
  hidden = np.asarray(forward(CFG, probe, batch["tokens"]), np.float64)[..., :d]
  logits = np.asarray(forward(CFG, params, batch["tokens"]), np.float64)
  logp = np_log_softmax(logits)
  mask = batch["loss_mask"].astype(np.float64)
  sums = (np.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0] * mask).sum(-1)
  log_ratio = sums - ref_sums
  margin = log_ratio[:3] - log_ratio[3:]
  coef_b = -BETA / (1.0 + np.exp(BETA * margin)) / 3
  coef_r = np.concatenate([coef_b, -coef_b])
  onehot = np.eye(v)[batch["targets"]]
  g = coef_r[:, None, None] * mask[..., None] * (onehot - np.exp(logp))
  expected = np.einsum("rtd,rtv->dv", hidden, g)
  got = np.asarray(grads["lm_head"]["kernel"])
  np.testing.assert_allclose(got, expected, atol=F32_TOL * np.abs(expected).max(), rtol=0)


def test_chosen_nll_term_adds_the_chosen_token_nll():
  """objective(w) = objective(0) + w * (-sum S_chosen / chosen tokens), value and gradient."""
  params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(3))
  batch = pair_batch(random_pairs(3, seed=4), seq_len=10, pad_id=0)
  batch["ref_logp_sum"] = np_response_logp(params, batch).astype(np.float32)
  # One program for both weights: the weight is a traced argument, not a static one.
  value_and_grad = jax.jit(jax.value_and_grad(dpo_objective, has_aux=True),
                           static_argnums=(2, 3))
  (plain, _), plain_grads = value_and_grad(params, batch, CFG, BETA, 0.0)
  (mixed, metrics), mixed_grads = value_and_grad(params, batch, CFG, BETA, 0.7)
  sums = np_response_logp(params, batch)
  nll = -sums[:3].sum() / batch["loss_mask"][:3].sum()
  assert float(metrics["chosen_nll"]) == pytest.approx(nll, rel=F32_TOL)
  assert float(mixed) == pytest.approx(float(plain) + 0.7 * nll, rel=F32_TOL)

  def chosen_nll(p):  # the NLL term alone, written directly on the LM
    logits = apply_lm(CFG, p, batch["tokens"][:3])
    logp = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(logp, batch["targets"][:3, :, None], axis=-1)[..., 0]
    return -(picked * batch["loss_mask"][:3]).sum() / batch["loss_mask"][:3].sum()

  nll_grads = jax.jit(jax.grad(chosen_nll))(params)
  jax.tree.map(lambda m, p, n: np.testing.assert_allclose(
      m, p + 0.7 * n, atol=F32_TOL * max(np.abs(m).max(), 1e-3), rtol=0),
      mixed_grads, plain_grads, nll_grads)


class Recorder:
  def __init__(self):
    self.records = []

  def write(self, step, metrics):
    self.records.append((step, {k: float(x) for k, x in metrics.items()}))


@pytest.mark.slow
def test_dpo_run_opens_margin_on_training_pairs():
  mesh = make_mesh(2, 2, 2)
  state, shardings = init_train_state(CFG, optax.adam(1e-2), mesh, jax.random.key(0))
  batches = [pair_batch(random_pairs(4, seed=s), seq_len=10, pad_id=0) for s in (10, 11)]
  initial_params = jax.device_get(state.params)  # run_dpo donates the state
  recorder = Recorder()
  state, last = run_dpo(state, shardings, mesh, CFG, batches, BETA, num_steps=8, writer=recorder,
                        log_every=1)

  steps = [step for step, _ in recorder.records]
  assert steps == list(range(1, 9))
  first = recorder.records[0][1]
  # The first step sees policy == reference (its own initial params).
  assert first["dpo/loss"] == pytest.approx(math.log(2.0), abs=F32_TOL)
  assert abs(first["dpo/reward_margin"]) < F32_TOL
  final_params = jax.device_get(state.params)
  for batch in batches:
    ref = np_response_logp(initial_params, batch)
    log_ratio = np_response_logp(final_params, batch) - ref
    margin = BETA * (log_ratio[:4] - log_ratio[4:])
    assert np.all(margin > 1.0), margin  # every pair: loss below -log sigmoid(1) = 0.31
  assert float(last["accuracy"]) == 1.0
