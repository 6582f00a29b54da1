"""SGLang's penalties, min_new_tokens and stop strings in RolloutEngine, against float64
step-by-step full-forward references on the tiny LM."""
import string

import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.data.tokenizer import char_tokenizer
from kimi_jax.rollout.engine import RolloutEngine, SamplingParams
from kimi_jax.rollout.sampling import penalized_logits
from tests.rollout.test_engine import random_prompts
from tests.rollout.tiny_model import (CFG, EOS, greedy_penalized_reference, peaked_params,
                                      penalized)

# float32 KV-cached decode vs a float64 softmax of full-forward float32 logits.
LOGPROB_ATOL = 1e-5
MAX_SEQ_LEN = 40
TOKENIZER = char_tokenizer((string.ascii_letters + string.digits)[:CFG.vocab_size - 4])


@pytest.fixture(scope="module")
def params():
  return peaked_params(0)


@pytest.fixture(scope="module")
def engine(params):
  return RolloutEngine(CFG, params, max_batch=4, max_seq_len=MAX_SEQ_LEN, eos_token_ids=(EOS,),
                       chunk_steps=8, detokenize=TOKENIZER.decode)


def test_penalized_logits_match_float64_reference():
  rng = np.random.default_rng(0)
  logits_BxV = rng.normal(0, 3, (4, 30))
  outputs = [rng.integers(0, 30, n).tolist() for n in (0, 5, 12, 3)]
  counts_BxV = np.stack([np.bincount(o, minlength=30) for o in outputs])
  settings = [(1.0, 0.0, 0.0), (1.5, 0.0, 0.0), (0.7, 0.5, -0.3), (1.2, -1.0, 2.0)]
  suppress_BxJ = np.array([[-1, -1], [4, -1], [-1, 7], [2, 29]])
  rep, freq, pres = (jnp.asarray(c, jnp.float32) for c in zip(*settings))
  got = np.asarray(penalized_logits(jnp.asarray(logits_BxV, jnp.float32), jnp.asarray(counts_BxV),
                                    rep, freq, pres, jnp.asarray(suppress_BxJ)))
  for row, (r, f, p) in enumerate(settings):
    want = penalized(logits_BxV[row], outputs[row], r, f, p,
                     [t for t in suppress_BxJ[row] if t >= 0])
    np.testing.assert_allclose(got[row], want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("repetition,frequency,presence", [
    (1.8, 0.0, 0.0), (1.0, 1.5, 0.0), (1.0, 0.0, 2.0), (0.6, -0.5, 0.7)])
def test_penalties_equal_the_stepwise_reference(engine, params, repetition, frequency, presence):
  prompts = random_prompts(3, seed=20)
  sampling = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True,
                            repetition_penalty=repetition, frequency_penalty=frequency,
                            presence_penalty=presence)
  plain = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=16,
                                                  ignore_eos=True))
  got = engine.generate(prompts, sampling)
  for prompt, c in zip(prompts, got):
    out, logp, reason = greedy_penalized_reference(params, prompt, 16, set(), repetition,
                                                   frequency, presence, max_seq_len=MAX_SEQ_LEN)
    assert c.output_ids == out and c.finish_reason == reason
    np.testing.assert_allclose(c.logprobs, logp, atol=LOGPROB_ATOL)
  assert [c.output_ids for c in got] != [c.output_ids for c in plain], "penalties change samples"


def test_min_new_tokens_holds_back_stop_ids(engine, params):
  prompts = random_prompts(3, seed=21)
  plain = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=12,
                                                  ignore_eos=True))
  for prompt, c in zip(prompts, plain):
    stop = c.output_ids[1]  # greedy would stop at the second token
    got = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=12,
                                                   stop_token_ids=[stop], min_new_tokens=6))[0]
    out, logp, reason = greedy_penalized_reference(params, prompt, 12, {stop, EOS}, min_new=6,
                                                   max_seq_len=MAX_SEQ_LEN)
    assert got.output_ids == out and got.finish_reason == reason
    np.testing.assert_allclose(got.logprobs, logp, atol=LOGPROB_ATOL)
    assert len(got.output_ids) >= 6 and stop not in got.output_ids[:6]


def test_stop_strings_end_the_sample_at_the_completing_token(engine):
  prompts = random_prompts(4, seed=22)
  plain = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=20,
                                                  ignore_eos=True))
  stops = [TOKENIZER.decode(c.output_ids[5:8]) for c in plain]
  sampling = [SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True,
                             stop=["never-produced", s]) for s in stops]
  got = engine.generate(prompts, sampling)
  for c, whole, stop in zip(got, plain, stops):
    end = next(k for k in range(1, 21) if stop in TOKENIZER.decode(whole.output_ids[:k]))
    assert c.output_ids == whole.output_ids[:end] and c.logprobs == whole.logprobs[:end]
    assert c.finish_reason == {"type": "stop", "matched": stop}
  after = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=20,
                                                  ignore_eos=True))
  assert [c.output_ids for c in after] == [c.output_ids for c in plain], "rows were released"


def test_stop_strings_need_a_tokenizer(params):
  bare = RolloutEngine(CFG, params, max_batch=1, max_seq_len=MAX_SEQ_LEN)
  with pytest.raises(ValueError, match="sampling\\[0\\].stop: stop strings need a tokenizer"):
    bare.submit([[3, 4]], SamplingParams(stop=["ab"]))
