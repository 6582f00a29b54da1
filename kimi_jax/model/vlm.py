"""Vision-language model: the vision tower's merged patch embeddings take the places of the image
placeholder tokens, and the decoder runs on those embeddings with M-RoPE positions.

Shapes that depend on image sizes (the patch layout, M-RoPE positions) are computed on the host
by `prepare_vlm_inputs`; `vlm_logits` and `vlm_prefill` are pure and jit-able given them.
After `vlm_prefill`, decode with `decode_lm(..., positions_BxT, cache, rope_positions=
positions_BxT + rope_delta_B[:, None])`.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.model.config import ModelConfig
from kimi_jax.model.mrope import image_token_counts, mrope_positions
from kimi_jax.model.transformer import KVCache, Transformer, default_positions
from kimi_jax.model.vision import VisionLayout, VisionTower, check_grid, vision_layout


class VLMInputs(NamedTuple):
  """Host-computed inputs of a batch of prompts with images."""

  layout: VisionLayout
  rope_positions_3xBxT: np.ndarray
  rope_delta_B: np.ndarray  # rope position - sequence index for tokens after the prompt


def prepare_vlm_inputs(config: ModelConfig, tokens_BxT, image_grid_thw, lengths_B=None,
                       num_patches: int | None = None) -> VLMInputs:
  """Patch layout and M-RoPE positions for `tokens_BxT` (host array) whose image token runs
  take the images of `image_grid_thw` in order; only the first lengths_B[b] tokens of row b
  are the prompt. `num_patches` pads the patch sequence (to reuse one compiled shape)."""
  if config.vision is None:
    raise ValueError("ModelConfig.vision is None: this model has no vision tower")
  grid = check_grid(config.vision, image_grid_thw)
  positions, deltas = mrope_positions(config.vision, tokens_BxT, grid, lengths_B)
  return VLMInputs(vision_layout(config.vision, grid, num_patches), positions, deltas)


def encode_images(config: ModelConfig, params, pixel_values_NxF, layout: VisionLayout) -> jax.Array:
  """Merged image embeddings [N / merge_unit, hidden], images in layout order."""
  if pixel_values_NxF.shape[0] == 0:  # a batch without images
    return jnp.zeros((0, config.hidden_size), jnp.dtype(config.dtype))
  return VisionTower(config).apply({"params": params["visual"]}, pixel_values_NxF, layout)


def embed_with_images(config: ModelConfig, params, tokens_BxT, image_embeds_MxD) -> jax.Array:
  """Token embeddings [B, T, D] with the k-th image token (row-major) replaced by row k of
  `image_embeds_MxD`."""
  dtype = jnp.dtype(config.dtype)
  text_BxTxD = jnp.take(params["embed_tokens"]["embedding"].astype(dtype), tokens_BxT, axis=0)
  if image_embeds_MxD.shape[0] == 0:
    return text_BxTxD
  is_image_BxT = tokens_BxT == config.vision.image_token_id
  index_BxT = jnp.cumsum(is_image_BxT.reshape(-1)).reshape(tokens_BxT.shape) - 1
  image_BxTxD = jnp.take(image_embeds_MxD.astype(dtype),
                         jnp.clip(index_BxT, 0, image_embeds_MxD.shape[0] - 1), axis=0)
  return jnp.where(is_image_BxT[..., None], image_BxTxD, text_BxTxD)


def vlm_logits(config: ModelConfig, params, tokens_BxT, pixel_values_NxF, layout: VisionLayout,
               rope_positions_3xBxT, segment_ids_BxT=None) -> jax.Array:
  """Full forward of prompts with images -> logits_BxTxV (float32)."""
  embeds = embed_with_images(config, params, tokens_BxT,
                             encode_images(config, params, pixel_values_NxF, layout))
  logits, _, _ = Transformer(config).apply(
      {"params": params}, tokens_BxT, default_positions(tokens_BxT), segment_ids_BxT, None, embeds,
      rope_positions_3xBxT)
  return logits


def vlm_prefill(config: ModelConfig, params, tokens_BxT, pixel_values_NxF, layout: VisionLayout,
                rope_positions_3xBxT, kv_cache: KVCache):
  """Cached forward of prompts with images into slots 0..T-1 (the vision tower runs once per
  image) -> (logits_BxTxV, new_kv_cache)."""
  embeds = embed_with_images(config, params, tokens_BxT,
                             encode_images(config, params, pixel_values_NxF, layout))
  logits, new_cache, _ = Transformer(config).apply(
      {"params": params}, tokens_BxT, default_positions(tokens_BxT), None, kv_cache, embeds,
      rope_positions_3xBxT)
  return logits, new_cache


_jit_vlm_logits = jax.jit(vlm_logits, static_argnums=0)


def check_images(config: ModelConfig, tokens_BxT, pixel_values_NxF, image_grid_thw) -> None:
  """ValueError unless the pixel rows and the image tokens match `image_grid_thw`."""
  vision = config.vision
  counts = image_token_counts(vision, image_grid_thw)
  patches = int(counts.sum()) * vision.merge_unit
  if tuple(pixel_values_NxF.shape) != (patches, vision.patch_features):
    raise ValueError(f"pixel_values shape {tuple(pixel_values_NxF.shape)}: image_grid_thw "
                     f"needs ({patches}, {vision.patch_features})")
  image_tokens = int((np.asarray(tokens_BxT) == vision.image_token_id).sum())
  if image_tokens != counts.sum():
    raise ValueError(f"tokens hold {image_tokens} image tokens (id {vision.image_token_id}); "
                     f"image_grid_thw needs {int(counts.sum())}")


def apply_vlm(config: ModelConfig, params, tokens_BxT, pixel_values, image_grid_thw) -> jax.Array:
  """Logits_BxTxV (float32) of prompts with images, in the HF processor's layout:
  `pixel_values` [num_patches, C*2*14*14] of all images in order, `image_grid_thw` one
  (t, h, w) patch-grid row per image. Tokens and grid must be host values; the forward is
  compiled once per shape."""
  if config.vision is None:
    raise ValueError("ModelConfig.vision is None: this model has no vision tower")
  if pixel_values is None:
    pixel_values = np.zeros((0, config.vision.patch_features), np.float32)
  check_images(config, tokens_BxT, pixel_values, image_grid_thw)
  inputs = prepare_vlm_inputs(config, tokens_BxT, image_grid_thw)
  return _jit_vlm_logits(config, params, jnp.asarray(tokens_BxT), jnp.asarray(pixel_values),
                         inputs.layout, jnp.asarray(inputs.rope_positions_3xBxT))
