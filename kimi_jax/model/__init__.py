"""Flax decoder LM matching Hugging Face Qwen2 / Llama / Qwen3 weight for weight, and the
Qwen2-VL / Qwen2.5-VL vision-language model around it."""
from kimi_jax.model.config import ModelConfig, VisionConfig
from kimi_jax.model.transformer import (apply_lm, decode_lm, init_kv_cache, init_params,
                                        param_logical_specs)
from kimi_jax.model.vlm import VLMInputs, apply_vlm, prepare_vlm_inputs, vlm_logits, vlm_prefill

__all__ = ["ModelConfig", "VLMInputs", "VisionConfig", "apply_lm", "apply_vlm", "decode_lm",
           "init_kv_cache", "init_params", "param_logical_specs", "prepare_vlm_inputs",
           "vlm_logits", "vlm_prefill"]
