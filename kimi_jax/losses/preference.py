"""Direct preference optimisation against a frozen reference (Rafailov et al. 2023).

With S = a response's log-prob sum under the policy and S_ref the same under the reference,
the implicit reward of a response is beta (S - S_ref) and the loss over B preference pairs is

  mean_b -log sigmoid(beta m_b),  m_b = (S_c_b - S_ref_c_b) - (S_r_b - S_ref_r_b)

over chosen (c) and rejected (r) responses. Its gradient w.r.t. S_c_b is -beta sigmoid(-beta m_b)
/ B and the negative of that w.r.t. S_r_b. With policy = reference every margin is 0 and the
loss is log 2.
"""
import jax
import jax.numpy as jnp


def dpo_loss(policy_chosen_logp_B, policy_rejected_logp_B, ref_chosen_logp_B,
             ref_rejected_logp_B, beta):
  """The DPO loss and its metrics over B pairs of response log-prob sums.

  The reference sums are constants (gradients are stopped). Metrics: `loss`; `chosen_reward`
  and `rejected_reward`, the mean implicit rewards beta (S - S_ref); `reward_margin`, their mean
  difference; `accuracy`, the fraction of pairs whose chosen reward is strictly higher.
  """
  chosen_reward_B = beta * (policy_chosen_logp_B - jax.lax.stop_gradient(ref_chosen_logp_B))
  rejected_reward_B = beta * (policy_rejected_logp_B - jax.lax.stop_gradient(ref_rejected_logp_B))
  margin_B = chosen_reward_B - rejected_reward_B
  loss = -jax.nn.log_sigmoid(margin_B).mean()
  metrics = {
      "loss": loss,
      "chosen_reward": chosen_reward_B.mean(),
      "rejected_reward": rejected_reward_B.mean(),
      "reward_margin": margin_B.mean(),
      "accuracy": (margin_B > 0).astype(jnp.float32).mean(),
  }
  return loss, metrics
