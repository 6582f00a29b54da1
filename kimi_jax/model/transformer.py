"""The decoder LM (Linen) and its pure functional entry points.

A config with `vision` adds the vision tower's parameters under "visual"; the decoder ignores
them, so text-only calls take a VLM's params unchanged.
"""
import jax
import jax.numpy as jnp
from flax import linen as nn

from kimi_jax.model.attention import Attention
from kimi_jax.model.config import ModelConfig
from kimi_jax.model.layers import Dense, RMSNorm, SwiGLU
from kimi_jax.model.vision import VisionTower, vision_layout
from kimi_jax.sharding.rules import check_sequence_split, constrain

# Per layer: (keys_BxKxAxS, values_BxKxSxA), head-major, keys transposed; slot index == position.
KVCache = tuple


class DecoderLayer(nn.Module):
  config: ModelConfig
  return_max_logits: bool

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, kv_cache, rope_positions):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    normed = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="input_norm")(x_BxTxD)
    attn_out, new_cache, max_logits_H = Attention(cfg, name="attn")(
        normed, positions_BxT, segment_ids_BxT, kv_cache, self.return_max_logits, rope_positions)
    x_BxTxD = x_BxTxD + attn_out
    normed = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="post_attn_norm")(x_BxTxD)
    x_BxTxD = x_BxTxD + SwiGLU(cfg.intermediate_size, dtype, pdtype, name="mlp")(normed)
    return constrain(x_BxTxD, ("batch", "length", "act_embed")), new_cache, max_logits_H


class Transformer(nn.Module):
  """Returns (logits_BxTxV float32, new KV caches or None, max_logits_LxH or None).

  `embeds_BxTxD`, when given, replaces the token embedding lookup (a VLM passes text embeddings
  with image features in place); `rope_positions` ([B, T] or M-RoPE's [3, B, T]) rotate q/k
  instead of `positions_BxT`, which still order the sequence and address the KV cache.
  """

  config: ModelConfig
  return_max_logits: bool = False

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT=None, kv_caches=None,
               embeds_BxTxD=None, rope_positions=None):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    check_sequence_split(tokens_BxT.shape[1])
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=pdtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                 ("vocab", "embed")),
                     name="embed_tokens")
    if embeds_BxTxD is None:
      embeds_BxTxD = embed_tokens(embed.embedding, tokens_BxT, dtype)
    x_BxTxD = embeds_BxTxD.astype(dtype)
    x_BxTxD = constrain(x_BxTxD, ("batch", "length", "act_embed"))
    layer_cls = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
    new_caches, max_logits = [], []
    for i in range(cfg.num_layers):
      cache = None if kv_caches is None else kv_caches[i]
      x_BxTxD, new_cache, max_logits_H = layer_cls(cfg, self.return_max_logits, name=f"layers_{i}")(
          x_BxTxD, positions_BxT, segment_ids_BxT, cache, rope_positions)
      new_caches.append(new_cache)
      max_logits.append(max_logits_H)
    x_BxTxD = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="final_norm")(x_BxTxD)
    if cfg.tie_embeddings:
      logits = embed.attend(x_BxTxD)
    else:
      logits = Dense(cfg.vocab_size, ("embed", "vocab"), False, dtype, pdtype, name="lm_head")(x_BxTxD)
    logits_BxTxV = constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))
    return (logits_BxTxV,
            None if kv_caches is None else tuple(new_caches),
            jnp.stack(max_logits) if self.return_max_logits else None)


def embed_tokens(table_VxD, tokens_BxT, dtype) -> jax.Array:
  """Token embeddings [B, T, D] in `dtype`. The table's fsdp-sharded embed axis is gathered
  before the lookup (as FSDP gathers every weight before use): a lookup from it would give rows
  split over fsdp where the batch wants that axis, which XLA can only resolve by replicating
  the whole activation."""
  return jnp.take(constrain(table_VxD, ("vocab", None)).astype(dtype), tokens_BxT, axis=0)


def default_positions(tokens_BxT):
  return jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)


def _boxed_params(config: ModelConfig, rng: jax.Array):
  """Parameters with their logical-axis metadata: the decoder's, plus "visual" for a VLM."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  params = dict(Transformer(config).init(rng, tokens, default_positions(tokens))["params"])
  if config.vision is not None:
    vision = config.vision
    grid = [[1, vision.spatial_merge_size, vision.spatial_merge_size]]  # one merged token
    pixels = jnp.zeros((vision.merge_unit, vision.patch_features), jnp.float32)
    params["visual"] = VisionTower(config).init(jax.random.fold_in(rng, 1), pixels,
                                                vision_layout(vision, grid))["params"]
  return params


def init_params(config: ModelConfig, rng: jax.Array):
  """Random parameters (unboxed arrays)."""
  return nn.meta.unbox(_boxed_params(config, rng))


def param_logical_specs(config: ModelConfig):
  """PartitionSpec tree of logical axis names, matching `init_params`' tree."""
  abstract = jax.eval_shape(lambda: _boxed_params(config, jax.random.key(0)))
  return nn.get_partition_spec(abstract)


def apply_lm(config: ModelConfig, params, tokens_BxT, positions_BxT=None, segment_ids_BxT=None,
             return_max_logits: bool = False):
  """Full forward. Returns logits_BxTxV (float32), or (logits, max_logits_LxH) on request."""
  positions_BxT = default_positions(tokens_BxT) if positions_BxT is None else positions_BxT
  logits, _, max_logits_LxH = Transformer(config, return_max_logits).apply(
      {"params": params}, tokens_BxT, positions_BxT, segment_ids_BxT)
  return (logits, max_logits_LxH) if return_max_logits else logits


def init_kv_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  keys = (batch, config.num_kv_heads, config.head_dim, max_len)
  values = (batch, config.num_kv_heads, max_len, config.head_dim)
  dtype = jnp.dtype(config.dtype if dtype is None else dtype)
  return tuple((jnp.zeros(keys, dtype), jnp.zeros(values, dtype))
               for _ in range(config.num_layers))


def decode_lm(config: ModelConfig, params, tokens_BxT, positions_BxT, kv_cache: KVCache,
              rope_positions=None):
  """Cached forward: writes k/v at `positions_BxT` (per row) and attends to slots <= position.

  Serves both prefill (T = prompt length, right-padded rows) and one-token steps (T = 1).
  `rope_positions` rotate q/k when they differ from the slots: after a prompt with images,
  slot + rope delta (see `kimi_jax.model.vlm`). Returns (logits_BxTxV, new_kv_cache).
  """
  logits, new_cache, _ = Transformer(config).apply(
      {"params": params}, tokens_BxT, positions_BxT, None, kv_cache, None, rope_positions)
  return logits, new_cache
