"""Log-probs of a given token sequence with top-k alternatives: what SGLang returns as
`input_token_logprobs`, `*_top_logprobs` and `*_token_ids_logprobs`.

One full forward over the (bucket-padded) sequence; like the sampler's log-probs these are
log_softmax(logits / T) with T = 1 for greedy requests, before any filtering or penalty.
"""
import jax
import jax.numpy as jnp

from kimi_jax.model import ModelConfig, apply_lm
from kimi_jax.rollout.sampling import log_probs


def token_scores(config: ModelConfig, params, tokens_T, temperature, wanted_ids, *, top_k: int):
  """Position t's next-token distribution: (logp of tokens_T[t + 1] (the last entry is 0),
  top-k log-probs and ids [T, top_k], log-probs of the 1-D `wanted_ids` [T, len(wanted_ids)])."""
  t = tokens_T.shape[0]
  logits_TxV = apply_lm(config, params, tokens_T[None])[0]
  logp_TxV = log_probs(logits_TxV, jnp.full((t,), temperature, jnp.float32))
  next_T = jnp.append(tokens_T[1:], 0)
  next_logp_T = jnp.take_along_axis(logp_TxV, next_T[:, None], axis=-1)[:, 0]
  top_logp, top_ids = jax.lax.top_k(logp_TxV, top_k)
  return next_logp_T, top_logp, top_ids, logp_TxV[:, wanted_ids]
