"""Frozen configurations: the Qwen2 / Llama / Qwen3 decoder, and the Qwen2-VL / Qwen2.5-VL
vision tower that a decoder may carry."""
import dataclasses
import functools
from collections.abc import Mapping

ARCHITECTURES = ("qwen2", "llama", "qwen3")
ATTENTION_IMPLS = ("dot_product", "blockwise")
VISION_ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl")
VISION_ACTIVATIONS = ("quick_gelu", "gelu", "silu")

# How the model is run rather than what it computes: not stored in HF checkpoints, so a run's
# own choice applies to any checkpoint it loads.
EXECUTION_FIELDS = ("dtype", "attention", "attention_block_size", "remat")


def with_execution(config: "ModelConfig", fields) -> "ModelConfig":
  """`config` run as `fields` says: the EXECUTION_FIELDS present in the mapping `fields` (a
  ModelConfig's asdict, or an experiment's `model` section) replace config's."""
  return dataclasses.replace(config, **{f: fields[f] for f in EXECUTION_FIELDS if f in fields})


def _require(config, ok: bool, field: str, why: str) -> None:
  if not ok:
    raise ValueError(f"{type(config).__name__}.{field}={getattr(config, field)!r}: {why}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Native-resolution ViT (Qwen2-VL family): 2D-RoPE blocks over 14x14x2 patches, then a 2x2
  patch merger into the LM's hidden size.

  `architecture` fixes the block type: "qwen2_vl" uses LayerNorm and a plain MLP with
  `hidden_act`; "qwen2_5_vl" uses RMSNorm, a gated (SwiGLU-style) MLP with biases, and window
  attention (windows of `window_size` pixels) except in `fullatt_block_indexes`.
  """

  depth: int
  hidden_size: int  # ViT width
  num_heads: int
  intermediate_size: int  # MLP width inside a block
  out_hidden_size: int  # the LM's hidden size, which the merger projects to
  architecture: str = "qwen2_vl"
  hidden_act: str = "quick_gelu"
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  in_channels: int = 3
  rope_theta: float = 10000.0
  window_size: int = 0  # pixels; 0: no window attention (qwen2_vl)
  fullatt_block_indexes: tuple[int, ...] = ()
  tokens_per_second: int = 4  # video temporal spacing in HF; images never use it, export keeps it
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653

  def __post_init__(self):
    object.__setattr__(self, "fullatt_block_indexes", tuple(self.fullatt_block_indexes))
    require = functools.partial(_require, self)
    require(self.architecture in VISION_ARCHITECTURES, "architecture",
            f"must be one of {VISION_ARCHITECTURES}")
    require(self.hidden_act in VISION_ACTIVATIONS, "hidden_act", f"must be one of {VISION_ACTIVATIONS}")
    for field in ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size",
                  "patch_size", "temporal_patch_size", "spatial_merge_size", "in_channels"):
      require(getattr(self, field) > 0, field, "must be positive")
    require(self.hidden_size % self.num_heads == 0, "num_heads",
            f"must divide hidden_size={self.hidden_size}")
    require(self.head_dim % 4 == 0, "num_heads",
            f"head_dim={self.head_dim} must be a multiple of 4 for the 2D (h, w) rotary embedding")
    if self.architecture == "qwen2_vl":
      require(self.window_size == 0, "window_size", "qwen2_vl has no window attention; use 0")
    else:
      require(self.window_size >= self.patch_size * self.spatial_merge_size, "window_size",
              f"must cover at least one merged patch ({self.patch_size * self.spatial_merge_size} "
              "pixels)")
    require(all(0 <= i < self.depth for i in self.fullatt_block_indexes), "fullatt_block_indexes",
            f"must index blocks 0..{self.depth - 1}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_features(self) -> int:
    """Length of one flattened patch, C * temporal_patch * patch * patch."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def merge_unit(self) -> int:
    """Patches merged into one LM token."""
    return self.spatial_merge_size ** 2

  @property
  def window_merged_patches(self) -> int:
    """Window side in merged patches (0 when there are no windows)."""
    return self.window_size // (self.patch_size * self.spatial_merge_size)

  @property
  def num_params(self) -> int:
    d, f, merged = self.hidden_size, self.intermediate_size, self.hidden_size * self.merge_unit
    gated = self.architecture == "qwen2_5_vl"
    norm = d if gated else 2 * d  # RMSNorm has no bias
    mlp = (3 * d * f + 2 * f + d) if gated else (2 * d * f + f + d)
    block = 2 * norm + 4 * d * d + 4 * d + mlp
    merger = norm + merged * merged + merged + merged * self.out_hidden_size + self.out_hidden_size
    return self.patch_features * d + self.depth * block + merger


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder LM hyper-parameters; field names follow the HF config they map to."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  architecture: str = "qwen2"
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = False
  qk_norm: bool = False
  tie_embeddings: bool = False
  max_position_embeddings: int = 4096
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  dtype: str = "float32"  # activations and matmuls
  param_dtype: str = "float32"
  attention: str = "dot_product"
  attention_block_size: int = 512  # query block of the blockwise and ring attention paths
  remat: bool = False
  # Multimodal RoPE: the rotary half-dim split into (temporal, height, width) sections, each
  # rotated by its own row of 3-row positions. None: ordinary 1D RoPE.
  mrope_section: tuple[int, ...] | None = None
  vision: VisionConfig | None = None  # an image tower feeding this decoder (VLM)

  def __post_init__(self):
    if self.mrope_section is not None:
      object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
    if isinstance(self.vision, Mapping):
      object.__setattr__(self, "vision", VisionConfig(**self.vision))
    require = functools.partial(_require, self)
    require(self.architecture in ARCHITECTURES, "architecture", f"must be one of {ARCHITECTURES}")
    require(self.attention in ATTENTION_IMPLS, "attention", f"must be one of {ATTENTION_IMPLS}")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "attention_block_size"):
      require(getattr(self, field) > 0, field, "must be positive")
    require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
            f"must divide num_heads={self.num_heads}")
    require(self.head_dim % 2 == 0, "head_dim", "must be even for rotary embeddings")
    require(self.rope_theta > 0, "rope_theta", "must be positive")
    if self.mrope_section is not None:
      require(len(self.mrope_section) == 3 and sum(self.mrope_section) == self.head_dim // 2,
              "mrope_section", f"must be 3 sections summing to head_dim // 2 = {self.head_dim // 2}")
    if self.vision is not None:
      require(self.mrope_section is not None, "mrope_section", "a model with vision needs M-RoPE")
      require(self.vision.out_hidden_size == self.hidden_size, "vision",
              f"out_hidden_size must equal hidden_size={self.hidden_size}")

  @property
  def unsampled_token_ids(self) -> tuple[int, ...]:
    """Ids a policy never emits: a VLM's vision special tokens (image and video pads, vision
    start and end) that exist in its vocabulary. A sampled image pad would become an image slot
    once the response is fed back as a prompt (a partial rollout resumed by re-prefill)."""
    if self.vision is None:
      return ()
    v = self.vision
    ids = (v.image_token_id, v.video_token_id, v.vision_start_token_id, v.vision_end_token_id)
    return tuple(i for i in ids if 0 <= i < self.vocab_size)

  @property
  def num_params(self) -> int:
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0)
    attn += 2 * self.head_dim if self.qk_norm else 0
    layer = attn + 3 * d * f + 2 * d
    vision = 0 if self.vision is None else self.vision.num_params
    return v * d * (1 if self.tie_embeddings else 2) + self.num_layers * layer + d + vision
