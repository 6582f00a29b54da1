"""Repeated n-gram loop detection (k1.5 section 2.6.2: stop degenerate samples early).

`repeated_loop` runs inside the engine's decode program and stops a looping sample at once;
`first_loop_end` applies the same rule on the host to tokens any backend returned (an SGLang
server knows nothing of it), so a loop means the same thing whichever backend sampled.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


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


def first_loop_end(response_ids: Sequence[int], ngram: int, count: int, start: int = 0,
                   stop: int | None = None) -> int | None:
  """The shortest prefix length e > `start` (and <= `stop`, default all) whose last
  `ngram * count` tokens are one loop of period <= `ngram` (the rule of `repeated_loop`), or
  None. Windows lie inside `response_ids`; ngram = 0 disables detection."""
  window = ngram * count
  stop = len(response_ids) if stop is None else stop
  if ngram == 0 or stop < window:
    return None
  tokens_T = np.asarray(response_ids[:stop])
  ends_T = np.arange(max(start + 1, window), stop + 1)  # candidate prefix lengths
  periodic_T = np.zeros(len(ends_T), bool)
  for period in range(1, ngram + 1):
    # mismatch_T[i]: how many i' < i have tokens[i'] != tokens[i' + period].
    mismatch_T = np.concatenate([[0], np.cumsum(tokens_T[period:] != tokens_T[:-period])])
    # A window [e - window, e) has period p iff tokens[i] == tokens[i + p] for i in
    # [e - window, e - p).
    periodic_T |= mismatch_T[ends_T - period] == mismatch_T[ends_T - window]
  hits = np.flatnonzero(periodic_T)
  return int(ends_T[hits[0]]) if len(hits) else None
