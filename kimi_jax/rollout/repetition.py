"""Repeated n-gram loop detection (k1.5 section 2.6.2: stop degenerate samples early)."""
import jax
import jax.numpy as jnp


def repeated_loop(history_BxS: jax.Array, last_position_B: jax.Array, num_generated_B: jax.Array,
                  ngram: int, count: int) -> jax.Array:
  """True where a row's last `ngram * count` generated tokens are one loop repeated.

  "One loop" means the window is periodic with some period p <= `ngram`: a p-gram repeated
  (at least `count` times, since p <= ngram). Only generated tokens count: the window must lie
  after the prompt. `history_BxS[b, i]` is the token at position i; the newest token sits at
  `last_position_B`. ngram = 0 disables detection.
  """
  batch = history_BxS.shape[0]
  if ngram == 0:
    return jnp.zeros((batch,), bool)
  window = ngram * count
  index_BxW = jnp.maximum(last_position_B[:, None] - window + 1 + jnp.arange(window), 0)
  window_BxW = jnp.take_along_axis(history_BxS, index_BxW, axis=1)
  periodic_B = jnp.zeros((batch,), bool)
  for period in range(1, ngram + 1):
    periodic_B |= jnp.all(window_BxW[:, period:] == window_BxW[:, :-period], axis=1)
  return periodic_B & (num_generated_B >= window)
