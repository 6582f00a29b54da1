"""Vision-language model: the vision tower's merged patch embeddings take the places of the image
placeholder tokens, and the decoder runs on those embeddings with M-RoPE positions.

Shapes that depend on image sizes (the patch layout, M-RoPE positions) are computed on the host
by `prepare_vlm_inputs`; `vlm_logits` and `vlm_prefill` are pure and jit-able given them.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.model.config import ModelConfig
from kimi_jax.model.mrope import image_token_counts, mrope_positions
from kimi_jax.model.transformer import KVCache, Transformer, default_positions, embed_tokens
from kimi_jax.model.vision import VisionLayout, VisionTower, check_grid, vision_layout


class VLMInputs(NamedTuple):
  """Everything image-shaped a batch of prompts with images needs (a pytree of arrays)."""

  pixel_values_OxE: np.ndarray  # all images' patches in order, then zero rows of padding
  layout: VisionLayout
  rope_positions_3xBxT: np.ndarray
  rope_delta_B: np.ndarray  # rope position - sequence index for tokens after the prompt


def check_images(config: ModelConfig, tokens_BxT, pixel_values_OxE, image_grid_thw) -> None:
  """ValueError unless the pixel rows and the image tokens match `image_grid_thw`."""
  vision = config.vision
  counts = image_token_counts(vision, image_grid_thw)
  patches = int(counts.sum()) * vision.merge_unit
  if tuple(pixel_values_OxE.shape) != (patches, vision.patch_features):
    raise ValueError(f"pixel_values shape {tuple(pixel_values_OxE.shape)}: image_grid_thw "
                     f"needs ({patches}, {vision.patch_features})")
  image_tokens = int((np.asarray(tokens_BxT) == vision.image_token_id).sum())
  if image_tokens != counts.sum():
    raise ValueError(f"tokens hold {image_tokens} image tokens (id {vision.image_token_id}); "
                     f"image_grid_thw needs {int(counts.sum())}")


def prepare_vlm_inputs(config: ModelConfig, tokens_BxT, pixel_values, image_grid_thw,
                       lengths_B=None, segment_ids_BxT=None,
                       num_patches: int | None = None) -> VLMInputs:
  """Host-side inputs for `tokens_BxT` (host array) whose image token runs take the images of
  `image_grid_thw` (rows (t, h, w)) and `pixel_values` ([patches, C*T*P*P]) in order, row
  after row (None and None: no images). Only the first lengths_B[b] tokens of row b are the
  prompt; packed rows give `segment_ids_BxT`. `num_patches` pads the patch sequence so one
  compiled program serves many image sizes."""
  if config.vision is None:
    raise ValueError("ModelConfig.vision is None: this model has no vision tower")
  grid = check_grid(config.vision, image_grid_thw)
  if pixel_values is None:
    pixel_values = np.zeros((0, config.vision.patch_features), np.float32)
  check_images(config, tokens_BxT, pixel_values, grid)
  positions, deltas = mrope_positions(config.vision, tokens_BxT, grid, lengths_B, segment_ids_BxT)
  layout = vision_layout(config.vision, grid, num_patches)
  padding = ((0, len(layout.frame_ids_O) - len(pixel_values)), (0, 0))
  return VLMInputs(np.pad(np.asarray(pixel_values, np.float32), padding), layout, positions, deltas)


def encode_images(config: ModelConfig, params, pixel_values_OxE, layout: VisionLayout) -> jax.Array:
  """Merged image embeddings [O / merge_unit, hidden], images in layout order."""
  if pixel_values_OxE.shape[0] == 0:  # a batch without images
    return jnp.zeros((0, config.hidden_size), jnp.dtype(config.dtype))
  return VisionTower(config).apply({"params": params["visual"]}, pixel_values_OxE, layout)


def embed_with_images(config: ModelConfig, params, tokens_BxT, image_embeds_MxD) -> jax.Array:
  """Token embeddings [B, T, D] with the k-th image token (row-major) replaced by row k of
  `image_embeds_MxD`."""
  dtype = jnp.dtype(config.dtype)
  text_BxTxD = embed_tokens(params["embed_tokens"]["embedding"], tokens_BxT, dtype)
  if image_embeds_MxD.shape[0] == 0:
    return text_BxTxD
  is_image_BxT = tokens_BxT == config.vision.image_token_id
  index_BxT = jnp.cumsum(is_image_BxT.reshape(-1)).reshape(tokens_BxT.shape) - 1
  image_BxTxD = jnp.take(image_embeds_MxD.astype(dtype),
                         jnp.clip(index_BxT, 0, image_embeds_MxD.shape[0] - 1), axis=0)
  return jnp.where(is_image_BxT[..., None], image_BxTxD, text_BxTxD)


def _embeds(config: ModelConfig, params, tokens_BxT, inputs: VLMInputs) -> jax.Array:
  image_embeds = encode_images(config, params, inputs.pixel_values_OxE, inputs.layout)
  return embed_with_images(config, params, tokens_BxT, image_embeds)


def vlm_logits(config: ModelConfig, params, tokens_BxT, inputs: VLMInputs, positions_BxT=None,
               segment_ids_BxT=None, return_max_logits: bool = False):
  """Full forward of rows with images -> logits_BxTxV (float32), or (logits, max_logits_LxH).

  `positions_BxT` order each row (default 0..T-1; packed rows restart them per segment)."""
  positions_BxT = default_positions(tokens_BxT) if positions_BxT is None else positions_BxT
  logits, _, max_logits_LxH = Transformer(config, return_max_logits).apply(
      {"params": params}, tokens_BxT, positions_BxT, segment_ids_BxT, None,
      _embeds(config, params, tokens_BxT, inputs), inputs.rope_positions_3xBxT)
  return (logits, max_logits_LxH) if return_max_logits else logits


def vlm_prefill(config: ModelConfig, params, tokens_BxT, inputs: VLMInputs, kv_cache: KVCache):
  """Cached forward of right-padded prompts with images into slots 0..T-1, the vision tower
  running once per image -> (logits_BxTxV, new_kv_cache). Decode then continues with
  `decode_lm(..., slots_BxT, cache, rope_positions=slots_BxT + inputs.rope_delta_B[:, None])`."""
  logits, new_cache, _ = Transformer(config).apply(
      {"params": params}, tokens_BxT, default_positions(tokens_BxT), None, kv_cache,
      _embeds(config, params, tokens_BxT, inputs), inputs.rope_positions_3xBxT)
  return logits, new_cache


_jit_vlm_logits = jax.jit(vlm_logits, static_argnums=0)


def apply_vlm(config: ModelConfig, params, tokens_BxT, pixel_values, image_grid_thw) -> jax.Array:
  """Logits_BxTxV (float32) of prompts with images, in the HF processor's layout:
  `pixel_values` [num_patches, C*2*14*14] of all images in order, `image_grid_thw` one
  (t, h, w) patch-grid row per image. Tokens and grid must be host values; the forward is
  compiled once per shape."""
  inputs = prepare_vlm_inputs(config, tokens_BxT, pixel_values, image_grid_thw)
  return _jit_vlm_logits(config, params, jnp.asarray(tokens_BxT), inputs)
