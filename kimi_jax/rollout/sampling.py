"""Batched next-token sampling with per-row temperature, top-k, top-p and min-p (SGLang rules).

Every row carries its own settings in device arrays, so mixed requests share one batch and
one compiled step. Log-probs are SGLang's: log_softmax(logits / T) of the chosen token before
any filtering, with T = 1 for greedy rows.
"""
import jax
import jax.numpy as jnp


def row_keys(key_data_Bx2: jax.Array, positions_B: jax.Array) -> jax.Array:
  """One PRNG key per row for the token at `positions_B`: a pure function of (request key, position)."""
  keys_B = jax.random.wrap_key_data(key_data_Bx2)
  return jax.vmap(jax.random.fold_in)(keys_B, positions_B)


def request_key_data(seed_lo_B, seed_hi_B, sample_index_B) -> jax.Array:
  """Raw key data [B, 2] of a request from its 64-bit seed (two uint32 halves) and sample index."""
  def one(lo, hi, index):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(lo), hi), index)
    return jax.random.key_data(key)
  return jax.vmap(one)(seed_lo_B, seed_hi_B, sample_index_B)


def penalized_logits(logits_BxV, counts_BxV, repetition_B, frequency_B, presence_B,
                     suppress_BxJ) -> jax.Array:
  """SGLang's penalties on raw logits, from each row's output-token counts.

  Repetition (multiplicative, tokens seen in the output): logit / p where logit > 0, else
  logit * p. Frequency and presence (additive): logit - f * count - p * (count > 0).
  `suppress_BxJ` lists token ids that get -inf (min_new_tokens holds back the stop ids);
  entries outside [0, V) are ignored.
  """
  b, vocab = logits_BxV.shape
  seen_BxV = counts_BxV > 0
  scale_BxV = jnp.where(seen_BxV, repetition_B[:, None], 1.0)
  logits_BxV = jnp.where(logits_BxV > 0, logits_BxV / scale_BxV, logits_BxV * scale_BxV)
  logits_BxV = (logits_BxV - frequency_B[:, None] * counts_BxV
                - presence_B[:, None] * seen_BxV.astype(logits_BxV.dtype))
  suppress_BxJ = jnp.where((suppress_BxJ >= 0) & (suppress_BxJ < vocab), suppress_BxJ, vocab)
  return logits_BxV.at[jnp.arange(b)[:, None], suppress_BxJ].set(-jnp.inf, mode="drop")


def log_probs(logits_BxV: jax.Array, temperature_B: jax.Array) -> jax.Array:
  """log_softmax(logits / T) per row; greedy rows (T = 0) use T = 1."""
  scale_B = jnp.where(temperature_B > 0, temperature_B, 1.0)
  return jax.nn.log_softmax(logits_BxV / scale_B[:, None], axis=-1)


def kept_mask(logp_BxV, top_p_B, top_k_B, min_p_B) -> jax.Array:
  """Tokens that survive top-k, top-p and min-p, judged on the unfiltered distribution.

  On probabilities sorted in descending order, rank r is kept if r < top_k (top_k <= 0 keeps
  all), the mass ranked before it is <= top_p, and p_r >= min_p * p_max (SGLang's rule). Each
  condition keeps a prefix of the ranking, so the kept set is every token whose probability
  is >= that of the last kept rank (exact ties at that boundary are all kept).
  """
  vocab = logp_BxV.shape[-1]
  probs_BxV = jnp.exp(logp_BxV)
  sorted_BxV = -jnp.sort(-probs_BxV, axis=-1)
  mass_before_BxV = jnp.cumsum(sorted_BxV, axis=-1) - sorted_BxV
  rank_V = jnp.arange(vocab)
  top_k_B = jnp.where(top_k_B > 0, top_k_B, vocab)
  keep_sorted_BxV = ((rank_V[None] < top_k_B[:, None])
                     & (mass_before_BxV <= top_p_B[:, None])
                     & (sorted_BxV >= min_p_B[:, None] * sorted_BxV[:, :1]))
  last_kept_B = jnp.sum(keep_sorted_BxV, axis=-1) - 1
  threshold_B = jnp.take_along_axis(sorted_BxV, last_kept_B[:, None], axis=-1)
  return probs_BxV >= threshold_B


def first_argmax(x_BxV: jax.Array) -> jax.Array:
  """`jnp.argmax(x_BxV, axis=-1)` (first maximum; first NaN if any) as two plain reductions.

  XLA:CPU runs argmax as one variadic (value, index) reduction that does not vectorise: on a
  [64, 8192] float32 array it took 8x the time of this max + min pair (measured).
  """
  max_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)  # NaN if the row holds one
  hit_BxV = (x_BxV == max_Bx1) | jnp.isnan(x_BxV)
  vocab = x_BxV.shape[-1]
  return jnp.min(jnp.where(hit_BxV, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)


def sample_tokens(logits_BxV, temperature_B, top_p_B, top_k_B, min_p_B, keys_B):
  """Returns (tokens_B int32, logprobs_B float32).

  Sampling is Gumbel-max over the kept tokens' log-probs, i.e. a draw from the renormalised
  filtered distribution. The sort behind the filters runs only when some sampling row needs it,
  the noise only when some row samples.
  """
  greedy_B = temperature_B == 0
  logp_BxV = log_probs(logits_BxV, temperature_B)
  filtering = jnp.any(~greedy_B & ((top_k_B > 0) | (top_p_B < 1) | (min_p_B > 0)))
  keep_BxV = jax.lax.cond(filtering, kept_mask, lambda logp, *_: jnp.ones(logp.shape, bool),
                          logp_BxV, top_p_B, top_k_B, min_p_B)
  # The noise (threefry, a rolled loop on CPU) is drawn only when some row samples.
  gumbel_BxV = jax.lax.cond(
      jnp.any(~greedy_B),
      lambda keys: jax.vmap(lambda key: jax.random.gumbel(key, logp_BxV.shape[-1:]))(keys),
      lambda keys: jnp.zeros(logp_BxV.shape, logp_BxV.dtype), keys_B)
  # One argmax for both kinds of row: greedy rows take the raw logits' argmax.
  scores_BxV = jnp.where(greedy_B[:, None], logits_BxV,
                         jnp.where(keep_BxV, logp_BxV + gumbel_BxV, -jnp.inf))
  tokens_B = first_argmax(scores_BxV)
  logprobs_B = jnp.take_along_axis(logp_BxV, tokens_B[:, None], axis=-1)[:, 0]
  return tokens_B, logprobs_B
