"""Flax decoder LM matching Hugging Face Qwen2 / Llama / Qwen3 weight for weight."""
from kimi_jax.model.config import ModelConfig
from kimi_jax.model.transformer import (apply_lm, decode_lm, init_kv_cache, init_params,
                                        param_logical_specs)

__all__ = ["ModelConfig", "apply_lm", "decode_lm", "init_kv_cache", "init_params",
           "param_logical_specs"]
