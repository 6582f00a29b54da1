"""Policy losses as `(logp_BxT, batch) -> (loss, metrics)` callables, chosen by config.

Configuration is bound here, outside the jitted step, so `rl_grads` has no branches. Rows of a
batch whose loss mask is all zero are padding (whole empty groups that keep minibatch shapes
fixed); every loss adds nothing for them, and the mean over all rows is rescaled to a mean
over real rows.
"""
import functools

import jax.numpy as jnp

from kimi_jax.losses.mirror_descent import mirror_descent_loss
from kimi_jax.losses.policy_gradient import grpo_loss, reinforce_loss

LOSSES = ("mirror_descent", "grpo", "reinforce")


def _rescaled_to_real_rows(loss_fn):
  """`loss_fn` with its mean over all rows turned into a mean over rows with loss tokens."""
  def wrapped(logp_BxT, batch):
    loss, metrics = loss_fn(logp_BxT, batch)
    real_rows = (batch["loss_mask"].sum(axis=-1) > 0).sum()
    return loss * batch["loss_mask"].shape[0] / jnp.maximum(real_rows, 1), metrics
  return wrapped


def _mirror_descent(logp_BxT, batch, tau, baseline, length_normalize):
  return mirror_descent_loss(logp_BxT, batch["ref_logp"], batch["rewards"], batch["loss_mask"],
                             batch["group_ids"], tau, baseline=baseline,
                             length_normalize=length_normalize)


def _grpo(logp_BxT, batch, clip_eps):
  return grpo_loss(logp_BxT, batch["ref_logp"], batch["rewards"], batch["loss_mask"],
                   batch["group_ids"], clip_eps)


def _reinforce(logp_BxT, batch, length_normalize):
  return reinforce_loss(logp_BxT, batch["rewards"], batch["loss_mask"], batch["group_ids"],
                        length_normalize=length_normalize)


def make_policy_loss(rl_config):
  """The configured loss: `mirror_descent` (k1.5), `grpo` or `reinforce` (ablations)."""
  builders = {
      "mirror_descent": lambda: functools.partial(
          _mirror_descent, tau=rl_config.tau, baseline=rl_config.baseline,
          length_normalize=rl_config.length_normalize),
      "grpo": lambda: functools.partial(_grpo, clip_eps=rl_config.clip_eps),
      "reinforce": lambda: functools.partial(_reinforce,
                                             length_normalize=rl_config.length_normalize),
  }
  if rl_config.loss not in builders:
    raise ValueError(f"rl.loss={rl_config.loss!r}: expected one of {LOSSES}")
  return _rescaled_to_real_rows(builders[rl_config.loss]())
