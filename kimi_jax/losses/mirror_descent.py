"""The k1.5 online mirror-descent policy loss (paper eq. 3).

With S_j the response log-prob of sample j under the current params, S_ref_j the same under
the params pi_theta_i of this iteration's rollouts (computed once, before any update) and b_j
its group's baseline (stop-gradient), the loss is

  mean_j [ -(r_j - b_j) S_j + (tau / 2) (S_j - S_ref_j)^2 ],

whose negative gradient is eq. 3, and which equals the gradient of the squared surrogate
mean_j (r_j - b_j - tau (S_j - S_ref_j))^2 divided by 2 tau. At theta = theta_i the tau term
has zero gradient; it acts through the later optimizer steps on the same data.

Baselines (static): "mean" = the group's mean reward r_bar (the paper's choice), "log_mean_exp"
= tau log(mean_j exp(r_j / tau)) over the group (the exact tau log Z estimator).

Length normalisation (static): S_j and S_ref_j are both divided by the sample's number of
counted tokens n_j = max(sum_t mask_jt, 1); rewards and baselines are not rescaled.

S_j - S_ref_j is summed token by token from the per-token log-probs under pi_theta_i: where
they equal the current ones bit for bit (the first step, when both come from the same
program), the difference is exactly 0 and so is the tau term's gradient. Subtracting two
separately rounded sums would leave ~1e-7 of noise that moves the policy.
"""
import jax
import jax.numpy as jnp

from kimi_jax.losses import groups
from kimi_jax.losses.masking import mean_over_real_rows, sequence_logprob

BASELINES = ("mean", "log_mean_exp")


def group_baseline(rewards_B: jax.Array, group_ids_B: jax.Array, tau, baseline: str) -> jax.Array:
  """The per-sample baseline b_B (an estimate of tau log Z for the sample's prompt)."""
  if baseline == "mean":
    return groups.group_mean(rewards_B, group_ids_B)
  if baseline == "log_mean_exp":
    return groups.group_log_mean_exp(rewards_B, group_ids_B, tau)
  raise ValueError(f"baseline={baseline!r}: expected one of {BASELINES}")


def mirror_descent_loss(logp_BxT, ref_logp_BxT, rewards_B, mask_BxT, group_ids_B, tau,
                        baseline: str = "mean", length_normalize: bool = False):
  """The k1.5 loss and its metrics.

  Args:
    logp_BxT: per-token log-probs of the targets under the current params (differentiated).
    ref_logp_BxT: per-token log-probs of the targets under pi_theta_i (a constant); summed
      under the mask they are S_ref.
    rewards_B: scalar reward per sample.
    mask_BxT: per-token loss mask, 1 on response tokens that count.
    group_ids_B: prompt group of each sample, integers in [0, B) (see `groups`).
    tau: KL-regularisation strength (> 0).
    baseline: "mean" or "log_mean_exp"; static (bind it with functools.partial before jit).
    length_normalize: static; divide S and S_ref by the counted tokens per sample.

  Returns:
    (loss, metrics) with loss the mean over all B rows. Metrics average over rows with at least
    one counted token: `log_ratio` mean (S - S_ref), a Monte-Carlo KL(pi_i || pi) estimate when
    negated, `baseline`, `advantage_abs`, `pg_loss`, `tau_loss`, `seq_logp`.
  """
  seq_logp_B = sequence_logprob(logp_BxT, mask_BxT, length_normalize)
  ref_logp_BxT = jax.lax.stop_gradient(ref_logp_BxT)
  log_ratio_B = sequence_logprob(logp_BxT - ref_logp_BxT, mask_BxT, length_normalize)
  baseline_B = jax.lax.stop_gradient(group_baseline(rewards_B, group_ids_B, tau, baseline))
  advantage_B = rewards_B - baseline_B
  pg_loss = -(advantage_B * seq_logp_B).mean()
  tau_loss = 0.5 * tau * (log_ratio_B**2).mean()
  loss = pg_loss + tau_loss
  metrics = {
      "loss": loss,
      "pg_loss": pg_loss,
      "tau_loss": tau_loss,
      "log_ratio": mean_over_real_rows(log_ratio_B, mask_BxT),
      "baseline": mean_over_real_rows(baseline_B, mask_BxT),
      "advantage_abs": mean_over_real_rows(jnp.abs(advantage_B), mask_BxT),
      "seq_logp": mean_over_real_rows(seq_logp_B, mask_BxT),
  }
  return loss, metrics
