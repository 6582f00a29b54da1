"""One frozen configuration for the Qwen2, Llama and Qwen3 decoder families."""
import dataclasses

ARCHITECTURES = ("qwen2", "llama", "qwen3")
ATTENTION_IMPLS = ("dot_product", "blockwise")

# How the model is run rather than what it computes: not stored in HF checkpoints, so a run's
# own choice applies to any checkpoint it loads.
EXECUTION_FIELDS = ("dtype", "attention", "attention_block_size", "remat")


def with_execution(config: "ModelConfig", fields) -> "ModelConfig":
  """`config` run as `fields` says: the EXECUTION_FIELDS present in the mapping `fields` (a
  ModelConfig's asdict, or an experiment's `model` section) replace config's."""
  return dataclasses.replace(config, **{f: fields[f] for f in EXECUTION_FIELDS if f in fields})


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

  def __post_init__(self):
    def require(ok, field, why):
      if not ok:
        raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: {why}")

    require(self.architecture in ARCHITECTURES, "architecture", f"must be one of {ARCHITECTURES}")
    require(self.attention in ATTENTION_IMPLS, "attention", f"must be one of {ATTENTION_IMPLS}")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "attention_block_size"):
      require(getattr(self, field) > 0, field, "must be positive")
    require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
            f"must divide num_heads={self.num_heads}")
    require(self.head_dim % 2 == 0, "head_dim", "must be even for rotary embeddings")
    require(self.rope_theta > 0, "rope_theta", "must be positive")

  @property
  def num_params(self) -> int:
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0)
    attn += 2 * self.head_dim if self.qk_norm else 0
    layer = attn + 3 * d * f + 2 * d
    return v * d * (1 if self.tie_embeddings else 2) + self.num_layers * layer + d
