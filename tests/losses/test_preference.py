"""The DPO loss against closed forms in float64 numpy (the x64 fixture)."""
import jax
import numpy as np
import pytest

from kimi_jax.losses.preference import dpo_loss

pytestmark = pytest.mark.usefixtures("x64")

F64_TOL = 1e-12  # float64 round-off on means of a few terms
B = 6


def log_probs(seed):
  """Four [B] arrays of sequence log-prob sums: policy chosen/rejected, reference ditto."""
  rng = np.random.default_rng(seed)
  return tuple(-rng.uniform(5.0, 40.0, size=B) for _ in range(4))


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_loss_is_log2_when_policy_equals_reference(beta):
  chosen, rejected, _, _ = log_probs(0)
  loss, metrics = dpo_loss(chosen, rejected, chosen, rejected, beta)
  np.testing.assert_allclose(loss, np.log(2.0), rtol=0, atol=F64_TOL)
  for key in ("reward_margin", "chosen_reward", "rejected_reward", "accuracy"):
    assert float(metrics[key]) == 0.0, key


@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_loss_and_gradient_match_hand_computation(beta):
  pc, pr, rc, rr = log_probs(1)
  margin = (pc - rc) - (pr - rr)
  grads = jax.grad(lambda *x: dpo_loss(*x, beta)[0], argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
  loss, _ = dpo_loss(pc, pr, rc, rr, beta)
  np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-beta * margin))), rtol=F64_TOL)
  # d/dS_chosen -log sigmoid(beta m) / B = -beta sigmoid(-beta m) / B; S_rejected the opposite.
  expected_chosen = -beta * np_sigmoid(-beta * margin) / B
  np.testing.assert_allclose(grads[0], expected_chosen, rtol=F64_TOL)
  np.testing.assert_allclose(grads[1], -expected_chosen, rtol=F64_TOL)
  assert not np.any(grads[2]) and not np.any(grads[3])  # the reference is frozen


def test_metrics_are_implicit_rewards():
  beta = 0.2
  pc, pr, rc, rr = log_probs(2)
  pc = rc + np.array([1.0, -2.0, 3.0, 0.5, 0.0, 4.0])  # planted chosen log-ratios
  pr = rr + np.array([0.0, 1.0, 1.0, 0.5, 1.0, -1.0])  # margins: 1, -3, 2, 0, -1, 5
  _, metrics = dpo_loss(pc, pr, rc, rr, beta)
  np.testing.assert_allclose(metrics["chosen_reward"], beta * 6.5 / B, rtol=F64_TOL)
  np.testing.assert_allclose(metrics["rejected_reward"], beta * 2.5 / B, rtol=F64_TOL)
  np.testing.assert_allclose(metrics["reward_margin"], beta * 4.0 / B, rtol=F64_TOL)
  assert float(metrics["accuracy"]) == pytest.approx(3 / B)  # margin 0 is not a win

