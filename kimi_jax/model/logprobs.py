"""Per-token log-probabilities of a batch's targets under the LM (or the VLM, for batches that
carry image fields: see `kimi_jax.data.image_batches`).

The policy is the model's distribution without `ModelConfig.unsampled_token_ids` (a VLM's
vision special tokens): the rollout engine samples from `policy_logits` too, so the trainer's
log-probs of sampled tokens are the sampler's.
"""
import jax
import jax.numpy as jnp

from kimi_jax.model.config import ModelConfig
from kimi_jax.model.transformer import Transformer, apply_lm, default_positions, embed_tokens
from kimi_jax.model.vision import VisionLayout
from kimi_jax.model.vlm import encode_images


# exp(-1e9 - max) is exactly 0 in float32: masked tokens get no probability, and their log-prob
# stays finite, so a loss mask of 0 on a masked target (an image pad of a prompt) gives 0, not NaN.
MASKED_LOGIT = -1e9


def policy_logits(config: ModelConfig, logits_xV: jax.Array) -> jax.Array:
  """Logits [..., V] with the ids the policy never emits set to MASKED_LOGIT."""
  ids = jnp.asarray(config.unsampled_token_ids, jnp.int32)
  return logits_xV.at[..., ids].set(MASKED_LOGIT)


def _vlm_logits(config: ModelConfig, params, batch, return_max_logits: bool):
  """Logits of rows whose images are batch-major: each row's patches are encoded on their own
  (attention cost grows with the row's patches, not the batch's) and row b's k-th `image_mask`
  token takes row b's k-th merged patch embedding."""
  tokens_BxT, image_BxT = batch["tokens"], batch["image_mask"]
  dtype = jnp.dtype(config.dtype)
  encode_row = lambda pixels_OxE, hw_Ox2, frames_O, windows_O: encode_images(
      config, params, pixels_OxE, VisionLayout(hw_Ox2, frames_O, windows_O))
  merged_BxMxD = jax.vmap(encode_row)(batch["pixel_values"], batch["hw_positions"],
                                      batch["frame_ids"], batch["window_ids"]).astype(dtype)
  index_BxT = jnp.clip(jnp.cumsum(image_BxT, axis=1) - 1, 0, merged_BxMxD.shape[1] - 1)
  image_BxTxD = jnp.take_along_axis(merged_BxMxD, index_BxT[..., None], axis=1)
  text_BxTxD = embed_tokens(params["embed_tokens"]["embedding"], tokens_BxT, dtype)
  embeds_BxTxD = jnp.where(image_BxT[..., None], image_BxTxD, text_BxTxD)
  positions = batch.get("positions")
  logits, _, max_logits = Transformer(config, return_max_logits).apply(
      {"params": params}, tokens_BxT,
      default_positions(tokens_BxT) if positions is None else positions, batch.get("segment_ids"),
      None, embeds_BxTxD, jnp.moveaxis(batch["rope_positions"], 1, 0))
  return (logits, max_logits) if return_max_logits else logits


def token_logprobs(config: ModelConfig, params, batch, return_max_logits: bool = False):
  """log p(targets_BxT | prefix) under `params`, float32 [B, T] (and max_logits_LxH)."""
  if "pixel_values" in batch:
    out = _vlm_logits(config, params, batch, return_max_logits)
  else:
    out = apply_lm(config, params, batch["tokens"], batch.get("positions"),
                   batch.get("segment_ids"), return_max_logits=return_max_logits)
  logits_BxTxV, max_logits_LxH = out if return_max_logits else (out, None)
  # target logit - logsumexp: the same value as log_softmax's target entry, but no [B, T, V]
  # log-prob array to differentiate (XLA:CPU ran the gradient 1.7x faster, measured).
  logits_BxTxV = policy_logits(config, logits_BxTxV)
  target_BxT = jnp.take_along_axis(logits_BxTxV, batch["targets"][..., None], axis=-1)[..., 0]
  logp_BxT = target_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1)
  return (logp_BxT, max_logits_LxH) if return_max_logits else logp_BxT
