"""make_policy_loss: rows that are padding (whole empty groups appended to fill a minibatch)
change neither the loss nor the gradient of the real rows, for every configured loss."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kimi_jax.training.rl_losses import LOSSES, make_policy_loss

F64_TOL = 1e-12  # float64 round-off; padding must not move anything beyond that
K, T = 3, 5  # samples per group, positions


def rl_config(loss: str, length_normalize: bool):
  return ml_collections.ConfigDict(dict(loss=loss, tau=0.3, baseline="mean",
                                        length_normalize=length_normalize, clip_eps=0.2))


def batch(num_groups: int, seed: int, padding_groups: int = 0):
  """Real groups with random log-probs, rewards and masks, then padding groups whose rows have
  random log-probs but an all-zero loss mask (an empty group the batch layout adds)."""
  rng, pad_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
  rows, pad_rows = num_groups * K, padding_groups * K
  mask = (rng.uniform(size=(rows, T)) < 0.8).astype(np.float64)
  mask[:, 0] = 1.0  # every real row has a loss token
  ref_logp = -rng.uniform(0.1, 3.0, size=(rows, T)) * mask
  logp = -rng.uniform(0.1, 3.0, size=(rows, T))
  rewards = rng.uniform(size=rows)
  mask = np.concatenate([mask, np.zeros((pad_rows, T))])
  ref_logp = np.concatenate([ref_logp, np.zeros((pad_rows, T))])
  logp = np.concatenate([logp, -pad_rng.uniform(0.1, 3.0, size=(pad_rows, T))])
  rewards = np.concatenate([rewards, np.zeros(pad_rows)])
  return jnp.asarray(logp), {
      "ref_logp": jnp.asarray(ref_logp),
      "rewards": jnp.asarray(rewards), "loss_mask": jnp.asarray(mask),
      "group_ids": jnp.asarray(np.repeat(np.arange(num_groups + padding_groups), K))}


@pytest.mark.parametrize("length_normalize", [False, True])
@pytest.mark.parametrize("loss", LOSSES)
def test_padding_rows_change_neither_loss_nor_gradient(loss, length_normalize, x64):
  policy_loss = make_policy_loss(rl_config(loss, length_normalize))
  value_and_grad = jax.value_and_grad(lambda lp, b: policy_loss(lp, b)[0])
  logp, real = batch(num_groups=2, seed=0)
  padded_logp, padded = batch(num_groups=2, seed=0, padding_groups=2)
  np.testing.assert_array_equal(padded_logp[:2 * K], logp)  # same real rows
  loss_real, grad_real = value_and_grad(logp, real)
  loss_padded, grad_padded = value_and_grad(padded_logp, padded)
  assert abs(float(loss_real)) > 1e-3  # a loss that is not trivially zero
  np.testing.assert_allclose(loss_padded, loss_real, rtol=F64_TOL, atol=F64_TOL)
  np.testing.assert_allclose(grad_padded[:2 * K], grad_real, rtol=F64_TOL, atol=F64_TOL)
  np.testing.assert_array_equal(grad_padded[2 * K:], 0.0)


def test_unknown_loss_is_named():
  with pytest.raises(ValueError, match="rl.loss='ppo'"):
    make_policy_loss(rl_config("ppo", False))
