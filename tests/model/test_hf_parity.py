"""Our LM against transformers (torch CPU) on tiny random Qwen2 / Llama / Qwen3 models."""
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from kimi_jax.checkpointing import hf
from kimi_jax.model import apply_lm, decode_lm, init_kv_cache
from tests.model.hf_reference import hf_logits, tiny_hf_model

# float32 end to end; 1e-4 absolute is the bar (observed differences are ~1e-6,
# coming from summation order in matmuls and softmax).
ATOL = 1e-4
ARCHS = [("qwen2", False), ("llama", False), ("qwen3", False), ("qwen2", True)]


@pytest.fixture(scope="module", params=ARCHS, ids=lambda a: f"{a[0]}{'-tied' if a[1] else ''}")
def checkpoint(request, tmp_path_factory):
  arch, tie = request.param
  model = tiny_hf_model(arch, tie)
  path = str(tmp_path_factory.mktemp(f"hf_{arch}_{tie}"))
  model.save_pretrained(path)
  config, params = hf.load_hf(path)
  tokens_BxT = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12))
  return model, config, params, tokens_BxT


def test_config_fields_follow_architecture(checkpoint):
  model, config, _, _ = checkpoint
  assert config.architecture == model.config.model_type
  assert config.qkv_bias == (config.architecture == "qwen2")
  assert config.qk_norm == (config.architecture == "qwen3")
  assert config.tie_embeddings == model.config.tie_word_embeddings
  assert config.rope_theta == 5000.0


def test_full_forward_matches_transformers(checkpoint):
  model, config, params, tokens = checkpoint
  ours = np.asarray(apply_lm(config, params, jnp.asarray(tokens)))
  np.testing.assert_allclose(ours, hf_logits(model, tokens), atol=ATOL, rtol=0)


def test_kv_cache_decode_matches_transformers(checkpoint):
  model, config, params, tokens = checkpoint
  b, t = tokens.shape
  prompt = 5
  cache = init_kv_cache(config, b, 16)
  positions = jnp.broadcast_to(jnp.arange(prompt), (b, prompt))
  logits, cache = decode_lm(config, params, jnp.asarray(tokens[:, :prompt]), positions, cache)
  steps = [logits]
  for i in range(prompt, t):
    logits, cache = decode_lm(config, params, jnp.asarray(tokens[:, i:i + 1]),
                              jnp.full((b, 1), i), cache)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), hf_logits(model, tokens),
                             atol=ATOL, rtol=0)


def test_export_then_transformers_load_gives_same_logits(checkpoint, tmp_path):
  _, config, params, tokens = checkpoint
  hf.save_hf(str(tmp_path), config, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
  ours = np.asarray(apply_lm(config, params, jnp.asarray(tokens)))
  np.testing.assert_allclose(hf_logits(reloaded, tokens), ours, atol=ATOL, rtol=0)
