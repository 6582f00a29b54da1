"""The rollout server under hostile input and engine faults: each bad request gets one clear
answer, and nothing wedges the engine, poisons later requests or breaks JSON.

`FUZZ_CASES` is the table (request -> expected status and message); after the whole table
the server must still be healthy and serve. The served model's max_position_embeddings (96)
is below the engine's max_seq_len (128), so the context length comes from the model.
"""
import asyncio
import dataclasses
import json
import os
import threading
import time

import aiohttp
import jax
import numpy as np
import pytest

from kimi_jax.checkpointing.hf import save_hf
from kimi_jax.rollout.engine import RolloutEngine
from kimi_jax.rollout.server import BackgroundServer, RolloutServer
from tests.rollout.tiny_model import CFG, EOS, greedy_reference, peaked_params

MODEL = dataclasses.replace(CFG, max_position_embeddings=96)
MAX_SEQ_LEN = 128
CONTEXT = 96
MAX_SAMPLES = 64
TIMEOUT = aiohttp.ClientTimeout(total=60)  # a wedged server fails the test instead of hanging
DEEP = 100_000  # nesting depth far beyond the JSON parser's recursion limit


@dataclasses.dataclass
class Served:
  url: str
  server: RolloutServer
  background: BackgroundServer
  params: dict
  path: str

  def swap_weights(self, params, version: str) -> None:
    """The worker's weight swap, issued on the server's event loop like a handler would."""
    async def swap():
      await self.server.worker.swap_weights(params, version)
    asyncio.run_coroutine_threadsafe(swap(), self.background._loop).result(60)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  params = peaked_params(0)
  path = str(tmp_path_factory.mktemp("model"))
  save_hf(path, MODEL, params)
  engine = RolloutEngine(MODEL, params, max_batch=4, max_seq_len=MAX_SEQ_LEN,
                         eos_token_ids=(EOS,), chunk_steps=4, weight_version="good")
  server = RolloutServer(engine, model_path=path, max_samples_per_request=MAX_SAMPLES)
  background = BackgroundServer(server)
  yield Served(background.url, server, background, params, path)
  background.stop()


async def call(url, method, path, body=None, raw: bytes | None = None):
  """(status, content type, body text) of one request."""
  data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
  async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
    async with session.request(method, url + path, data=data,
                               headers={"Content-Type": "application/json"}) as response:
      return response.status, response.content_type, await response.text()


def strict_json(text: str):
  """json.loads that refuses NaN and Infinity, which are not JSON."""
  def refuse(name):
    raise ValueError(f"bare {name} in JSON")
  return json.loads(text, parse_constant=refuse)


def generate(prompt, **sampling):
  return {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 4,
                                                    **sampling}}


P = [5, 6, 7]
# (name, path, JSON body or raw bytes, expected status, expected part of the error message)
FUZZ_CASES = [
    ("invalid_utf8", "/generate", b'{"input_ids": [3], "rid": "\xff\xfe"}', 400, "not UTF-8"),
    ("nested_arrays", "/generate", b"[" * DEEP + b"]" * DEEP, 400, "nested too deeply"),
    ("nested_in_field", "/generate",
     b'{"input_ids": ' + b"[" * DEEP + b"]" * DEEP + b"}", 400, "nested too deeply"),
    ("nan_literal", "/generate",
     b'{"input_ids": [3], "sampling_params": {"temperature": NaN}}', 400, "NaN"),
    ("infinity_literal", "/generate",
     b'{"input_ids": [3], "sampling_params": {"temperature": Infinity}}', 400, "Infinity"),
    ("temperature_overflows_to_inf", "/generate",
     b'{"input_ids": [3], "sampling_params": {"temperature": 1e999}}', 400, "finite"),
    ("top_p_overflows_to_inf", "/generate",
     b'{"input_ids": [3], "sampling_params": {"top_p": -1e999}}', 400, "top_p"),
    ("stream_as_string", "/generate", {**generate(P), "stream": "false"}, 400, "'stream'"),
    ("return_logprob_as_string", "/generate", {**generate(P), "return_logprob": "no"}, 400,
     "'return_logprob'"),
    ("return_logprob_list_of_strings", "/generate",
     {"input_ids": [P, P], "return_logprob": ["no", "yes"]}, 400, "'return_logprob'"),
    ("abort_all_as_string", "/abort_request", {"abort_all": "no"}, 400, "'abort_all'"),
    ("abort_all_requests_as_string", "/update_weights_from_disk",
     {"model_path": "/nonexistent", "abort_all_requests": "yes"}, 400, "'abort_all_requests'"),
    ("max_new_tokens_2_31", "/generate", generate(P, max_new_tokens=2**31), 400,
     "max_new_tokens"),
    ("top_k_2_31", "/generate", generate(P, top_k=2**31), 400, "top_k"),
    ("n_2_31", "/generate", generate(P, n=2**31), 400, "SamplingParams.n"),
    ("stop_id_2_31", "/generate", generate(P, stop_token_ids=[2**31]), 400, "stop_token_ids"),
    ("stop_id_outside_vocab", "/generate", generate(P, stop_token_ids=[CFG.vocab_size]), 400,
     "outside the vocabulary"),
    ("seed_beyond_64_bits", "/generate", generate(P, sampling_seed=2**64), 400, "seed"),
    ("prompt_id_2_31", "/generate", {"input_ids": [2**31]}, 400, "outside [0, 64)"),
    ("n_20000", "/generate", generate(P, n=20000), 400, "at most 64"),
    ("batch_times_n_over_cap", "/generate",
     {"input_ids": [P] * 20, "sampling_params": {"n": 4, "max_new_tokens": 1}}, 400,
     "80 samples"),
    ("prompt_fills_context", "/generate", generate([5] * CONTEXT), 400,
     f"context_length={CONTEXT}"),
    ("prompt_between_model_and_engine_length", "/generate", generate([5] * 100), 400,
     f"context_length={CONTEXT}"),
    ("max_new_tokens_past_context", "/generate", generate(P, max_new_tokens=CONTEXT), 400,
     f"at most {CONTEXT - len(P)} new tokens fit"),
    # Controls: well-formed requests at the edges are served.
    ("areal_top_k_1e8", "/generate", generate(P, top_k=1e8, temperature=1.0), 200, None),
    ("max_new_tokens_exactly_fits", "/generate",
     generate(P, max_new_tokens=CONTEXT - len(P), stop_token_ids=[]), 200, None),
    ("stream_false", "/generate", {**generate(P), "stream": False}, 200, None),
    ("return_logprob_null", "/generate", {**generate(P), "return_logprob": None}, 200, None),
    ("n_at_cap", "/generate", generate(P, n=MAX_SAMPLES, max_new_tokens=1), 200, None),
    ("abort_all_false", "/abort_request", {"abort_all": False, "rid": "none"}, 200, None),
]


@pytest.mark.parametrize("name, path, body, status, message", FUZZ_CASES,
                         ids=[case[0] for case in FUZZ_CASES])
def test_fuzz_case(served, name, path, body, status, message):
  raw = body if isinstance(body, bytes) else None
  got, content_type, text = asyncio.run(call(served.url, "POST", path, body, raw))
  assert got == status, text[:500]
  if message is not None:
    assert content_type == "application/json"
    answer = strict_json(text)
    error = answer["error"]["message"] if "error" in answer else answer["message"]
    assert message in error, error


def test_server_is_healthy_and_serves_after_the_table(served):
  for name, path, body, _, _ in FUZZ_CASES:
    raw = body if isinstance(body, bytes) else None
    asyncio.run(call(served.url, "POST", path, body, raw))
  status, _, _ = asyncio.run(call(served.url, "GET", "/health"))
  assert status == 200
  status, _, text = asyncio.run(call(served.url, "POST", "/generate",
                                     generate(P, max_new_tokens=6, ignore_eos=True)))
  expected, _, _ = greedy_reference(served.params, [P], [6], [set()], 0, 0, MAX_SEQ_LEN)
  assert status == 200 and strict_json(text)["output_ids"] == expected[0]


def test_server_info_reports_the_model_context_length(served):
  status, _, text = asyncio.run(call(served.url, "GET", "/server_info"))
  assert status == 200 and strict_json(text)["context_length"] == CONTEXT


def test_engine_failure_fails_its_requests_and_health_is_red_until_reset(served, monkeypatch):
  engine = served.server.engine
  real_step, real_reset = engine.step, engine.reset
  reset_may_finish = threading.Event()

  def failing_step(*args, **kwargs):
    monkeypatch.setattr(engine, "step", real_step)  # fail once
    raise RuntimeError("injected device failure")

  def slow_reset(message):
    reset_may_finish.wait(30)
    return real_reset(message)

  monkeypatch.setattr(engine, "step", failing_step)
  monkeypatch.setattr(engine, "reset", slow_reset)
  status, _, text = asyncio.run(call(served.url, "POST", "/generate", generate(P)))
  assert status == 500 and "injected device failure" in strict_json(text)["error"]["message"]
  assert asyncio.run(call(served.url, "GET", "/health"))[0] == 503
  reset_may_finish.set()
  deadline = time.monotonic() + 30
  while asyncio.run(call(served.url, "GET", "/health"))[0] != 200:
    assert time.monotonic() < deadline, "health never turned green after the reset"
    time.sleep(0.05)
  status, _, text = asyncio.run(call(served.url, "POST", "/generate",
                                     generate(P, max_new_tokens=6, ignore_eos=True)))
  expected, _, _ = greedy_reference(served.params, [P], [6], [set()], 0, 0, MAX_SEQ_LEN)
  assert status == 200 and strict_json(text)["output_ids"] == expected[0]


def test_streaming_request_gets_the_engine_failure_as_an_error_event(served, monkeypatch):
  engine = served.server.engine
  real_step = engine.step

  def failing_step(*args, **kwargs):
    monkeypatch.setattr(engine, "step", real_step)
    raise RuntimeError("injected stream failure")

  monkeypatch.setattr(engine, "step", failing_step)
  status, _, text = asyncio.run(call(served.url, "POST", "/generate",
                                     {**generate(P), "stream": True}))
  events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
  assert status == 200 and events[-1] == "[DONE]"
  assert "injected stream failure" in strict_json(events[-2])["error"]["message"]


def _with_nan(params, leaf_index: int):
  """(params with one NaN in leaf `leaf_index`, that leaf's path)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  path, leaf = leaves[leaf_index]
  poisoned = np.array(leaf, np.float32)
  poisoned.flat[0] = np.nan
  values = [poisoned if i == leaf_index else np.asarray(x) for i, (_, x) in enumerate(leaves)]
  return jax.tree_util.tree_unflatten(treedef, values), jax.tree_util.keystr(path)


def test_non_finite_weights_are_rejected_naming_the_tensor(served, tmp_path):
  poisoned, tensor = _with_nan(served.params, 3)
  save_hf(str(tmp_path), MODEL, poisoned)
  status, _, text = asyncio.run(call(served.url, "POST", "/update_weights_from_disk",
                                     {"model_path": str(tmp_path), "weight_version": "nan"}))
  answer = strict_json(text)
  assert status == 400 and answer["success"] is False
  assert tensor in answer["message"] and "NaN" in answer["message"]
  _, _, info = asyncio.run(call(served.url, "GET", "/model_info"))
  assert strict_json(info)["weight_version"] == "good"


def test_corrupt_safetensors_is_a_json_failure(served, tmp_path):
  save_hf(str(tmp_path), MODEL, served.params)
  [weights] = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
  with open(tmp_path / weights, "r+b") as f:
    f.write(b"\xff" * 64)  # the header length and the start of the header: garbage
  status, content_type, text = asyncio.run(call(served.url, "POST", "/update_weights_from_disk",
                                                {"model_path": str(tmp_path)}))
  assert (status, content_type) == (400, "application/json")
  answer = strict_json(text)
  assert answer["success"] is False and "Failed to load" in answer["message"]


def test_weight_swap_leaves_nothing_of_earlier_weights_behind(served):
  # NaN weights pushed in-process (a diverged trainer) fill the KV rows with NaN; after good
  # weights come back, shorter requests in the same rows must equal a fresh model's answers.
  poisoned, _ = _with_nan(served.params, 0)
  poisoned = jax.tree_util.tree_map(lambda x: np.full_like(x, np.nan), poisoned)
  long_prompts = [[4 + i] * 20 for i in range(4)]
  short_prompts = [[9, 10 + i] for i in range(4)]
  served.swap_weights(poisoned, "nan")
  status, _, text = asyncio.run(call(served.url, "POST", "/generate", {
      "input_ids": long_prompts, "return_logprob": True,
      "sampling_params": {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}}))
  assert status == 200
  answers = strict_json(text)  # JSON without bare NaN: log-probs that are NaN come back null
  assert all(lp is None for a in answers for lp, _, _ in a["meta_info"]["output_token_logprobs"])
  served.swap_weights(served.params, "good")
  status, _, text = asyncio.run(call(served.url, "POST", "/generate", {
      "input_ids": short_prompts,
      "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}}))
  expected, _, _ = greedy_reference(served.params, short_prompts, [8] * 4, [set()] * 4, 0, 0,
                                    MAX_SEQ_LEN)
  assert status == 200 and [a["output_ids"] for a in strict_json(text)] == expected


def test_a_disconnected_client_has_its_request_aborted(served):
  async def scenario():
    await call(served.url, "POST", "/pause_generation", {"mode": "in_place"})
    try:
      pending = asyncio.ensure_future(call(served.url, "POST", "/generate",
                                           generate(P, max_new_tokens=50)))
      deadline = time.monotonic() + 30
      while strict_json((await call(served.url, "GET", "/get_load"))[2])[0]["num_reqs"] != 1:
        assert time.monotonic() < deadline, "the request never arrived"
        await asyncio.sleep(0.02)
      pending.cancel()  # the client hangs up while its request waits in the paused engine
      engine = served.server.engine
      while (strict_json((await call(served.url, "GET", "/get_load"))[2])[0]["num_reqs"]
             or engine.num_queued + engine.num_running):
        assert time.monotonic() < deadline, "the disconnected client's request is still open"
        await asyncio.sleep(0.02)
    finally:
      await call(served.url, "POST", "/continue_generation")

  asyncio.run(scenario())
