"""Per-token log-probabilities of a batch's targets under the LM."""
import jax
import jax.numpy as jnp

from kimi_jax.model.config import ModelConfig
from kimi_jax.model.transformer import apply_lm


def token_logprobs(config: ModelConfig, params, batch, return_max_logits: bool = False):
  """log p(targets_BxT | prefix) under `params`, float32 [B, T] (and max_logits_LxH)."""
  out = apply_lm(config, params, batch["tokens"], batch.get("positions"),
                 batch.get("segment_ids"), return_max_logits=return_max_logits)
  logits_BxTxV, max_logits_LxH = out if return_max_logits else (out, None)
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  logp_BxT = jnp.take_along_axis(logp_BxTxV, batch["targets"][..., None], axis=-1)[..., 0]
  return (logp_BxT, max_logits_LxH) if return_max_logits else logp_BxT
