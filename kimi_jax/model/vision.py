"""Native-resolution vision tower (Qwen2-VL / Qwen2.5-VL) and the patch layout it runs on.

Images of any size are packed along one patch sequence, in the HF processor's order: per image
and frame, patches in merge-block-major order (each 2x2 merge block's patches are adjacent).
The host describes that sequence once (`vision_layout`: each patch's (h, w) grid position, its
frame and its attention window); the tower then attends within frames (or windows) through
segment masks, so no image sees another and nothing is padded to a square.

Qwen2.5-VL's window attention needs no reordering here: HF permutes patches window by window
(and back after the merger) so its variable-length kernels see contiguous windows; a mask on
window ids gives the same attention with the patches left in the processor's order.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from kimi_jax.model.attention import segment_attention
from kimi_jax.model.config import ModelConfig, VisionConfig
from kimi_jax.model.layers import Dense, LayerNorm, RMSNorm, apply_rotary, inverse_frequencies

_NORM_EPS = 1e-6  # fixed in the HF vision tower
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
}


class VisionLayout(NamedTuple):
  """Per-patch facts of a packed patch sequence of O patches (host numpy arrays).

  Padding patches (past the real images) have frame and window id -1: they only see each other.
  """

  hw_positions_Ox2: np.ndarray  # (row, column) of the patch in its image's patch grid
  frame_ids_O: np.ndarray  # full attention within a frame (one per image for still images)
  window_ids_O: np.ndarray  # window attention within a window (Qwen2.5-VL)


def check_grid(vision: VisionConfig, image_grid_thw) -> np.ndarray:
  """image_grid_thw (None: no images) as an int [num_images, 3] array, or a ValueError naming
  the bad row."""
  grid = np.asarray([] if image_grid_thw is None else image_grid_thw, np.int64).reshape(-1, 3)
  m = vision.spatial_merge_size
  for i, (t, h, w) in enumerate(grid):
    if t < 1 or h < 1 or w < 1 or h % m or w % m:
      raise ValueError(f"image_grid_thw[{i}]=({t}, {h}, {w}): t must be >= 1 and h, w positive "
                       f"multiples of spatial_merge_size={m}")
  return grid


def vision_layout(vision: VisionConfig, image_grid_thw, num_patches: int | None = None) -> VisionLayout:
  """Layout of the patches of images with grid rows (t, h, w) packed in order, padded to
  `num_patches` (a multiple of the merge unit) when given."""
  grid = check_grid(vision, image_grid_thw)
  m, side = vision.spatial_merge_size, vision.window_merged_patches
  hw, frames, windows = [], [], []
  frame_id = window_id = 0
  for t, h, w in grid:
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block_major = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    rows, cols = block_major(rows), block_major(cols)
    if side:  # window of a patch: its merge block's (row, column) divided by the window side
      window_rc = (rows // m // side) * (-(-(w // m) // side)) + (cols // m // side)
    else:
      window_rc = np.zeros_like(rows)
    for _ in range(t):
      hw.append(np.stack([rows, cols], axis=-1))
      frames.append(np.full(h * w, frame_id))
      windows.append(window_id + window_rc)
      frame_id += 1
      window_id += int(window_rc.max()) + 1
  layout = VisionLayout(np.concatenate([np.zeros((0, 2))] + hw).astype(np.int32),
                        np.concatenate([np.zeros(0)] + frames).astype(np.int32),
                        np.concatenate([np.zeros(0)] + windows).astype(np.int32))
  real = layout.frame_ids_O.shape[0]
  if num_patches is None or num_patches == real:
    return layout
  if num_patches < real or num_patches % vision.merge_unit:
    raise ValueError(f"num_patches={num_patches}: must be >= the {real} patches of the images "
                     f"and a multiple of {vision.merge_unit}")
  pad = num_patches - real
  return VisionLayout(np.pad(layout.hw_positions_Ox2, ((0, pad), (0, 0))),
                      np.pad(layout.frame_ids_O, (0, pad), constant_values=-1),
                      np.pad(layout.window_ids_O, (0, pad), constant_values=-1))


def _norm(vision: VisionConfig, dtype, param_dtype, name: str):
  if vision.architecture == "qwen2_vl":
    return LayerNorm(_NORM_EPS, dtype, param_dtype, name=name)
  return RMSNorm(_NORM_EPS, dtype, param_dtype, name=name)


class VisionAttention(nn.Module):
  """Fused-qkv multi-head attention with 2D RoPE, bidirectional within segments."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_1xOxD, angles_1xOxHalf, segment_ids_1xO):
    cfg, vision = self.config, self.config.vision
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    n, d, h = x_1xOxD.shape[1], vision.hidden_size, vision.num_heads
    qkv = Dense(3 * d, ("embed", "heads"), True, dtype, pdtype, name="qkv")(x_1xOxD)
    q, k, v = jnp.moveaxis(qkv.reshape(1, n, 3, h, d // h), 2, 0)
    q, k = apply_rotary(q, angles_1xOxHalf), apply_rotary(k, angles_1xOxHalf)
    out = segment_attention(q, k, v, segment_ids_1xO, cfg.attention, cfg.attention_block_size)
    return Dense(d, ("heads", "embed"), True, dtype, pdtype, name="proj")(out.reshape(1, n, d))


class VisionMLP(nn.Module):
  """fc2(act(fc1 x)) for Qwen2-VL; down(act(gate x) * up x), all with biases, for Qwen2.5-VL."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_1xOxD):
    cfg, vision = self.config, self.config.vision
    dense = lambda name, feats, axes: Dense(feats, axes, True, jnp.dtype(cfg.dtype),
                                            jnp.dtype(cfg.param_dtype), name=name)
    act = _ACTIVATIONS[vision.hidden_act]
    d, f = vision.hidden_size, vision.intermediate_size
    if vision.architecture == "qwen2_vl":
      return dense("fc2", d, ("mlp", "embed"))(act(dense("fc1", f, ("embed", "mlp"))(x_1xOxD)))
    hidden = act(dense("gate_proj", f, ("embed", "mlp"))(x_1xOxD)) * dense(
        "up_proj", f, ("embed", "mlp"))(x_1xOxD)
    return dense("down_proj", d, ("mlp", "embed"))(hidden)


class VisionBlock(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_1xOxD, angles_1xOxHalf, segment_ids_1xO):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    normed = _norm(cfg.vision, dtype, pdtype, "norm1")(x_1xOxD)
    x_1xOxD = x_1xOxD + VisionAttention(cfg, name="attn")(normed, angles_1xOxHalf, segment_ids_1xO)
    normed = _norm(cfg.vision, dtype, pdtype, "norm2")(x_1xOxD)
    return x_1xOxD + VisionMLP(cfg, name="mlp")(normed)


class PatchMerger(nn.Module):
  """Norm each patch, concatenate each merge block's patches, 2-layer GELU MLP to LM width."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_OxD):
    cfg, vision = self.config, self.config.vision
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    merged = vision.hidden_size * vision.merge_unit
    x_MxF = _norm(vision, dtype, pdtype, "ln_q")(x_OxD).reshape(-1, merged)
    x_MxF = Dense(merged, ("embed", "mlp"), True, dtype, pdtype, name="mlp_0")(x_MxF)
    x_MxF = jax.nn.gelu(x_MxF, approximate=False)
    return Dense(vision.out_hidden_size, ("mlp", "embed"), True, dtype, pdtype, name="mlp_2")(x_MxF)


def vision_rotary_angles(vision: VisionConfig, hw_positions_Ox2) -> jax.Array:
  """2D RoPE angles [O, head_dim // 2]: row angles then column angles, each over head_dim // 4
  frequencies of a head_dim // 2 rotary base."""
  inv_freq = inverse_frequencies(vision.head_dim // 2, vision.rope_theta)
  angles_Ox2xQuarter = hw_positions_Ox2.astype(jnp.float32)[..., None] * inv_freq
  return angles_Ox2xQuarter.reshape(angles_Ox2xQuarter.shape[0], -1)


class VisionTower(nn.Module):
  """Flattened patches [O, C*T*P*P] -> merged image embeddings [O / merge_unit, LM hidden].

  The patch embedding is HF's Conv3d with stride == kernel, i.e. one dense layer on the
  flattened (C, T, P, P) patch.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, pixels_OxE, layout: VisionLayout):
    cfg, vision = self.config, self.config.vision
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    x_1xOxD = Dense(vision.hidden_size, ("patch", "embed"), False, dtype, pdtype,
                    name="patch_embed")(pixels_OxE)[None]
    angles_1xOxHalf = vision_rotary_angles(vision, jnp.asarray(layout.hw_positions_Ox2))[None]
    frames_1xO = jnp.asarray(layout.frame_ids_O)[None]
    windows_1xO = jnp.asarray(layout.window_ids_O)[None]
    block_cls = nn.remat(VisionBlock) if cfg.remat else VisionBlock
    for i in range(vision.depth):
      windowed = vision.window_size > 0 and i not in vision.fullatt_block_indexes
      x_1xOxD = block_cls(cfg, name=f"blocks_{i}")(x_1xOxD, angles_1xOxHalf,
                                                   windows_1xO if windowed else frames_1xO)
    return PatchMerger(cfg, name="merger")(x_1xOxD[0])
