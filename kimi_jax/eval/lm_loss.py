"""Held-out LM loss split by in-document position: what a long-context stage should improve.

Each held-out document (closed by eos, cut to seq_len + 1 tokens) gets its own row, so a
target at position p sees exactly the p tokens before it; the loss is then averaged per
position bucket [edges[i], edges[i + 1]).
"""
import jax
import numpy as np

from kimi_jax.data.packing import Example, pack
from kimi_jax.model.logprobs import token_logprobs


def loss_by_position(logp_BxT, loss_mask_BxT, positions_BxT, edges) -> dict[str, float]:
  """Mean negative log-prob of the masked targets per bucket of input positions;
  key "loss_pos{lo}-{hi}" (buckets without tokens are left out)."""
  logp_BxT, mask_BxT = np.asarray(logp_BxT), np.asarray(loss_mask_BxT) > 0
  positions_BxT = np.asarray(positions_BxT)
  out = {}
  for lo, hi in zip(edges[:-1], edges[1:]):
    in_bucket = mask_BxT & (positions_BxT >= lo) & (positions_BxT < hi)
    if in_bucket.any():
      out[f"loss_pos{lo}-{hi}"] = float(-logp_BxT[in_bucket].mean())
  return out


def heldout_loss_by_position(model_config, params, documents_ids, eos_id: int, pad_id: int,
                             seq_len: int, edges) -> dict[str, float]:
  """`loss_by_position` of `params` on held-out documents (token ids), one per row."""
  examples = []
  for ids in documents_ids:
    tokens = np.array(list(ids) + [eos_id], np.int32)[:seq_len + 1]
    examples.append(Example(tokens, np.ones(len(tokens), bool)))
  batch = pack(examples, [[i] for i in range(len(examples))], seq_len, pad_id)
  logp_BxT = jax.jit(token_logprobs, static_argnums=0)(model_config, params, batch)
  return loss_by_position(logp_BxT, batch["loss_mask"], batch["positions"], edges)


def corpus_loss_by_position(model_config, params, tokenizer, documents, edges) -> dict[str, float]:
  """`heldout_loss_by_position` of text `documents`, each evaluated up to the last edge (also
  beyond the length a stage trained on)."""
  return heldout_loss_by_position(model_config, params, [tokenizer.encode(d) for d in documents],
                                  tokenizer.eos_id, tokenizer.pad_id, edges[-1], edges)
