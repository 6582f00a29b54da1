"""The decoder LM (Linen) and its pure functional entry points."""
import jax
import jax.numpy as jnp
from flax import linen as nn

from kimi_jax.model.attention import Attention
from kimi_jax.model.config import ModelConfig
from kimi_jax.model.layers import Dense, RMSNorm, SwiGLU
from kimi_jax.sharding.rules import check_sequence_split, constrain

KVCache = tuple  # per layer: (keys_BxSxKxD, values_BxSxKxD); slot index == position


class DecoderLayer(nn.Module):
  config: ModelConfig
  return_max_logits: bool

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, kv_cache):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    normed = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="input_norm")(x_BxTxD)
    attn_out, new_cache, max_logits_H = Attention(cfg, name="attn")(
        normed, positions_BxT, segment_ids_BxT, kv_cache, self.return_max_logits)
    x_BxTxD = x_BxTxD + attn_out
    normed = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="post_attn_norm")(x_BxTxD)
    x_BxTxD = x_BxTxD + SwiGLU(cfg.intermediate_size, dtype, pdtype, name="mlp")(normed)
    return constrain(x_BxTxD, ("batch", "length", "act_embed")), new_cache, max_logits_H


class Transformer(nn.Module):
  """Returns (logits_BxTxV float32, new KV caches or None, max_logits_LxH or None)."""

  config: ModelConfig
  return_max_logits: bool = False

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT=None, kv_caches=None):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    check_sequence_split(tokens_BxT.shape[1])
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=pdtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                 ("vocab", "embed")),
                     name="embed_tokens")
    x_BxTxD = constrain(embed(tokens_BxT), ("batch", "length", "act_embed"))
    layer_cls = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
    new_caches, max_logits = [], []
    for i in range(cfg.num_layers):
      cache = None if kv_caches is None else kv_caches[i]
      x_BxTxD, new_cache, max_logits_H = layer_cls(cfg, self.return_max_logits, name=f"layers_{i}")(
          x_BxTxD, positions_BxT, segment_ids_BxT, cache)
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


def default_positions(tokens_BxT):
  return jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)


def init_params(config: ModelConfig, rng: jax.Array):
  """Random parameters (unboxed arrays)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed = Transformer(config).init(rng, tokens, default_positions(tokens))["params"]
  return nn.meta.unbox(boxed)


def param_logical_specs(config: ModelConfig):
  """PartitionSpec tree of logical axis names, matching `init_params`' tree."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(
      lambda: Transformer(config).init(jax.random.key(0), tokens, default_positions(tokens)))
  return nn.get_partition_spec(abstract)["params"]


def apply_lm(config: ModelConfig, params, tokens_BxT, positions_BxT=None, segment_ids_BxT=None,
             return_max_logits: bool = False):
  """Full forward. Returns logits_BxTxV (float32), or (logits, max_logits_LxH) on request."""
  positions_BxT = default_positions(tokens_BxT) if positions_BxT is None else positions_BxT
  logits, _, max_logits_LxH = Transformer(config, return_max_logits).apply(
      {"params": params}, tokens_BxT, positions_BxT, segment_ids_BxT)
  return (logits, max_logits_LxH) if return_max_logits else logits


def init_kv_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  shape = (batch, max_len, config.num_kv_heads, config.head_dim)
  dtype = jnp.dtype(config.dtype if dtype is None else dtype)
  return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers))


def decode_lm(config: ModelConfig, params, tokens_BxT, positions_BxT, kv_cache: KVCache):
  """Cached forward: writes k/v at `positions_BxT` (per row) and attends to slots <= position.

  Serves both prefill (T = prompt length, right-padded rows) and one-token steps (T = 1).
  Returns (logits_BxTxV, new_kv_cache).
  """
  logits, new_cache, _ = Transformer(config).apply(
      {"params": params}, tokens_BxT, positions_BxT, None, kv_cache)
  return logits, new_cache
