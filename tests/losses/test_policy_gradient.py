"""GRPO and REINFORCE against float64 numpy references."""
import jax
import numpy as np
import pytest

from kimi_jax.losses.mirror_descent import mirror_descent_loss
from kimi_jax.losses.policy_gradient import (group_normalized_advantages, grpo_loss,
                                             reinforce_loss)

pytestmark = pytest.mark.usefixtures("x64")

F64_TOL = 1e-10  # float64 round-off on sums of a few dozen terms
B, T = 8, 4
GROUP_IDS = np.array([0, 1, 0, 1, 2, 2, 0, 1])  # groups of 3, 3 and 2
REWARDS = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.3])  # group 2 is constant
MASK = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0],
                 [0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], np.float64)
CLIP_EPS = 0.2
ADV_EPS = 1e-6


@pytest.fixture
def logps():
  rng = np.random.default_rng(0)
  old = rng.normal(size=(B, T)) - 2.0
  logp = old + rng.uniform(-0.5, 0.5, size=(B, T))  # ratios in [0.61, 1.65]: both sides of clip
  ref = old + rng.normal(scale=0.3, size=(B, T))
  return logp, old, ref


def np_advantages():
  adv = np.zeros(B)
  for g in np.unique(GROUP_IDS):
    r = REWARDS[GROUP_IDS == g]
    adv[GROUP_IDS == g] = (r - r.mean()) / (r.std() + ADV_EPS)
  return adv


def test_advantages_are_normalised_within_each_group():
  adv = np.asarray(group_normalized_advantages(REWARDS, GROUP_IDS, ADV_EPS))
  np.testing.assert_allclose(adv, np_advantages(), atol=F64_TOL)
  np.testing.assert_array_equal(adv[GROUP_IDS == 2], 0.0)  # constant rewards: no signal


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_grpo_loss_and_gradient_match_numpy(logps, kl_coef):
  logp, old, ref = logps
  adv = np_advantages()[:, None]
  ratio = np.exp(logp - old)
  unclipped, clipped = ratio * adv, np.clip(ratio, 1 - CLIP_EPS, 1 + CLIP_EPS) * adv
  kl = np.exp(ref - logp) - (ref - logp) - 1
  n = MASK.sum(-1, keepdims=True)
  want_loss = np.mean((MASK * (-np.minimum(unclipped, clipped) + kl_coef * kl)).sum(-1) / n[:, 0])
  # The clipped branch is constant in logp: its tokens get only the KL gradient.
  clip_active = clipped < unclipped
  surrogate_grad = np.where(clip_active, 0.0, -adv * ratio)
  want_grad = MASK * (surrogate_grad + kl_coef * (1 - np.exp(ref - logp))) / n / B
  assert clip_active[MASK == 1].any() and (~clip_active)[MASK == 1].any()  # both regimes hit

  def loss_fn(lp):
    return grpo_loss(lp, old, REWARDS, MASK, GROUP_IDS, CLIP_EPS, ref_logp_BxT=ref,
                     kl_coef=kl_coef, advantage_eps=ADV_EPS)

  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(logp)
  np.testing.assert_allclose(loss, want_loss, atol=F64_TOL)
  np.testing.assert_allclose(grad, want_grad, atol=F64_TOL)
  np.testing.assert_allclose(metrics["clip_fraction"],
                             np.mean((MASK * clip_active).sum(-1) / n[:, 0]), atol=F64_TOL)
  np.testing.assert_allclose(metrics["kl_ref"], np.mean((MASK * kl).sum(-1) / n[:, 0]),
                             atol=F64_TOL)


def test_grpo_ignores_masked_positions_even_with_extreme_logprobs(logps):
  logp, old, _ = logps
  garbage_old = np.where(MASK == 1, old, -1e4)  # exp(logp - old) would overflow there
  loss_fn = lambda lp, o: grpo_loss(lp, o, REWARDS, MASK, GROUP_IDS, CLIP_EPS)[0]
  loss, grad = jax.value_and_grad(loss_fn)(logp, garbage_old)
  np.testing.assert_allclose(loss, loss_fn(logp, old), atol=F64_TOL)
  assert np.all(np.isfinite(grad)) and np.all(grad[MASK == 0] == 0.0)


def test_grpo_kl_coef_without_reference_is_rejected(logps):
  logp, old, _ = logps
  with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_logp_BxT"):
    grpo_loss(logp, old, REWARDS, MASK, GROUP_IDS, CLIP_EPS, kl_coef=0.1)


@pytest.mark.parametrize("length_normalize", [False, True])
def test_reinforce_gradient_is_mean_baselined_score(logps, length_normalize):
  logp, _, _ = logps
  r_bar = np.array([REWARDS[GROUP_IDS == g].mean() for g in GROUP_IDS])
  scale = MASK.sum(-1) if length_normalize else np.ones(B)
  want_grad = -MASK * ((REWARDS - r_bar) / scale)[:, None] / B
  grad = jax.grad(lambda lp: reinforce_loss(lp, REWARDS, MASK, GROUP_IDS,
                                            length_normalize=length_normalize)[0])(logp)
  np.testing.assert_allclose(grad, want_grad, atol=F64_TOL)


def test_reinforce_is_mirror_descent_without_tau(logps):
  logp, old, _ = logps
  reinforce, _ = reinforce_loss(logp, REWARDS, MASK, GROUP_IDS)
  mirror, _ = mirror_descent_loss(logp, old, REWARDS, MASK, GROUP_IDS, tau=0.0)
  np.testing.assert_allclose(reinforce, mirror, atol=F64_TOL)
