"""Tiny random transformers models (torch CPU) as independent references for parity tests."""
import torch
import transformers

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
            rms_norm_eps=1e-6, rope_theta=5000.0)
_CLASSES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}


def tiny_hf_model(arch: str, tie: bool = False, seed: int = 0):
  config_cls, model_cls = _CLASSES[arch]
  kwargs = dict(TINY, tie_word_embeddings=tie)
  kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta")}
  torch.manual_seed(seed)
  model = model_cls(config_cls(**kwargs)).float().eval()
  with torch.no_grad():  # random (not zero) biases and norm scales, so they are really tested
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
  return model


def hf_logits(model, tokens_BxT):
  with torch.no_grad():
    return model(torch.as_tensor(tokens_BxT)).logits.numpy()
