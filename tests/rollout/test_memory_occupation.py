"""Hybrid deployment: the engine drops its KV cache and weights from device memory and gets them
back without recompiling; the server's /release_memory_occupation and /resume_memory_occupation."""
import asyncio

import jax
import numpy as np
import pytest

from kimi_jax.rollout.engine import RolloutEngine, SamplingParams
from kimi_jax.rollout.server import BackgroundServer, RolloutServer
from kimi_jax.rollout.sglang_client import SGLangClient
from tests.rollout.test_engine import random_prompts
from tests.rollout.test_server_client import http
from tests.rollout.tiny_model import CFG, EOS, peaked_params

MAX_BATCH, MAX_SEQ_LEN = 4, 32
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)


def param_bytes(params) -> int:
  return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(params))


def cache_bytes() -> int:
  """KV cache in closed form: layers x (K, V) x rows x slots x kv heads x head dim x 4 bytes."""
  return CFG.num_layers * 2 * MAX_BATCH * MAX_SEQ_LEN * CFG.num_kv_heads * CFG.head_dim * 4


def live_bytes() -> int:
  return sum(x.nbytes for x in jax.live_arrays())


@pytest.fixture(scope="module")
def params():
  return peaked_params(0)


def test_release_frees_device_buffers_and_resume_needs_no_compile(params):
  engine = RolloutEngine(CFG, params, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN,
                         eos_token_ids=(EOS,), chunk_steps=4)
  prompts = random_prompts(3, seed=30)
  before = engine.generate(prompts, GREEDY)
  compiled = engine.num_compilations
  held, live = engine.device_bytes, live_bytes()
  assert held > param_bytes(params) + cache_bytes()  # + histories, counts, settings

  engine.release_memory(["kv_cache"])
  assert engine.released == ("kv_cache",)
  assert engine.device_bytes == param_bytes(params)
  engine.release_memory(["weights"])
  assert engine.released == ("kv_cache", "weights") and engine.device_bytes == 0
  assert live - live_bytes() == held, "every engine buffer left the device"
  with pytest.raises(ValueError, match="released: resume it first"):
    engine.submit(prompts, GREEDY)

  engine.resume_memory(["weights", "kv_cache"])
  assert engine.released == () and engine.device_bytes == held
  after = engine.generate(prompts, GREEDY)
  assert [c.output_ids for c in after] == [c.output_ids for c in before]
  assert engine.num_compilations == compiled, "no program was compiled again"


def test_weights_released_without_a_copy_come_back_through_update_weights(params):
  engine = RolloutEngine(CFG, params, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN,
                         eos_token_ids=(EOS,), chunk_steps=4)
  new_params = peaked_params(1)
  reference = RolloutEngine(CFG, new_params, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN,
                            eos_token_ids=(EOS,), chunk_steps=4)
  prompts = random_prompts(2, seed=31)
  engine.generate(prompts, GREEDY)
  engine.release_memory(keep_weights=False)
  with pytest.raises(ValueError, match="without a host copy"):
    engine.resume_memory(["weights"])
  engine.update_weights(new_params, "2")
  engine.resume_memory(["kv_cache"])
  got = engine.generate(prompts, GREEDY)
  assert [c.output_ids for c in got] == [c.output_ids for c in reference.generate(prompts, GREEDY)]
  assert {c.weight_version for c in got} == {"2"}
  with pytest.raises(ValueError, match="unknown memory tags \\['cuda_graph'\\]"):
    engine.release_memory(["cuda_graph"])


def test_server_release_and_resume_memory_occupation_without_a_tokenizer(params):
  engine = RolloutEngine(CFG, params, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN,
                         eos_token_ids=(EOS,), chunk_steps=4)
  background = BackgroundServer(RolloutServer(engine))
  url = background.url
  prompts = random_prompts(2, seed=32)

  async def scenario():
    async with SGLangClient([url]) as client:
      before = await client.generate(prompts, GREEDY)
      released = await http("POST", url, "/release_memory_occupation",
                            {"tags": ["kv_cache", "weights"]})
      held = engine.device_bytes
      refused = await http("POST", url, "/generate", {"input_ids": prompts[0]})
      health = await http("GET", url, "/health_generate")
      bad = await http("POST", url, "/resume_memory_occupation", {"tags": "weights"})
      await client.resume_memory_occupation(["weights"])
      await client.resume_memory_occupation(["kv_cache"])
      after = await client.generate(prompts, GREEDY)
      ids_only = await http("POST", url, "/generate", {"input_ids": prompts[0]})
      info = await http("GET", url, "/server_info")
      return before, released, held, refused, health, bad, after, ids_only, info

  try:
    before, released, held, refused, health, bad, after, ids_only, info = asyncio.run(scenario())
  finally:
    background.stop()
  assert released == (200, None) and held == 0
  assert refused[0] == 400 and "is released" in refused[1]["error"]["message"]
  assert health[0] == 503
  assert bad[0] == 400 and "'tags' must be null or a list of strings" in bad[1]["error"]["message"]
  assert [c.output_ids for c in after] == [c.output_ids for c in before]
  # no tokenizer: answered like SGLang's --skip-tokenizer-init (ids, no text)
  assert "text" not in ids_only[1] and ids_only[1]["output_ids"]
  assert info[1]["skip_tokenizer_init"] is True and info[1]["enable_memory_saver"] is True
