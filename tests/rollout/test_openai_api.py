"""The official `openai` client against RolloutServer's /v1 endpoints, on a tiny Qwen2 checkpoint
with a byte-level BPE tokenizer and a Qwen-style chat template. References: transformers'
apply_chat_template for the prompt, a float64 greedy loop over the full forward for the answer."""
import asyncio
import functools

import jax
import numpy as np
import openai
import pytest
import transformers

from kimi_jax.checkpointing.hf import load_hf
from kimi_jax.data.tokenizer import load_tokenizer
from kimi_jax.model import apply_lm
from kimi_jax.rollout.engine import RolloutEngine
from kimi_jax.rollout.server import BackgroundServer, RolloutServer
from tests.hf_checkpoints import save_tiny_qwen2_checkpoint
from tests.rollout.test_server_client import http
from tests.rollout.tiny_model import log_softmax

# float32 KV-cached decode vs a float64 softmax of full-forward float32 logits.
LOGPROB_ATOL = 1e-5
MAX_SEQ_LEN = 96
MESSAGES = [{"role": "user", "content": "6 * 7 ="}]


class Served:
  pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("qwen2_bpe"))
  save_tiny_qwen2_checkpoint(path, seed=3)
  config, params = load_hf(path)
  tokenizer = load_tokenizer(path)
  engine = RolloutEngine(config, params, max_batch=4, max_seq_len=MAX_SEQ_LEN,
                         eos_token_ids=tokenizer.eos_ids, chunk_steps=4,
                         detokenize=tokenizer.decode)
  background = BackgroundServer(RolloutServer(engine, tokenizer=tokenizer, model_path=path))
  s = Served()
  s.url, s.path, s.config, s.params, s.eos = background.url, path, config, params, tokenizer.eos_ids
  s.hf = transformers.PreTrainedTokenizerFast.from_pretrained(path)
  s.client = openai.OpenAI(base_url=background.url + "/v1", api_key="unused", max_retries=0)
  yield s
  s.client.close()
  background.stop()


@functools.partial(jax.jit, static_argnums=0)
def _logits(config, params, tokens):
  return apply_lm(config, params, tokens)


def greedy(served, prompt, max_new, temperature=1.0):
  """(output ids, their log_softmax(logits / T)) decoded one token at a time, float64."""
  seq, out, logps = list(prompt), [], []
  while len(out) < max_new:
    padded = np.zeros((1, MAX_SEQ_LEN), np.int32)
    padded[0, :len(seq)] = seq
    logp = log_softmax(np.asarray(_logits(served.config, served.params, padded), np.float64)[0, len(seq) - 1] / temperature)
    token = int(np.argmax(logp))
    seq.append(token), out.append(token), logps.append(logp)
    if token in served.eos:
      break
  return out, logps


def chat_prompt(served, messages):
  text = served.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  return served.hf(text, add_special_tokens=False).input_ids


def test_models_lists_the_served_checkpoint(served):
  assert [m.id for m in served.client.models.list().data] == [served.path]


def test_chat_completion_uses_the_checkpoint_template(served):
  reply = served.client.chat.completions.create(
      model=served.path, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
      top_logprobs=2)
  prompt = chat_prompt(served, MESSAGES)
  out, logps = greedy(served, prompt, 6)
  choice = reply.choices[0]
  assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == len(out)
  assert choice.message.role == "assistant"
  assert choice.message.content == served.hf.decode(out, skip_special_tokens=True)
  assert choice.finish_reason == ("stop" if out[-1] in served.eos else "length")
  for entry, token, logp in zip(choice.logprobs.content, out, logps):
    assert entry.token == served.hf.decode([token])
    np.testing.assert_allclose(entry.logprob, logp[token], atol=LOGPROB_ATOL)
    assert [t.token for t in entry.top_logprobs][0] == entry.token, "greedy takes the top token"
    np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], np.sort(logp)[::-1][:2],
                               atol=LOGPROB_ATOL)


def test_completions_take_text_and_token_prompts(served):
  texts = ["The answer is", "def solve():"]
  reply = served.client.completions.create(
      model=served.path, prompt=texts, max_tokens=5, temperature=0, logprobs=1)
  ids_reply = served.client.completions.create(
      model=served.path, prompt=served.hf(texts[0], add_special_tokens=False).input_ids,
      max_tokens=5, temperature=0)
  prompts = [served.hf(t, add_special_tokens=False).input_ids for t in texts]
  refs = [greedy(served, p, 5) for p in prompts]
  assert [c.text for c in reply.choices] == [served.hf.decode(o, skip_special_tokens=True)
                                             for o, _ in refs]
  assert ids_reply.choices[0].text == reply.choices[0].text
  assert reply.usage.prompt_tokens == sum(map(len, prompts))
  assert reply.usage.completion_tokens == sum(len(o) for o, _ in refs)
  for choice, (out, logps) in zip(reply.choices, refs):
    np.testing.assert_allclose(choice.logprobs.token_logprobs,
                               [lp[t] for t, lp in zip(out, logps)], atol=LOGPROB_ATOL)
    assert choice.logprobs.tokens == [served.hf.decode([t]) for t in out]


def test_streaming_deltas_add_up_to_the_answer(served):
  whole = served.client.chat.completions.create(model=served.path, messages=MESSAGES,
                                                max_tokens=12, temperature=0)
  chunks = list(served.client.chat.completions.create(
      model=served.path, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
      stream_options={"include_usage": True}))
  content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert content == whole.choices[0].message.content
  assert chunks[0].choices[0].delta.role == "assistant"
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
      whole.choices[0].finish_reason
  assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
  text_chunks = list(served.client.completions.create(
      model=served.path, prompt="The answer is", max_tokens=8, temperature=0, stream=True))
  text = served.client.completions.create(model=served.path, prompt="The answer is",
                                          max_tokens=8, temperature=0).choices[0].text
  assert "".join(c.choices[0].text for c in text_chunks) == text


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), "SamplingParams.temperature"),
    (dict(logit_bias={"5": 1.0}), "'logit_bias'"),
    (dict(top_logprobs=3), "'top_logprobs' needs 'logprobs': true"),
    (dict(response_format={"type": "json_object"}), "'response_format'"),
])
def test_bad_chat_requests_are_400_naming_the_field(served, kwargs, message):
  with pytest.raises(openai.BadRequestError) as error:
    served.client.chat.completions.create(model=served.path, messages=MESSAGES, max_tokens=2,
                                          **kwargs)
  assert message in str(error.value)


def test_stop_strings_through_chat(served):
  whole = served.client.chat.completions.create(model=served.path, messages=MESSAGES,
                                                max_tokens=12, temperature=0, stop=None)
  text = whole.choices[0].message.content
  if len(text) < 4:
    pytest.fail(f"the tiny model's answer {text!r} is too short to cut")
  stop = text[2:4]
  cut = served.client.chat.completions.create(model=served.path, messages=MESSAGES,
                                              max_tokens=12, temperature=0, stop=[stop])
  assert cut.choices[0].message.content == text[:text.find(stop)]
  assert cut.choices[0].finish_reason == "stop"
  status, raw = asyncio.run(http("POST", served.url, "/v1/chat/completions", {
      "model": served.path, "messages": MESSAGES, "max_tokens": 12, "temperature": 0,
      "stop": stop}))
  assert status == 200 and raw["choices"][0]["matched_stop"] == stop
