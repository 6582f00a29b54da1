"""Causal grouped-query attention kernels and the attention module.

Masks are built from positions (a key is visible when its position <= the query's and, for
packed rows, it is in the same segment), so the same kernels serve the full forward, packed
batches, the KV-cache decode path (cache slot index == position) and, with all positions equal,
bidirectional attention within segments (the vision tower).
"""
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from kimi_jax.model.config import ModelConfig
from kimi_jax.model.layers import Dense, RMSNorm, rotary_embedding
from kimi_jax.sharding.rules import constrain

_NEG_INF = -1e30


def causal_mask(q_pos_BxT, k_pos_BxS, q_seg_BxT=None, k_seg_BxS=None) -> jax.Array:
  """Boolean mask [B, 1, T, S]: key visible if earlier-or-equal position and same segment."""
  mask = k_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None]
  if q_seg_BxT is not None:
    mask &= q_seg_BxT[:, :, None] == k_seg_BxS[:, None, :]
  return mask[:, None]


def _grouped_scores(q_BxTxHxA, k_BxSxKxA, mask_Bx1xTxS):
  """Scaled logits [B, K, G, T, S] in float32, masked entries at -inf-like."""
  b, t, h, d = q_BxTxHxA.shape
  kv = k_BxSxKxA.shape[2]
  q_BxTxKxQxA = q_BxTxHxA.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxQxA, k_BxSxKxA,
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  return jnp.where(mask_Bx1xTxS[:, :, None], scores, _NEG_INF)


def _per_head_max(scores_BxKxQxTxS) -> jax.Array:
  return scores_BxKxQxTxS.max(axis=(0, 3, 4)).reshape(-1)  # [H], head = k * G + g


def dot_product_attention(q_BxTxHxA, k_BxSxKxA, v_BxSxKxA, mask_Bx1xTxS):
  """Attention through `jax.nn.dot_product_attention` (fused where the backend allows)."""
  return jax.nn.dot_product_attention(q_BxTxHxA, k_BxSxKxA, v_BxSxKxA, mask=mask_Bx1xTxS)


def _pad_to_blocks(x, block, axis):
  pad = (-x.shape[axis]) % block
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _query_blocks(q_BxTxHxA, q_pos_BxT, q_seg_BxT, block):
  """Split queries (and their positions/segments) into [num_blocks, B, block, ...] slices.

  Padded query rows get position -1, so they see no key and are dropped afterwards.
  """
  b, t, h, d = q_BxTxHxA.shape
  split = lambda x: x.reshape(b, -1, block, *x.shape[2:]).swapaxes(0, 1)
  q_blocks = split(_pad_to_blocks(q_BxTxHxA, block, 1))
  pos_blocks = split(jnp.pad(q_pos_BxT, ((0, 0), (0, (-t) % block)), constant_values=-1))
  seg_blocks = None if q_seg_BxT is None else split(_pad_to_blocks(q_seg_BxT, block, 1))
  return q_blocks, pos_blocks, seg_blocks


def blockwise_attention(q_BxTxHxA, k_BxSxKxA, v_BxSxKxA, q_pos_BxT, k_pos_BxS, q_seg_BxT,
                        k_seg_BxS, block_size: int):
  """Attention computed one query block at a time under remat.

  Each block materialises only its [block, S] scores and mask (built from positions), and the
  backward pass recomputes them, so memory grows linearly with sequence length.
  """
  b, t, h, d = q_BxTxHxA.shape
  block = min(block_size, t)

  @jax.checkpoint
  def one_block(args):
    q_blk, pos_blk, seg_blk = args
    mask = causal_mask(pos_blk, k_pos_BxS, seg_blk, k_seg_BxS)
    probs = jax.nn.softmax(_grouped_scores(q_blk, k_BxSxKxA, mask), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_BxSxKxA.dtype), v_BxSxKxA)
    return out.reshape(b, block, h, d)

  out = jax.lax.map(one_block, _query_blocks(q_BxTxHxA, q_pos_BxT, q_seg_BxT, block))
  return out.swapaxes(0, 1).reshape(b, -1, h, d)[:, :t]


def max_attention_logits(q_BxTxHxA, k_BxSxKxA, q_pos_BxT, k_pos_BxS, q_seg_BxT, k_seg_BxS,
                         block_size: int) -> jax.Array:
  """Per-head max of the scaled q.k logit over valid pairs, [H], blockwise in memory."""
  block = min(block_size, q_BxTxHxA.shape[1])

  def one_block(args):
    q_blk, pos_blk, seg_blk = args
    mask = causal_mask(pos_blk, k_pos_BxS, seg_blk, k_seg_BxS)
    return _per_head_max(_grouped_scores(q_blk, k_BxSxKxA, mask))

  per_block = jax.lax.map(one_block, _query_blocks(q_BxTxHxA, q_pos_BxT, q_seg_BxT, block))
  return jax.lax.stop_gradient(per_block.max(axis=0))


def segment_attention(q_BxTxHxA, k_BxTxKxA, v_BxTxKxA, segment_ids_BxT, impl: str,
                      block_size: int):
  """Bidirectional attention within segments (a token sees every token of its segment and
  none outside), through the causal kernels with every position 0."""
  zeros_BxT = jnp.zeros(segment_ids_BxT.shape, jnp.int32)
  if impl == "blockwise":
    return blockwise_attention(q_BxTxHxA, k_BxTxKxA, v_BxTxKxA, zeros_BxT, zeros_BxT,
                               segment_ids_BxT, segment_ids_BxT, block_size)
  mask = causal_mask(zeros_BxT, zeros_BxT, segment_ids_BxT, segment_ids_BxT)
  return dot_product_attention(q_BxTxHxA, k_BxTxKxA, v_BxTxKxA, mask)


class Attention(nn.Module):
  """GQA self-attention with RoPE, optional QKV bias and q/k-norm, optional KV cache.

  `positions_BxT` order the sequence (causal mask, cache slots); `rope_positions` rotate q/k:
  None means `positions_BxT`, else [B, T] or M-RoPE's [3, B, T].
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, kv_cache, return_max_logits,
               rope_positions=None):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, t, _ = x_BxTxD.shape
    h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    proj = functools.partial(Dense, dtype=dtype, param_dtype=pdtype)
    q = proj(h * d, ("embed", "heads"), cfg.qkv_bias, name="q_proj")(x_BxTxD).reshape(b, t, h, d)
    k = proj(kv * d, ("embed", "kv_heads"), cfg.qkv_bias, name="k_proj")(x_BxTxD).reshape(b, t, kv, d)
    v = proj(kv * d, ("embed", "kv_heads"), cfg.qkv_bias, name="v_proj")(x_BxTxD).reshape(b, t, kv, d)
    if cfg.qk_norm:
      q = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="q_norm")(q)
      k = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="k_norm")(k)
    rope_positions = positions_BxT if rope_positions is None else rope_positions
    q = rotary_embedding(q, rope_positions, cfg.rope_theta, cfg.mrope_section)
    q = constrain(q, ("batch", "length", "act_heads", None))
    k = rotary_embedding(k, rope_positions, cfg.rope_theta, cfg.mrope_section)

    if kv_cache is None:
      keys, values, k_pos, k_seg, q_seg = k, v, positions_BxT, segment_ids_BxT, segment_ids_BxT
      new_cache = None
    else:
      rows = jnp.arange(b)[:, None]
      keys = kv_cache[0].at[rows, positions_BxT].set(k.astype(kv_cache[0].dtype))
      values = kv_cache[1].at[rows, positions_BxT].set(v.astype(kv_cache[1].dtype))
      new_cache = (keys, values)
      k_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), (b, keys.shape[1]))
      k_seg = q_seg = None
    if cfg.attention == "blockwise":
      out = blockwise_attention(q, keys, values, positions_BxT, k_pos, q_seg, k_seg,
                                cfg.attention_block_size)
    else:
      out = dot_product_attention(q, keys, values, causal_mask(positions_BxT, k_pos, q_seg, k_seg))
    out = constrain(out, ("batch", "length", "act_heads", None)).reshape(b, t, h * d)
    y = proj(x_BxTxD.shape[-1], ("heads", "embed"), False, name="o_proj")(out)
    max_logits_H = (max_attention_logits(q, keys, positions_BxT, k_pos, q_seg, k_seg,
                                         cfg.attention_block_size)
                    if return_max_logits else None)
    return y, new_cache, max_logits_H
