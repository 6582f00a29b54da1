"""Device-side state of the sampling batch and the two jitted programs that advance it.

The batch has a fixed shape (max_batch rows, max_seq_len KV slots), so `prefill` compiles once
per admission shape (the engine uses one per prompt-length bucket) and `decode_chunk` once per
engine. Every row holds one request: its tokens (slot index == position), its KV cache, its
sampling settings and its stop rules.
Sampling, emission and stopping live on device in `decode_chunk` only, so a chunk of decode
steps needs no host round-trip and the prefill programs stay small.

Prompts with images (a vision-language model) are prefilled by `prefill_images`, which runs the
vision tower once per distinct image of the program and places M-RoPE positions; each row keeps
its rope delta, so decoded tokens rotate by position + delta (0 for text-only rows).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from kimi_jax.model import ModelConfig, decode_lm, init_kv_cache
from kimi_jax.model.logprobs import policy_logits
from kimi_jax.model.transformer import Transformer
from kimi_jax.model.vision import VisionLayout
from kimi_jax.model.vlm import embed_with_images, encode_images
from kimi_jax.rollout.repetition import repeated_loop
from kimi_jax.rollout.sampling import (penalized_logits, request_key_data, row_keys,
                                       sample_tokens)

# Per-row finish codes, set on device when a row's request stops.
ROW_RUNNING, ROW_STOPPED, ROW_FULL, ROW_REPEATED = 0, 1, 2, 3


@struct.dataclass
class BatchState:
  kv_cache: tuple  # per layer (keys [B, K, A, S], values [B, K, S, A])
  history_BxS: jax.Array  # token at each position: prompt then output
  position_B: jax.Array  # position of the newest token (the next decode input)
  active_B: jax.Array
  finish_B: jax.Array  # finish code of the row's request
  num_generated_B: jax.Array
  max_new_B: jax.Array
  temperature_B: jax.Array
  top_p_B: jax.Array
  top_k_B: jax.Array
  min_p_B: jax.Array
  key_data_Bx2: jax.Array
  stop_ids_BxJ: jax.Array  # padded with -1
  min_new_B: jax.Array  # stop ids are suppressed until this many tokens are out
  repetition_B: jax.Array
  frequency_B: jax.Array
  presence_B: jax.Array
  counts_BxV: jax.Array  # output tokens of the row's request, by id (for the penalties)
  rope_delta_B: jax.Array  # rotary position - slot for decoded tokens (M-RoPE after images)


class Admission(NamedTuple):
  """New requests for up to R rows, their prompts computed once per distinct prompt (U rows).

  Requests that share a prompt share its prefill: each of the first `num_rows` rows copies the
  KV cache of prompt row `source_R` (padding rows have row index B and are dropped).
  """

  rows_R: jax.Array
  source_R: jax.Array  # index into the U prompt rows
  num_rows: jax.Array  # real (non-padding) rows, a scalar
  prompts_UxT: jax.Array  # right-padded
  lengths_U: jax.Array
  max_new_R: jax.Array
  temperature_R: jax.Array
  top_p_R: jax.Array
  top_k_R: jax.Array
  min_p_R: jax.Array
  seed_lo_R: jax.Array  # uint32 halves of the 64-bit seed
  seed_hi_R: jax.Array
  sample_index_R: jax.Array
  stop_ids_RxJ: jax.Array
  min_new_R: jax.Array
  repetition_R: jax.Array
  frequency_R: jax.Array
  presence_R: jax.Array


class ImageAdmission(NamedTuple):
  """The distinct images of one prefill program's U prompts (patches padded to N) and where
  each of their image tokens takes its embedding from."""

  pixel_values_OxE: jax.Array
  hw_positions_Ox2: jax.Array
  frame_ids_O: jax.Array
  window_ids_O: jax.Array
  # Per image token of the U x T prompts (row-major), its row of the merged embeddings of the
  # distinct images (flat, U * T long).
  embed_index: jax.Array
  rope_positions_3xUxT: jax.Array
  rope_delta_U: jax.Array


class Emitted(NamedTuple):
  """What a decode chunk produced, step-major: tokens, log-probs and emission mask [C, B]."""

  tokens_IxB: jax.Array
  logprobs_IxB: jax.Array
  emitted_IxB: jax.Array
  finish_B: jax.Array


def init_batch_state(config: ModelConfig, max_batch: int, max_seq_len: int,
                     max_stop_ids: int) -> BatchState:
  b = max_batch
  zeros = lambda dtype: jnp.zeros((b,), dtype)
  return BatchState(
      kv_cache=init_kv_cache(config, b, max_seq_len),
      history_BxS=jnp.zeros((b, max_seq_len), jnp.int32),
      position_B=zeros(jnp.int32), active_B=zeros(bool), finish_B=zeros(jnp.int32),
      num_generated_B=zeros(jnp.int32), max_new_B=zeros(jnp.int32),
      temperature_B=zeros(jnp.float32), top_p_B=jnp.ones((b,), jnp.float32),
      top_k_B=zeros(jnp.int32), min_p_B=zeros(jnp.float32),
      key_data_Bx2=jnp.zeros((b, 2), jnp.uint32),
      stop_ids_BxJ=jnp.full((b, max_stop_ids), -1, jnp.int32), min_new_B=zeros(jnp.int32),
      repetition_B=jnp.ones((b,), jnp.float32), frequency_B=zeros(jnp.float32),
      presence_B=zeros(jnp.float32), counts_BxV=jnp.zeros((b, config.vocab_size), jnp.int32),
      rope_delta_B=zeros(jnp.int32))


def _penalize(state: BatchState, logits_BxV):
  """Penalties and min_new_tokens; a batch whose active rows use neither skips the work."""
  holding_B = state.num_generated_B < state.min_new_B
  needed = jnp.any(state.active_B & (holding_B | (state.repetition_B != 1)
                                     | (state.frequency_B != 0) | (state.presence_B != 0)))
  suppress_BxJ = jnp.where(holding_B[:, None], state.stop_ids_BxJ, -1)
  return jax.lax.cond(
      needed, penalized_logits, lambda logits, *_: logits, logits_BxV, state.counts_BxV,
      state.repetition_B, state.frequency_B, state.presence_B, suppress_BxJ)


def reset_rows(config: ModelConfig, max_stop_ids: int, state: BatchState,
               reset_B: jax.Array) -> BatchState:
  """`state` with the rows in `reset_B` as `init_batch_state` makes them (KV cache included).

  Prefill rewrites only a prompt's own KV slots; the slots past it keep what the row's previous
  requests left, masked out of attention but still multiplied by a zero weight, so a NaN left by
  poisoned weights would spread to every later request of the row.
  """
  b, s = state.history_BxS.shape
  fresh = init_batch_state(config, b, s, max_stop_ids)

  def pick(old, new):
    return jnp.where(reset_B.reshape((b,) + (1,) * (old.ndim - 1)), new, old)

  return jax.tree_util.tree_map(pick, state, fresh)


def _record(state: BatchState, logits_BxV, budget, ngram: int, count: int):
  """Sample one token for active rows within `budget`, append it and apply stop rules.
  `logits_BxV` are the policy's (`policy_logits`: a VLM never samples its vision tokens)."""
  b, s = state.history_BxS.shape
  emit_B = state.active_B & (jnp.cumsum(state.active_B) <= budget)
  next_position_B = state.position_B + 1
  tokens_B, logprobs_B = sample_tokens(
      _penalize(state, logits_BxV), state.temperature_B, state.top_p_B, state.top_k_B, state.min_p_B,
      row_keys(state.key_data_Bx2, next_position_B))
  write_at_B = jnp.where(emit_B, next_position_B, s)  # out of range -> dropped
  history_BxS = state.history_BxS.at[jnp.arange(b), write_at_B].set(tokens_B, mode="drop")
  position_B = jnp.where(emit_B, next_position_B, state.position_B)
  num_generated_B = state.num_generated_B + emit_B
  stopped_B = jnp.any(tokens_B[:, None] == state.stop_ids_BxJ, axis=1)
  repeated_B = repeated_loop(history_BxS, position_B, num_generated_B, ngram, count)
  full_B = (num_generated_B >= state.max_new_B) | (position_B >= s - 1)
  code_B = jnp.select([stopped_B, repeated_B, full_B], [ROW_STOPPED, ROW_REPEATED, ROW_FULL], ROW_RUNNING)
  finished_B = emit_B & (code_B != ROW_RUNNING)
  counts_BxV = state.counts_BxV.at[jnp.arange(b), tokens_B].add(emit_B.astype(jnp.int32))
  state = state.replace(
      history_BxS=history_BxS, position_B=position_B, num_generated_B=num_generated_B,
      counts_BxV=counts_BxV, active_B=state.active_B & ~finished_B,
      finish_B=jnp.where(finished_B, code_B, state.finish_B))
  return state, (tokens_B, logprobs_B, emit_B), budget - jnp.sum(emit_B)


def _copy_prompt_cache(kv_cache, prompt_cache, rows_R, source_R, num_rows):
  """Write prompt row `source_R[i]`'s keys and values into cache row `rows_R[i]`, i < num_rows
  (in place, one row at a time: the copying grows with the rows admitted, not with R)."""
  def copy_row(i, cache):
    at = (rows_R[i], 0, 0, 0)
    return tuple((jax.lax.dynamic_update_slice(k, pk[source_R[i]][None], at),
                  jax.lax.dynamic_update_slice(v, pv[source_R[i]][None], at))
                 for (k, v), (pk, pv) in zip(cache, prompt_cache))
  return jax.lax.fori_loop(0, num_rows, copy_row, kv_cache)


def prefill(config: ModelConfig, params, state: BatchState, admission: Admission) -> BatchState:
  """Write new requests into their rows: KV cache of the prompt, settings and stop rules.

  Each distinct prompt runs through the model once; its rows copy the result. The row's
  newest token is the last prompt token, so the next decode step samples the first output
  token like any other (its K/V entry is rewritten with the same values).
  """
  u, t = admission.prompts_UxT.shape
  positions_UxT = jnp.broadcast_to(jnp.arange(t), (u, t))
  _, prompt_cache = decode_lm(config, params, admission.prompts_UxT, positions_UxT,
                              init_kv_cache(config, u, t))
  return _seat(state, admission, prompt_cache, jnp.zeros((u,), jnp.int32))


def prefill_images(config: ModelConfig, params, state: BatchState, admission: Admission,
                   images: ImageAdmission) -> BatchState:
  """`prefill` for prompts whose image pad tokens take the images' merged patch embeddings."""
  u, t = admission.prompts_UxT.shape
  layout = VisionLayout(images.hw_positions_Ox2, images.frame_ids_O, images.window_ids_O)
  merged_MxD = encode_images(config, params, images.pixel_values_OxE, layout)
  embeds_UxTxD = embed_with_images(config, params, admission.prompts_UxT,
                                   merged_MxD[images.embed_index])
  _, prompt_cache, _ = Transformer(config).apply(
      {"params": params}, admission.prompts_UxT, jnp.broadcast_to(jnp.arange(t), (u, t)), None,
      init_kv_cache(config, u, t), embeds_UxTxD, images.rope_positions_3xUxT)
  return _seat(state, admission, prompt_cache, images.rope_delta_U)


def _seat(state: BatchState, admission: Admission, prompt_cache, rope_delta_U) -> BatchState:
  """The admitted rows' prompt KV cache (copied from their prompt row), tokens, settings and
  stop rules written into `state`."""
  a = admission
  t = a.prompts_UxT.shape[1]
  r = a.rows_R.shape[0]
  s = state.history_BxS.shape[1]
  kv_cache = _copy_prompt_cache(state.kv_cache, prompt_cache, a.rows_R, a.source_R, a.num_rows)
  put = lambda target, value: target.at[a.rows_R].set(value, mode="drop")
  prompts_RxS = jnp.zeros((r, s), jnp.int32).at[:, :t].set(a.prompts_UxT[a.source_R])
  return state.replace(
      kv_cache=kv_cache, history_BxS=put(state.history_BxS, prompts_RxS),
      position_B=put(state.position_B, a.lengths_U[a.source_R] - 1),
      active_B=put(state.active_B, True),
      finish_B=put(state.finish_B, ROW_RUNNING), num_generated_B=put(state.num_generated_B, 0),
      max_new_B=put(state.max_new_B, a.max_new_R),
      temperature_B=put(state.temperature_B, a.temperature_R), top_p_B=put(state.top_p_B, a.top_p_R),
      top_k_B=put(state.top_k_B, a.top_k_R), min_p_B=put(state.min_p_B, a.min_p_R),
      key_data_Bx2=put(state.key_data_Bx2,
                       request_key_data(a.seed_lo_R, a.seed_hi_R, a.sample_index_R)),
      stop_ids_BxJ=put(state.stop_ids_BxJ, a.stop_ids_RxJ), min_new_B=put(state.min_new_B, a.min_new_R),
      repetition_B=put(state.repetition_B, a.repetition_R),
      frequency_B=put(state.frequency_B, a.frequency_R),
      presence_B=put(state.presence_B, a.presence_R),
      counts_BxV=put(state.counts_BxV, jnp.zeros((r, state.counts_BxV.shape[1]), jnp.int32)),
      rope_delta_B=put(state.rope_delta_B, rope_delta_U[a.source_R]))


def decode_chunk(config: ModelConfig, params, state: BatchState, release_B, budget, exit_when_free,
                 *, num_steps: int, ngram: int, count: int):
  """Up to `num_steps` decode steps over the whole batch in one device program.

  Rows in `release_B` are retired first (aborted on the host). The loop ends early when no row
  is active, when the budget is spent, or once `exit_when_free` rows are free to be refilled.
  """
  b = state.history_BxS.shape[0]
  state = state.replace(active_B=state.active_B & ~release_B)
  emitted = (jnp.zeros((num_steps, b), jnp.int32), jnp.zeros((num_steps, b), jnp.float32),
             jnp.zeros((num_steps, b), bool))

  def keep_going(carry):
    step, state, budget, _ = carry
    num_active = jnp.sum(state.active_B)
    return (step < num_steps) & (num_active > 0) & (b - num_active < exit_when_free) & (budget > 0)

  def one_step(carry):
    step, state, budget, emitted = carry
    tokens_Bx1 = jnp.take_along_axis(state.history_BxS, state.position_B[:, None], axis=1)
    logits_Bx1xV, kv_cache = decode_lm(config, params, tokens_Bx1, state.position_B[:, None],
                                       state.kv_cache,
                                       (state.position_B + state.rope_delta_B)[:, None])
    state, new, budget = _record(state.replace(kv_cache=kv_cache),
                                 policy_logits(config, logits_Bx1xV[:, 0]), budget, ngram, count)
    emitted = tuple(buf.at[step].set(value) for buf, value in zip(emitted, new))
    return step + 1, state, budget, emitted

  _, state, _, emitted = jax.lax.while_loop(keep_going, one_step, (0, state, budget, emitted))
  return state, Emitted(*emitted, state.finish_B)
