"""The engine on prompts with images agrees with full forwards of the VLM (apply_vlm).

Every greedy token is the argmax of the full forward over prompt + the tokens before it, and
its log-prob equals that forward's log_softmax within 1e-4 (float32; cached decode and the full
forward sum in different orders), both over the vocabulary without the vision special tokens (a
VLM policy never emits them). Prompts of one prefill program mix images of different sizes,
text-only prompts and several samples sharing one prompt's images.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.data import image_prompts, rendered
from kimi_jax.model import ModelConfig, apply_vlm, init_params
from kimi_jax.rollout.engine import RolloutEngine, SamplingParams
from tests.tiny_vlm import encoded, model, tokenizer

ATOL = 1e-4


def full_forward_logprobs(config, params, prompts, outputs):
  """Per prompt, log_softmax of apply_vlm's logits over prompt + output at the positions that
  predict the output tokens, the vision tokens' logits set to -inf: [len(output), V]. One
  batched call; rows are right-padded with the pad id 0 (causal, so padding never changes
  earlier logits)."""
  rows = [list(p.ids) + list(o) for p, o in zip(prompts, outputs)]
  tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  batch = image_prompts.concat_images([p.images for p in prompts])
  logits = apply_vlm(config, params, tokens, batch.pixel_values, batch.image_grid_thw)
  logits = np.array(logits, np.float32)
  logits[..., list(image_prompts.vision_token_ids(tokenizer()))] = -np.inf
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
  return [logp[i, len(p.ids) - 1:len(p.ids) - 1 + len(o)]
          for i, (p, o) in enumerate(zip(prompts, outputs))]


def test_greedy_equals_full_forward():
  config, params = model()
  chart = rendered.render_chart((3, 8, 1, 5), rendered.ChartLayout())
  prompts = [
      encoded("A+C=", [chart]),
      encoded(rendered.ARITH_INSTRUCTION, [rendered.render_text("7+5-3=", 6)]),
      encoded("B=", [rendered.render_text("12", 4), chart]),  # two images
      encoded("1+2=", []),  # text only
  ]
  engine = RolloutEngine(config, params, max_batch=8, max_seq_len=96)
  sampling = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True, n=2)
  completions = engine.generate([p.ids for p in prompts], sampling,
                                images=[p.images for p in prompts])
  assert engine.num_compilations.get("prefill_images") == 1  # one program held them all
  firsts, seconds = completions[::2], completions[1::2]
  assert [c.output_ids for c in firsts] == [c.output_ids for c in seconds]
  logps = full_forward_logprobs(config, params, prompts, [c.output_ids for c in firsts])
  for i, (completion, logp_TxV) in enumerate(zip(firsts, logps)):
    assert len(completion.output_ids) == 6
    # Greedy: every token is the full forward's argmax given the tokens before it.
    assert completion.output_ids == logp_TxV.argmax(axis=-1).tolist(), i
    np.testing.assert_allclose(completion.logprobs, logp_TxV.max(axis=-1), atol=ATOL, rtol=0)
  assert len({tuple(c.output_ids) for c in completions[::2]}) > 1  # prompts are told apart


def test_images_checked_against_the_prompt():
  config, params = model()
  engine = RolloutEngine(config, params, max_batch=2, max_seq_len=96)
  one = encoded("B=", [rendered.render_text("12", 4)])
  two = encoded("B=", [rendered.render_text("12", 4), rendered.render_text("3", 4)])
  sampling = SamplingParams(max_new_tokens=2)
  with pytest.raises(ValueError, match=r"prompts\[1\]: .*image"):
    engine.submit([one.ids, one.ids], sampling, images=[one.images, two.images])
  with pytest.raises(ValueError, match=r"prompts\[0\]: .*image"):
    engine.submit([one.ids], sampling)  # image pads without images
  with pytest.raises(ValueError, match="ends with an image token"):
    engine.submit([one.ids[:-3]], sampling, images=[one.images])
  text_config = ModelConfig(vocab_size=config.vocab_size, hidden_size=32, intermediate_size=64,
                            num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)
  text_engine = RolloutEngine(text_config, jax.jit(init_params, static_argnums=0)(
                                  text_config, jax.random.key(1)),
                              max_batch=2, max_seq_len=96)
  with pytest.raises(ValueError, match="no vision tower"):
    text_engine.submit([one.ids], sampling, images=[one.images])
