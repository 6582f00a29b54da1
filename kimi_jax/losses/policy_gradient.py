"""Ablation losses with the argument conventions of `mirror_descent_loss`: REINFORCE with the
group-mean baseline, and GRPO (PPO-clip on group-normalised advantages).

Both return (loss, metrics) with the loss a mean over all B rows; metrics average over rows with
at least one counted token.
"""
import jax
import jax.numpy as jnp

from kimi_jax.losses import groups
from kimi_jax.losses.masking import loss_token_counts, mean_over_real_rows, sequence_logprob


def reinforce_loss(logp_BxT, rewards_B, mask_BxT, group_ids_B, length_normalize: bool = False):
  """mean_j[-(r_j - r_bar_j) S_j] with r_bar_j the group-mean reward (stop-gradient).

  `length_normalize` (static) divides S_j by its number of counted tokens.
  """
  seq_logp_B = sequence_logprob(logp_BxT, mask_BxT, length_normalize)
  advantage_B = rewards_B - jax.lax.stop_gradient(groups.group_mean(rewards_B, group_ids_B))
  loss = -(advantage_B * seq_logp_B).mean()
  metrics = {
      "loss": loss,
      "advantage_abs": mean_over_real_rows(jnp.abs(advantage_B), mask_BxT),
      "seq_logp": mean_over_real_rows(seq_logp_B, mask_BxT),
  }
  return loss, metrics


def group_normalized_advantages(rewards_B, group_ids_B, eps: float = 1e-6):
  """(r - group mean) / (group std + eps), std with ddof=0; 0 for a constant-reward group."""
  centered_B = rewards_B - groups.group_mean(rewards_B, group_ids_B)
  return centered_B / (groups.group_std(rewards_B, group_ids_B) + eps)


def grpo_loss(logp_BxT, old_logp_BxT, rewards_B, mask_BxT, group_ids_B, clip_eps: float,
              ref_logp_BxT=None, kl_coef: float = 0.0, advantage_eps: float = 1e-6):
  """GRPO: per token -min(rho A, clip(rho, 1 - eps, 1 + eps) A) with rho = pi / pi_old and A the
  sample's group-normalised advantage, plus kl_coef times the k3 estimate of KL(pi || pi_ref)
  per token, exp(ref - logp) - (ref - logp) - 1. Tokens are averaged within each sample, then
  samples are averaged (the GRPO paper's 1/G sum_i 1/|o_i| sum_t).

  Args:
    logp_BxT: per-token log-probs under the current params (differentiated).
    old_logp_BxT: per-token log-probs under the rollout policy (constant).
    ref_logp_BxT: per-token log-probs under the KL reference (constant); None drops the KL
      term, and then kl_coef must stay 0.
    clip_eps, kl_coef, advantage_eps: Python floats.
  """
  if ref_logp_BxT is None and kl_coef != 0.0:
    raise ValueError(f"kl_coef={kl_coef} needs ref_logp_BxT")
  counted_BxT = mask_BxT > 0
  advantage_B = jax.lax.stop_gradient(
      group_normalized_advantages(rewards_B, group_ids_B, advantage_eps))
  # Masked positions get log-ratio 0, so padding log-probs can never overflow exp().
  log_ratio_BxT = jnp.where(counted_BxT, logp_BxT - jax.lax.stop_gradient(old_logp_BxT), 0.0)
  ratio_BxT = jnp.exp(log_ratio_BxT)
  advantage_Bx1 = advantage_B[:, None]
  unclipped_BxT = ratio_BxT * advantage_Bx1
  clipped_BxT = jnp.clip(ratio_BxT, 1.0 - clip_eps, 1.0 + clip_eps) * advantage_Bx1
  token_loss_BxT = -jnp.minimum(unclipped_BxT, clipped_BxT)
  counts_B = loss_token_counts(mask_BxT)

  def per_sample_mean(values_BxT):
    return (values_BxT * mask_BxT).sum(axis=-1) / counts_B

  clip_active_BxT = (clipped_BxT < unclipped_BxT).astype(logp_BxT.dtype)
  metrics = {
      "clip_fraction": mean_over_real_rows(per_sample_mean(clip_active_BxT), mask_BxT),
      "ratio": mean_over_real_rows(per_sample_mean(ratio_BxT), mask_BxT),
      "advantage_abs": mean_over_real_rows(jnp.abs(advantage_B), mask_BxT),
  }
  if ref_logp_BxT is not None:
    ref_minus_logp_BxT = jnp.where(counted_BxT,
                                   jax.lax.stop_gradient(ref_logp_BxT) - logp_BxT, 0.0)
    kl_BxT = jnp.exp(ref_minus_logp_BxT) - ref_minus_logp_BxT - 1.0
    token_loss_BxT = token_loss_BxT + kl_coef * kl_BxT
    metrics["kl_ref"] = mean_over_real_rows(per_sample_mean(kl_BxT), mask_BxT)
  loss = per_sample_mean(token_loss_BxT).mean()
  metrics["loss"] = loss
  return loss, metrics
