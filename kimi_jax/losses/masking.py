"""Per-sample reductions of per-token arrays under the loss mask.

`mask_BxT` is 1 on response tokens that count in the loss and 0 elsewhere (prompt, padding,
segments excluded by the partial-rollout config). A row whose mask is all zero is padding.
"""
import jax
import jax.numpy as jnp


def loss_token_counts(mask_BxT: jax.Array) -> jax.Array:
  """Number of counted tokens per sample, at least 1 so it can divide, [B]."""
  return jnp.maximum(mask_BxT.sum(axis=-1), 1.0)


def sequence_logprob(logp_BxT: jax.Array, mask_BxT: jax.Array,
                     length_normalize: bool) -> jax.Array:
  """S_B = sum of masked token log-probs; divided by `loss_token_counts` if `length_normalize`."""
  sums_B = (logp_BxT * mask_BxT).sum(axis=-1)
  return sums_B / loss_token_counts(mask_BxT) if length_normalize else sums_B


def mean_over_real_rows(values_B: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Mean of `values_B` over rows with at least one counted token (for metrics)."""
  real_B = (mask_BxT.sum(axis=-1) > 0).astype(values_B.dtype)
  return (values_B * real_B).sum() / jnp.maximum(real_B.sum(), 1.0)
