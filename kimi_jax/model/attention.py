"""Causal grouped-query attention kernels and the attention module.

Masks are built from positions (a key is visible when its position <= the query's and, for
packed rows, it is in the same segment), so the same kernels serve the full forward, packed
batches, the KV-cache decode path (cache slot index == position) and, with all positions equal,
bidirectional attention within segments (the vision tower). When the active mesh has a
`sequence` axis larger than one, full forwards run as ring attention over that axis.
"""
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from kimi_jax.model.config import ModelConfig
from kimi_jax.model.layers import Dense, RMSNorm, rotary_embedding
from kimi_jax.sharding.rules import active_mesh, constrain, logical_to_spec

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


def grouped_attention(q_BxTxHxA, k_BxKxAxS, v_BxKxSxA, mask_Bx1xTxS):
  """Softmax attention on head-major keys (transposed, [B, K, A, S]) and values, float32 scores.

  The Q query heads of each KV head and the T positions are folded into one row axis, so each
  KV head runs two plain [Q*T, A] x [A, S] and [Q*T, S] x [S, A] matmuls: no copy of K or V
  per query head, and keys and values laid out as the KV cache holds them are read in place.
  Keys are [A, S] per head because XLA:CPU's [Q*T, A] x [S, A]^T with a small Q*T (a decode
  step) ran 1.6-1.9x slower than [Q*T, A] x [A, S] on the same bytes (measured).
  """
  b, t, h, a = q_BxTxHxA.shape
  kv, s = k_BxKxAxS.shape[1], k_BxKxAxS.shape[3]
  g = h // kv
  q_BxKxGTxA = q_BxTxHxA.reshape(b, t, kv, g, a).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, a)
  scores = jnp.einsum("bkqa,bkas->bkqs", q_BxKxGTxA, k_BxKxAxS,
                      preferred_element_type=jnp.float32) * (a ** -0.5)
  mask_Bx1xGTxS = jnp.broadcast_to(mask_Bx1xTxS[:, :, None], (b, 1, g, t, s)).reshape(
      b, 1, g * t, s)
  probs = jax.nn.softmax(jnp.where(mask_Bx1xGTxS, scores, _NEG_INF), axis=-1)
  out = jnp.einsum("bkqs,bksa->bkqa", probs.astype(v_BxKxSxA.dtype), v_BxKxSxA)
  return out.reshape(b, kv, g, t, a).transpose(0, 3, 1, 2, 4).reshape(b, t, h, a)


def dot_product_attention(q_BxTxHxA, k_BxSxKxA, v_BxSxKxA, mask_Bx1xTxS):
  """`grouped_attention` on position-major keys/values."""
  return grouped_attention(q_BxTxHxA, k_BxSxKxA.transpose(0, 2, 3, 1), v_BxSxKxA.swapaxes(1, 2),
                           mask_Bx1xTxS)


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


def blockwise_attention_lse(q_BxTxHxA, k_BxSxKxA, v_BxSxKxA, q_pos_BxT, k_pos_BxS, q_seg_BxT,
                            k_seg_BxS, block_size: int):
  """Attention computed one query block at a time under remat, with its log-sum-exp.

  Each block materialises only its [block, S] scores and mask (built from positions), and the
  backward pass recomputes them, so memory grows linearly with sequence length. Returns
  (out_BxTxHxA, lse_BxTxH float32): lse is the log of each query's softmax denominator, which
  lets attention over several key chunks be merged exactly (`merge_attention`).
  """
  b, t, h, d = q_BxTxHxA.shape
  block = min(block_size, t)

  @jax.checkpoint
  def one_block(args):
    q_blk, pos_blk, seg_blk = args
    mask = causal_mask(pos_blk, k_pos_BxS, seg_blk, k_seg_BxS)
    scores_BxKxQxTxS = _grouped_scores(q_blk, k_BxSxKxA, mask)
    lse_BxKxQxT = jax.nn.logsumexp(scores_BxKxQxTxS, axis=-1)
    probs = jnp.exp(scores_BxKxQxTxS - lse_BxKxQxT[..., None])
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_BxSxKxA.dtype), v_BxSxKxA)
    return out.reshape(b, block, h, d), lse_BxKxQxT.transpose(0, 3, 1, 2).reshape(b, block, h)

  out, lse = jax.lax.map(one_block, _query_blocks(q_BxTxHxA, q_pos_BxT, q_seg_BxT, block))
  return (out.swapaxes(0, 1).reshape(b, -1, h, d)[:, :t],
          lse.swapaxes(0, 1).reshape(b, -1, h)[:, :t])


def blockwise_attention(q_BxTxHxA, k_BxSxKxA, v_BxSxKxA, q_pos_BxT, k_pos_BxS, q_seg_BxT,
                        k_seg_BxS, block_size: int):
  """`blockwise_attention_lse` without the log-sum-exp."""
  return blockwise_attention_lse(q_BxTxHxA, k_BxSxKxA, v_BxSxKxA, q_pos_BxT, k_pos_BxS,
                                 q_seg_BxT, k_seg_BxS, block_size)[0]


def merge_attention(out_a_BxTxHxA, lse_a_BxTxH, out_b_BxTxHxA, lse_b_BxTxH):
  """Attention over the union of two disjoint key sets from each set's (out, lse), float32."""
  lse_BxTxH = jnp.logaddexp(lse_a_BxTxH, lse_b_BxTxH)
  weight = lambda lse: jnp.exp(lse - lse_BxTxH)[..., None]
  return (out_a_BxTxHxA * weight(lse_a_BxTxH) + out_b_BxTxHxA * weight(lse_b_BxTxH), lse_BxTxH)


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


def _around_ring(body, carry, travelling, axis_name: str):
  """`carry = body(carry, travelling)` once per device of the ring `axis_name`; after each call
  `travelling` moves one device along the ring, so it meets every device and ends at home."""
  n = jax.lax.axis_size(axis_name)
  shift = lambda tree: jax.lax.ppermute(tree, axis_name, [(i, (i + 1) % n) for i in range(n)])

  def step(state, _):
    carry, travelling = state
    carry, travelling = body(carry, travelling)
    return (carry, shift(travelling)), None

  (carry, travelling), _ = jax.lax.scan(step, (carry, travelling), None, length=n)
  return carry, travelling


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _ring_attention(q_BxTxHxA, k_BxTxKxA, v_BxTxKxA, pos_BxT, seg_BxT, block_size, axis_name):
  return _ring_attention_fwd(q_BxTxHxA, k_BxTxKxA, v_BxTxKxA, pos_BxT, seg_BxT, block_size,
                             axis_name)[0]


def _ring_attention_fwd(q_BxTxHxA, k_BxTxKxA, v_BxTxKxA, pos_BxT, seg_BxT, block_size, axis_name):
  def visit(acc, chunk):
    k, v, k_pos, k_seg = chunk
    part = blockwise_attention_lse(q_BxTxHxA, k, v, pos_BxT, k_pos, seg_BxT, k_seg, block_size)
    return merge_attention(*acc, part[0].astype(jnp.float32), part[1]), chunk

  b, t, h, d = q_BxTxHxA.shape
  empty = (jnp.zeros((b, t, h, d), jnp.float32), jnp.full((b, t, h), -jnp.inf, jnp.float32))
  (out, lse), _ = _around_ring(visit, empty, (k_BxTxKxA, v_BxTxKxA, pos_BxT, seg_BxT), axis_name)
  out = out.astype(q_BxTxHxA.dtype)
  return out, (q_BxTxHxA, k_BxTxKxA, v_BxTxKxA, pos_BxT, seg_BxT, out, lse)


def _ring_attention_bwd(block_size, axis_name, residuals, d_out_BxTxHxA):
  """A second trip around the ring: each key chunk's part is recomputed and differentiated;
  the chunk's dk/dv travel with it and arrive home with every device's contribution."""
  q, k, v, pos, seg, out, lse_BxTxH = residuals
  d_out = d_out_BxTxHxA.astype(jnp.float32)
  d_out_dot_out_BxTxH = (d_out * out.astype(jnp.float32)).sum(-1)

  def visit(d_q, chunk):
    k_c, v_c, k_pos, k_seg, d_k, d_v = chunk
    part = lambda q_, k_, v_: blockwise_attention_lse(q_, k_, v_, pos, k_pos, seg, k_seg,
                                                      block_size)
    (part_out, part_lse), vjp = jax.vjp(part, q, k_c, v_c)
    # out = sum_c w_c out_c with w_c = exp(lse_c - lse), so d out_c = w_c d_out and
    # d lse_c = w_c <d_out, out_c - out>.
    weight_BxTxH = jnp.exp(part_lse - lse_BxTxH)
    d_part_out = (weight_BxTxH[..., None] * d_out).astype(part_out.dtype)
    d_part_lse = weight_BxTxH * ((d_out * part_out.astype(jnp.float32)).sum(-1)
                                 - d_out_dot_out_BxTxH)
    dq_c, dk_c, dv_c = vjp((d_part_out, d_part_lse))
    return d_q + dq_c, (k_c, v_c, k_pos, k_seg, d_k + dk_c, d_v + dv_c)

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  d_q, (*_, d_k, d_v) = _around_ring(visit, zeros(q), (k, v, pos, seg, zeros(k), zeros(v)),
                                     axis_name)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, None


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def _ring_max_logits(q_BxTxHxA, k_BxTxKxA, pos_BxT, seg_BxT, block_size, axis_name):
  """Per-head max logit of the local queries over every key chunk of the ring, [H]."""
  def visit(max_H, chunk):
    k, k_pos, k_seg = chunk
    chunk_max_H = max_attention_logits(q_BxTxHxA, k, pos_BxT, k_pos, seg_BxT, k_seg, block_size)
    return jnp.maximum(max_H, chunk_max_H), chunk

  start = jnp.full((q_BxTxHxA.shape[2],), -jnp.inf, jnp.float32)
  return _around_ring(visit, start, (k_BxTxKxA, pos_BxT, seg_BxT), axis_name)[0]


def ring_attention(mesh: Mesh, q_BxTxHxA, k_BxTxKxA, v_BxTxKxA, pos_BxT, seg_BxT, block_size: int,
                   return_max_logits: bool):
  """Causal attention with the sequence split over the mesh's `sequence` axis (context
  parallelism): each device keeps its queries and passes its key/value chunk around the ring,
  merging the blockwise parts by log-sum-exp, so no device ever holds the whole sequence.

  Returns (out_BxTxHxA, max_logits_H or None), laid out by the logical rules table.
  """
  seg_BxT = jnp.zeros_like(pos_BxT) if seg_BxT is None else seg_BxT
  heads = logical_to_spec(("batch", "length", "act_heads", None))
  tokens = logical_to_spec(("batch", "length"))
  spread = tuple(axis for entry in tokens if entry is not None
                 for axis in ((entry,) if isinstance(entry, str) else entry))

  def local(q, k, v, pos, seg):
    out = _ring_attention(q, k, v, pos, seg, block_size, "sequence")
    if not return_max_logits:
      return out, None
    return out, jax.lax.pmax(_ring_max_logits(q, k, pos, seg, block_size, "sequence"), spread)

  return jax.shard_map(
      local, mesh=mesh, in_specs=(heads, heads, heads, tokens, tokens),
      out_specs=(heads, logical_to_spec(("act_heads",)) if return_max_logits else None),
      check_vma=False)(q_BxTxHxA, k_BxTxKxA, v_BxTxKxA, pos_BxT, seg_BxT)


def local_attention(cfg: ModelConfig, q, k, v, positions_BxT, segment_ids_BxT, kv_cache,
                    return_max_logits: bool):
  """Attention with the whole sequence on each device, and the KV-cache decode path (the
  cache is head-major, keys [B, K, A, S] and values [B, K, S, A], as `grouped_attention`
  reads them, so a decode step reads it without a transposed copy).

  Returns (out_BxTxHxA, new kv cache or None, max_logits_H or None).
  """
  b = q.shape[0]
  if kv_cache is None:
    keys_BxSxKxA, values_BxKxSxA = k, v.swapaxes(1, 2)
    k_pos, k_seg, q_seg = positions_BxT, segment_ids_BxT, segment_ids_BxT
    new_cache = None
  else:
    rows = jnp.arange(b)[:, None]
    keys_BxKxAxS = kv_cache[0].at[rows, :, :, positions_BxT].set(k.astype(kv_cache[0].dtype))
    values_BxKxSxA = kv_cache[1].at[rows, :, positions_BxT].set(v.astype(kv_cache[1].dtype))
    new_cache = (keys_BxKxAxS, values_BxKxSxA)
    keys_BxSxKxA = keys_BxKxAxS.transpose(0, 3, 1, 2)
    s = keys_BxSxKxA.shape[1]
    k_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    k_seg = q_seg = None
  if cfg.attention == "blockwise":
    out = blockwise_attention(q, keys_BxSxKxA, values_BxKxSxA.swapaxes(1, 2), positions_BxT,
                              k_pos, q_seg, k_seg, cfg.attention_block_size)
  else:
    out = grouped_attention(q, keys_BxSxKxA.transpose(0, 2, 3, 1), values_BxKxSxA,
                            causal_mask(positions_BxT, k_pos, q_seg, k_seg))
  max_logits_H = (max_attention_logits(q, keys_BxSxKxA, positions_BxT, k_pos, q_seg, k_seg,
                                       cfg.attention_block_size)
                  if return_max_logits else None)
  return out, new_cache, max_logits_H


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

    mesh = active_mesh()
    if kv_cache is None and mesh is not None and mesh.shape.get("sequence", 1) > 1:
      out, max_logits_H = ring_attention(mesh, q, k, v, positions_BxT, segment_ids_BxT,
                                         cfg.attention_block_size, return_max_logits)
      new_cache = None
    else:
      out, new_cache, max_logits_H = local_attention(cfg, q, k, v, positions_BxT,
                                                      segment_ids_BxT, kv_cache,
                                                      return_max_logits)
    out = constrain(out, ("batch", "length", "act_heads", None)).reshape(b, t, h * d)
    y = proj(x_BxTxD.shape[-1], ("heads", "embed"), False, name="o_proj")(out)
    return y, new_cache, max_logits_H
