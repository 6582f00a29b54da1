"""RolloutServer and SGLangClient over real HTTP on loopback, against full-forward references.

One server (engine on its worker thread) serves the module; the fault test adds a second
server process started with launch.serve and kills it mid-batch.
"""
import asyncio
import dataclasses
import json
import os
import signal
import socket
import string
import subprocess
import sys
import threading

import aiohttp
import jax
import numpy as np
import pytest

from kimi_jax.checkpointing.hf import save_hf
from kimi_jax.data.tokenizer import char_tokenizer
from kimi_jax.model import init_params
from kimi_jax.rollout.engine import RolloutEngine, SamplingParams
from kimi_jax.rollout.server import BackgroundServer, RolloutServer
from kimi_jax.rollout.sglang_client import RolloutFailure, SGLangClient
from tests.rollout.test_engine import random_prompts
from tests.rollout.tiny_model import (CFG, EOS, greedy_reference, log_softmax, peaked_params,
                                      teacher_forced_logits)

# float32 KV-cached decode vs a float64 softmax of full-forward float32 logits.
LOGPROB_ATOL = 1e-5
MAX_SEQ_LEN = 256  # room for long samples, so aborts land mid-generation
SERVER_FLAGS = ["--max_batch=8", f"--max_seq_len={MAX_SEQ_LEN}", "--chunk_steps=4"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Served:
  def __init__(self, url, params, path, tokenizer):
    self.url, self.params, self.path, self.tokenizer = url, params, path, tokenizer


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  params = peaked_params(0)
  tokenizer = char_tokenizer((string.ascii_letters + string.digits)[:CFG.vocab_size - 4])
  assert tokenizer.vocab_size == CFG.vocab_size and tokenizer.eos_id == EOS
  path = str(tmp_path_factory.mktemp("served_model"))
  save_hf(path, CFG, params)
  tokenizer.save(path)
  engine = RolloutEngine(CFG, params, max_batch=8, max_seq_len=MAX_SEQ_LEN, eos_token_ids=(EOS,),
                         chunk_steps=4, weight_version="v1", detokenize=tokenizer.decode)
  background = BackgroundServer(RolloutServer(engine, tokenizer=tokenizer, model_path=path))
  yield Served(background.url, params, path, tokenizer)
  background.stop()


async def http(method, url, path, body=None, raw: bytes | None = None):
  """(status, parsed JSON or text) of one request."""
  async with aiohttp.ClientSession() as session:
    async with session.request(method, url + path, json=None if raw is not None else body,
                               data=raw) as response:
      text = await response.text()
      is_json = response.content_type == "application/json"
      return response.status, json.loads(text) if is_json else text


def greedy(params, prompts, max_new):
  return greedy_reference(params, prompts, [max_new] * len(prompts), [{EOS}] * len(prompts), 0, 0,
                          MAX_SEQ_LEN)


def test_batch_request_groups_n_samples_and_matches_greedy_reference(served):
  prompts = random_prompts(3, seed=10)
  body = {"input_ids": prompts, "return_logprob": True,
          "sampling_params": {"temperature": 0, "max_new_tokens": 12, "n": 2}}
  status, answers = asyncio.run(http("POST", served.url, "/generate", body))
  assert status == 200 and len(answers) == 6
  ref_out, ref_logp, ref_reason = greedy(served.params, prompts, 12)
  for i, answer in enumerate(answers):
    p, meta = i // 2, answer["meta_info"]
    assert [t for _, t, _ in meta["output_token_logprobs"]] == answer["output_ids"] == ref_out[p]
    assert all(text is None for _, _, text in meta["output_token_logprobs"])
    np.testing.assert_allclose([lp for lp, _, _ in meta["output_token_logprobs"]], ref_logp[p],
                               atol=LOGPROB_ATOL)
    assert meta["finish_reason"] == ref_reason[p]
    assert (meta["prompt_tokens"], meta["completion_tokens"]) == (len(prompts[p]), len(ref_out[p]))
    assert meta["weight_version"] == "v1" and meta["e2e_latency"] > 0
    assert answer["text"] == served.tokenizer.decode(ref_out[p])


def test_client_generate_returns_trainer_consistent_logprobs(served):
  prompts = random_prompts(5, seed=11)
  sampling = [SamplingParams(temperature=0.8, top_k=10, max_new_tokens=16, n=2, seed=i)
              for i in range(5)]

  async def scenario():
    async with SGLangClient([served.url], max_concurrency=3) as client:
      return await client.generate(prompts, sampling), await client.generate(prompts, sampling)

  got, again = asyncio.run(scenario())
  assert [c.prompt_ids for c in got] == [p for p in prompts for _ in range(2)]
  assert [c.output_ids for c in got] == [c.output_ids for c in again], "seeded requests repeat"
  seqs = [c.prompt_ids + c.output_ids for c in got]
  for c, logits in zip(got, teacher_forced_logits(served.params, seqs, MAX_SEQ_LEN)):
    start = len(c.prompt_ids) - 1
    logp = log_softmax(logits[start:start + len(c.output_ids)] / 0.8)
    np.testing.assert_allclose(c.logprobs, logp[np.arange(len(c.output_ids)), c.output_ids],
                               atol=LOGPROB_ATOL)
    assert c.finish_reason["type"] in ("stop", "length") and c.weight_version == "v1"


def test_streaming_sends_cumulative_chunks_then_done(served):
  prompt = [5, 6, 7]
  body = {"input_ids": prompt, "stream": True, "return_logprob": True,
          "sampling_params": {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}}

  async def scenario():
    async with aiohttp.ClientSession() as session:
      async with session.post(served.url + "/generate", json=body) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        lines = [line.decode().strip() async for line in response.content]
    async with SGLangClient([served.url]) as client:
      streamed = [c async for _, c in client.stream(prompt, SamplingParams(
          temperature=0, max_new_tokens=20, ignore_eos=True))]
    return [line for line in lines if line], streamed

  lines, streamed = asyncio.run(scenario())
  assert lines[-1] == "data: [DONE]"
  chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
  assert len(chunks) >= 3, "several chunks: 20 tokens at 4 decode steps per chunk"
  for before, after in zip(chunks, chunks[1:]):
    assert after["output_ids"][:len(before["output_ids"])] == before["output_ids"]
    assert before["meta_info"]["finish_reason"] is None
  ref_out, _, _ = greedy_reference(served.params, [prompt], [20], [set()], 0, 0, MAX_SEQ_LEN)
  assert chunks[-1]["output_ids"] == ref_out[0]
  assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 20}
  assert streamed[-1].output_ids == ref_out[0] and streamed[-1].finish_reason["type"] == "length"
  assert all(c.finish_reason is None for c in streamed[:-1])


def test_abort_all_mid_generation_returns_partial_tokens(served):
  prompts = random_prompts(4, seed=12)
  sampling = [SamplingParams(temperature=1.0, max_new_tokens=200, ignore_eos=True, seed=40 + i)
              for i in range(4)]

  async def scenario():
    async with SGLangClient([served.url]) as client:
      task = asyncio.create_task(client.generate(prompts, sampling))
      prompt_tokens = sum(map(len, prompts))
      while (await http("GET", served.url, "/v1/loads"))[1]["loads"][0]["num_used_tokens"] \
          <= prompt_tokens:
        await asyncio.sleep(0.001)
      await client.abort_all()
      aborted = await task
      await client.wait_until_idle()
      return aborted, await client.generate(prompts, sampling)

  # The abort races the batch's 50 decode chunks: on a loaded machine the whole batch can
  # finish before the abort arrives (all 4 then end by length). Such a race lost says nothing
  # about aborting, so it is run again, up to 5 times.
  for _ in range(5):
    aborted, full = asyncio.run(scenario())
    if any(cut.finish_reason["type"] == "abort" for cut in aborted):
      break
  for cut, whole in zip(aborted, full):
    assert cut.finish_reason == {"type": "abort", "message": "aborted by /abort_request"}
    assert 0 < len(cut.output_ids) < 200 and len(cut.logprobs) == len(cut.output_ids)
    assert cut.output_ids == whole.output_ids[:len(cut.output_ids)]
    assert whole.finish_reason == {"type": "length", "length": 200}


def test_abort_by_rid_and_pause_modes(served):
  long = {"temperature": 1.0, "max_new_tokens": 200, "ignore_eos": True, "sampling_seed": 3}

  async def scenario():
    url = served.url
    keep = asyncio.create_task(http("POST", url, "/generate", {
        "input_ids": [3, 4, 5], "rid": "keep", "sampling_params": long}))
    drop = asyncio.create_task(http("POST", url, "/generate", {
        "input_ids": [6, 7], "rid": "drop", "sampling_params": long}))
    # Both requests admitted (an abort for a rid the server has not received yet reaches
    # nothing, as in SGLang) and decoding.
    while not ((load := (await http("GET", url, "/v1/loads"))[1]["loads"][0])["num_total_reqs"]
               == 2 and load["num_used_tokens"] > 5):
      await asyncio.sleep(0.001)
    await http("POST", url, "/pause_generation", {"mode": "in_place"})
    assert (await http("POST", url, "/abort_request", {"rid": "drop"}))[0] == 200
    dropped = await drop
    await http("POST", url, "/continue_generation")
    kept = await keep
    # mode "abort" ends what is in flight and holds new requests until /continue_generation
    await http("POST", url, "/pause_generation", {"mode": "in_place"})
    late = asyncio.create_task(http("POST", url, "/generate", {
        "input_ids": [8, 9], "sampling_params": {"temperature": 0, "max_new_tokens": 3}}))
    while (await http("GET", url, "/get_load"))[1][0]["num_reqs"] == 0:
      await asyncio.sleep(0.005)
    paused = await http("POST", url, "/pause_generation", {"mode": "abort"})
    held = asyncio.create_task(http("POST", url, "/generate", {
        "input_ids": [8, 9], "sampling_params": {"temperature": 0, "max_new_tokens": 3}}))
    while (await http("GET", url, "/get_load"))[1][0]["num_reqs"] == 0:  # held admitted
      await asyncio.sleep(0.005)
    waiting = (await http("GET", url, "/get_load"))[1][0]["num_waiting_reqs"]
    await http("POST", url, "/continue_generation")
    return dropped[1], kept[1], paused, (await late)[1], waiting, (await held)[1]

  dropped, kept, paused, late, waiting, held = asyncio.run(scenario())
  assert dropped["meta_info"]["finish_reason"]["type"] == "abort"
  assert 0 < len(dropped["output_ids"]) < 200
  assert kept["meta_info"]["finish_reason"] == {"type": "length", "length": 200}
  assert paused == (200, {"message": "Generation paused successfully.", "status": "ok"})
  assert late["meta_info"]["finish_reason"] == {"type": "abort",
                                                "message": "aborted by /pause_generation"}
  assert waiting == 1
  assert held["meta_info"]["finish_reason"] == {"type": "length", "length": 3}


def test_client_timeout_is_retried_then_reported(served):
  async def scenario():
    url = served.url
    await http("POST", url, "/pause_generation", {"mode": "in_place"})
    try:
      async with SGLangClient([url], timeout_s=0.2, retries=1, backoff_s=0.01) as client:
        with pytest.raises(RolloutFailure) as failure:
          await client.generate([[3, 4]], SamplingParams(max_new_tokens=2))
        await client.abort_all()
    finally:
      await http("POST", url, "/continue_generation")
    async with SGLangClient([url]) as client:
      await client.wait_until_idle()
    return failure.value

  failure = asyncio.run(scenario())
  assert "failed after 2 attempts" in failure.errors[0] and "TimeoutError" in failure.errors[0]


def test_update_weights_from_disk_changes_outputs_and_reports_version(served, tmp_path):
  new_params = peaked_params(1)
  save_hf(str(tmp_path / "new"), CFG, new_params)
  prompts = random_prompts(3, seed=13)
  greedy_sampling = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)

  async def scenario():
    async with SGLangClient([served.url]) as client:
      before = await client.generate(prompts, greedy_sampling)
      await client.update_weights_from_disk(str(tmp_path / "new"), "v2")
      info, after = await client.model_info(), await client.generate(prompts, greedy_sampling)
      with pytest.raises(RuntimeError, match="Failed to load"):
        await client.update_weights_from_disk(str(tmp_path / "missing"), "v3")
      await client.update_weights_from_disk(served.path, "v1")  # restore for other tests
      return before, info, after, client.weight_version

  before, info, after, version = asyncio.run(scenario())
  assert info["weight_version"] == "v2" and version == "v1"
  expected, _, _ = greedy_reference(new_params, prompts, [10] * 3, [set()] * 3, 0, 0, MAX_SEQ_LEN)
  assert [c.output_ids for c in after] == expected
  assert [c.output_ids for c in before] != expected
  assert {c.weight_version for c in after} == {"v2"}


def test_update_weights_rejects_another_architecture(served, tmp_path):
  other = dataclasses.replace(CFG, intermediate_size=40)
  save_hf(str(tmp_path), other, init_params(other, jax.random.key(0)))
  status, answer = asyncio.run(http("POST", served.url, "/update_weights_from_disk",
                                    {"model_path": str(tmp_path)}))
  assert status == 400 and answer["success"] is False and "intermediate_size" in answer["message"]


def test_text_prompts_are_tokenized_and_answers_decoded(served):
  body = {"text": ["abc", "XYZ9"], "sampling_params": {"temperature": 0, "max_new_tokens": 6}}
  status, answers = asyncio.run(http("POST", served.url, "/generate", body))
  assert status == 200
  prompts = [served.tokenizer.encode("abc"), served.tokenizer.encode("XYZ9")]
  ref_out, _, _ = greedy(served.params, prompts, 6)
  assert [a["output_ids"] for a in answers] == ref_out
  assert [a["text"] for a in answers] == [served.tokenizer.decode(o) for o in ref_out]
  assert [a["meta_info"]["prompt_tokens"] for a in answers] == [3, 4]


@pytest.mark.parametrize("path,body,message", [
    ("/generate", b"{not json", "not valid JSON"),
    ("/generate", {"sampling_params": {}}, "exactly one of 'input_ids' and 'text'"),
    ("/generate", {"input_ids": [1, 2], "text": "a"}, "exactly one of"),
    ("/generate", {"input_ids": ["a", 2]}, "'input_ids' must be a list of token ids"),
    ("/generate", {"input_ids": [3], "sampling_params": {"top_p": 2}}, "SamplingParams.top_p"),
    ("/generate", {"input_ids": [3], "sampling_params": {"top_k": 0}}, "SamplingParams.top_k"),
    ("/generate", {"input_ids": [3], "sampling_params": {"max_new_tokens": "9"}}, "integer"),
    ("/generate", {"input_ids": [3], "sampling_params": {"bogus": 1}}, "unsupported fields"),
    ("/generate", {"input_ids": [3], "sampling_params": {"stop": [3]}},
     "'sampling_params.stop' must be a string or a list of strings"),
    ("/generate", {"input_ids": [3], "sampling_params": {"repetition_penalty": 3}},
     "SamplingParams.repetition_penalty=3: must be in (0, 2]"),
    ("/generate", {"input_ids": [3], "sampling_params": {"min_new_tokens": 9, "max_new_tokens": 4}},
     "SamplingParams.min_new_tokens"),
    ("/generate", {"input_ids": [3], "sampling_params": {"regex": "[a-z]+"}},
     "'sampling_params.regex'='[a-z]+': constrained decoding"),
    ("/generate", {"input_ids": [3], "sampling_params": {"json_schema": "{}"}},
     "'sampling_params.json_schema'"),
    ("/generate", {"input_ids": [3], "sampling_params": {"logit_bias": {"5": 2.0}}},
     "'sampling_params.logit_bias'"),
    ("/generate", {"input_ids": [[3], [4]], "sampling_params": [{}, {"stop_regex": ["a+"]}]},
     "'sampling_params[1].stop_regex'"),
    ("/generate", {"input_ids": [3] * MAX_SEQ_LEN}, "max_seq_len"),
    ("/generate", {"input_ids": [[3], [CFG.vocab_size]]}, "prompts[1]: token ids"),
    ("/generate", {"input_ids": [[3], [4]], "rid": ["a", "a"]}, "unique"),
    ("/generate", {"input_ids": [3], "return_logprob": True, "logprob_start_len": 1},
     "'logprob_start_len'=1: must be < the prompt's 1 tokens"),
    ("/generate", {"input_ids": [3], "return_logprob": True, "top_logprobs_num": -2},
     "'top_logprobs_num' must be an integer >= 0"),
    ("/generate", {"input_ids": [3], "return_logprob": True, "token_ids_logprob": [CFG.vocab_size]},
     "'token_ids_logprob' of prompt 0: ids [64]"),
    ("/abort_request", {}, "'rid'"),
    ("/pause_generation", {"mode": "sideways"}, "'mode'"),
    ("/update_weights_from_disk", {}, "'model_path'"),
])
def test_malformed_requests_get_400_with_error_message(served, path, body, message):
  raw = body if isinstance(body, bytes) else None
  status, answer = asyncio.run(http("POST", served.url, path, body, raw=raw))
  assert status == 400
  assert message in answer["error"]["message"]


def test_admin_endpoints(served):
  async def scenario():
    url = served.url
    results = {path: await http("GET", url, path) for path in (
        "/health", "/model_info", "/get_model_info", "/server_info", "/get_server_info",
        "/get_load", "/v1/loads")}
    assert (await http("POST", url, "/pause_generation", {"mode": "in_place"}))[0] == 200
    async with SGLangClient([url]) as client:
      task = asyncio.create_task(client.generate([[3, 4]], SamplingParams(max_new_tokens=5)))
      while await client.load(url) == 0:
        await asyncio.sleep(0.005)
      results["busy_flush"] = await http("POST", url, "/flush_cache")
      results["busy_load"] = await http("GET", url, "/get_load")
      results["continue"] = await http("POST", url, "/continue_generation")
      results["done"] = await task
      await client.wait_until_idle()
    results["idle_flush"] = await http("POST", url, "/flush_cache")
    return results

  r = asyncio.run(scenario())
  assert r["/health"][0] == 200
  assert r["/model_info"] == r["/get_model_info"]
  info = r["/model_info"][1]
  assert (info["model_path"], info["weight_version"], info["architectures"]) == (
      served.path, "v1", ["Qwen2ForCausalLM"])
  assert r["/server_info"] == r["/get_server_info"]
  assert r["/server_info"][1]["max_running_requests"] == 8
  assert r["/get_load"][1] == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
  assert r["/v1/loads"][1]["aggregate"]["total_reqs"] == 0
  assert r["busy_flush"][0] == 200, "sglang 0.5 flushes while paused, requests held"
  assert r["busy_load"][1][0]["num_reqs"] == 1
  assert r["continue"] == (200, {"message": "Generation continued successfully.", "status": "ok"})
  assert len(r["done"][0].output_ids) > 0 and r["idle_flush"][0] == 200


def test_failed_prompts_are_reported_once_and_others_answered(served):
  prompts = [[3, 4], [5] * MAX_SEQ_LEN, [6, 7]]  # the middle one is too long: a 400

  async def scenario():
    async with SGLangClient([served.url]) as client:
      return await client.generate(prompts, SamplingParams(temperature=0, max_new_tokens=4))

  with pytest.raises(RolloutFailure) as failure:
    asyncio.run(scenario())
  assert list(failure.value.errors) == [1] and "max_seq_len" in failure.value.errors[1]
  ref_out, _, _ = greedy(served.params, [prompts[0], prompts[2]], 4)
  got = failure.value.completions
  assert got[1] is None and [got[0][0].output_ids, got[2][0].output_ids] == ref_out


def _closed_port_url() -> str:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_no_reachable_server_raises_a_clear_error():
  async def scenario():
    async with SGLangClient([_closed_port_url()], retries=2, backoff_s=0.01) as client:
      return await client.generate([[3], [4]], SamplingParams(max_new_tokens=2))

  with pytest.raises(RolloutFailure, match="2 of 2 prompts failed") as failure:
    asyncio.run(scenario())
  assert all("failed after 3 attempts" in e and "Connect" in e
             for e in failure.value.errors.values())


def _start_server_process(model_path: str):
  process = subprocess.Popen(
      [sys.executable, "-m", "launch.serve", f"--model_path={model_path}", "--port=0",
       *SERVER_FLAGS], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  url = []
  reader = threading.Thread(target=lambda: url.extend(
      line.split()[1] for line in iter(process.stdout.readline, "") if line.startswith("serving")))
  reader.daemon = True
  reader.start()
  for _ in range(1800):  # up to 180 s on a loaded machine
    if url or process.poll() is not None:
      break
    threading.Event().wait(0.1)
  if not url:
    process.kill()
    raise RuntimeError(f"launch.serve did not start (exit code {process.poll()})")
  return process, url[0]


@pytest.mark.slow
def test_server_killed_mid_batch_work_moves_to_the_other_server(served):
  process, doomed = _start_server_process(served.path)
  prompts = random_prompts(10, seed=14)

  async def scenario():
    # Paused in place, the doomed server holds every request it gets until it is killed.
    assert (await http("POST", doomed, "/pause_generation", {"mode": "in_place"}))[0] == 200
    async with SGLangClient([doomed, served.url], retries=2, backoff_s=0.05) as client:
      task = asyncio.create_task(client.generate(prompts, SamplingParams(temperature=0,
                                                                         max_new_tokens=8)))
      while await client.load(doomed) < 2:
        await asyncio.sleep(0.01)
      held = await client.load(doomed)
      os.kill(process.pid, signal.SIGKILL)
      return held, await task

  try:
    held, got = asyncio.run(scenario())
  finally:
    process.kill()
    process.wait()
  assert held >= 2
  ref_out, _, _ = greedy(served.params, prompts, 8)
  assert [c.prompt_ids for c in got] == prompts, "each prompt answered exactly once, in order"
  assert [c.output_ids for c in got] == ref_out


REQUESTS = os.path.join(os.path.dirname(__file__), "fixtures", "requests")


def request_fixture(name: str) -> dict:
  with open(os.path.join(REQUESTS, name)) as f:
    return json.load(f)


@pytest.mark.parametrize("name", ["sglang_frontend.json", "slime.json", "verl.json", "areal.json"])
def test_request_bodies_of_real_frameworks_are_served(served, name):
  body = request_fixture(name)["body"]
  status, answer = asyncio.run(http("POST", served.url, "/generate", body))
  assert status == 200, answer
  sp = body["sampling_params"]
  prompt = body.get("input_ids") or served.tokenizer.encode(body["text"])
  meta = answer["meta_info"]
  assert meta["prompt_tokens"] == len(prompt) and answer["output_ids"]
  assert answer["text"] == served.tokenizer.decode(answer["output_ids"])
  if sp["temperature"] == 0:
    ref_out, _, ref_reason = greedy(served.params, [prompt], sp["max_new_tokens"])
    assert answer["output_ids"] == ref_out[0] and meta["finish_reason"] == ref_reason[0]
  else:  # sampled: the reported log-probs are the trainer's log_softmax(logits / T)
    logits = teacher_forced_logits(served.params, [prompt + answer["output_ids"]], MAX_SEQ_LEN)[0]
    n = len(answer["output_ids"])
    logp = log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + n] / sp["temperature"])
    np.testing.assert_allclose([t[0] for t in meta["output_token_logprobs"]],
                               logp[np.arange(n), answer["output_ids"]], atol=LOGPROB_ATOL)


def test_stop_strings_report_the_match_and_trim_the_text(served):
  prompt = [5, 9, 14]
  plain = {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 16,
                                                     "ignore_eos": True}}
  _, whole = asyncio.run(http("POST", served.url, "/generate", plain))
  stop = whole["text"][4:6]
  end = next(k for k in range(1, 17)
             if stop in served.tokenizer.decode(whole["output_ids"][:k]))

  async def ask(no_stop_trim):
    body = {"input_ids": prompt, "sampling_params": dict(
        plain["sampling_params"], stop=stop, no_stop_trim=no_stop_trim)}
    return (await http("POST", served.url, "/generate", body))[1]

  trimmed, kept = asyncio.run(ask(False)), asyncio.run(ask(True))
  for answer in (trimmed, kept):
    assert answer["output_ids"] == whole["output_ids"][:end]
    assert answer["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
  full_text = served.tokenizer.decode(whole["output_ids"][:end])
  assert kept["text"] == full_text and trimmed["text"] == full_text[:full_text.find(stop)]


def test_batch_rid_is_expanded_and_parallel_samples_get_their_own_ids(served):
  long = {"temperature": 1.0, "max_new_tokens": 200, "ignore_eos": True}

  async def scenario():
    url = served.url
    batch = asyncio.create_task(http("POST", url, "/generate", {
        "input_ids": [[3, 4], [5, 6]], "rid": "job", "sampling_params": long}))
    while (await http("GET", url, "/get_load"))[1][0]["num_reqs"] < 2:
      await asyncio.sleep(0.005)
    await http("POST", url, "/abort_request", {"rid": "job"})  # a prefix of job_0 and job_1
    parallel = await http("POST", url, "/generate", {
        "input_ids": [7, 8], "rid": "par", "sampling_params": {"max_new_tokens": 2, "n": 3}})
    return (await batch)[1], parallel[1]

  batch, parallel = asyncio.run(scenario())
  assert [a["meta_info"]["id"] for a in batch] == ["job_0", "job_1"]
  assert all(a["meta_info"]["finish_reason"]["type"] == "abort" for a in batch)
  ids = [a["meta_info"]["id"] for a in parallel]
  assert len(parallel) == 3 and len(set(ids)) == 3


def test_a_non_streaming_client_that_hangs_up_frees_its_rows(served):
  async def scenario():
    url = served.url
    await http("POST", url, "/pause_generation", {"mode": "in_place"})
    try:  # paused, the request can only leave the engine by being aborted
      request = asyncio.create_task(http("POST", url, "/generate", {
          "input_ids": [3, 4], "sampling_params": {"max_new_tokens": 50}}))
      while (await http("GET", url, "/get_load"))[1][0]["num_reqs"] == 0:
        await asyncio.sleep(0.005)
      flushed = await http("POST", url, "/flush_cache")  # allowed while paused
      request.cancel()
      for _ in range(400):
        if (await http("GET", url, "/v1/loads"))[1]["loads"][0]["num_running_reqs"] == 0:
          break
        await asyncio.sleep(0.005)
      return flushed, (await http("GET", url, "/v1/loads"))[1]["loads"][0]
    finally:
      await http("POST", url, "/continue_generation")

  flushed, load = asyncio.run(scenario())
  assert flushed[0] == 200
  assert load["num_running_reqs"] == 0 and load["num_waiting_reqs"] == 0


def test_health_generate_weight_version_and_slime_external_engine_check(served):
  async def scenario():
    url = served.url
    return (await http("GET", url, "/health_generate"), await http("GET", url, "/get_weight_version"),
            await http("GET", url, "/get_server_info"))

  health, version, info = asyncio.run(scenario())
  assert health[0] == 200 and version == (200, {"weight_version": "v1"})
  host, port = served.url.removeprefix("http://").split(":")
  expected = dict(request_fixture("slime_external_engine_check.json")["expected"],
                  host=host, port=int(port))
  assert {k: info[1].get(k) for k in expected} == expected


def test_custom_params_and_null_structured_fields_are_accepted(served):
  body = {"input_ids": [3, 4], "sampling_params": {
      "temperature": 0, "max_new_tokens": 3, "custom_params": {"any": ["thing", 1]},
      "regex": None, "json_schema": None, "ebnf": None, "stop_regex": [], "logit_bias": {}}}
  status, answer = asyncio.run(http("POST", served.url, "/generate", body))
  ref_out, _, _ = greedy(served.params, [[3, 4]], 3)
  assert status == 200 and answer["output_ids"] == ref_out[0]


def test_input_top_and_chosen_id_logprobs_equal_the_full_forward(served):
  prompt, wanted = [4, 11, 7, 30, 2, 19], [5, 9, 40]
  body = {"input_ids": prompt, "return_logprob": True, "logprob_start_len": 0,
          "top_logprobs_num": 3, "token_ids_logprob": wanted, "return_text_in_logprobs": True,
          "sampling_params": {"temperature": 0.7, "max_new_tokens": 5, "sampling_seed": 3,
                              "ignore_eos": True}}
  status, answer = asyncio.run(http("POST", served.url, "/generate", body))
  assert status == 200, answer
  meta, out = answer["meta_info"], answer["output_ids"]
  logits = teacher_forced_logits(served.params, [prompt + out], MAX_SEQ_LEN)[0]
  logp = log_softmax(logits / 0.7)  # row q: the distribution of the token after position q
  text = lambda t: served.tokenizer.decode([t], skip_special_tokens=False)

  def check(triplets, q, ids):
    assert [t for _, t, _ in triplets] == ids and [x for _, _, x in triplets] == list(map(text, ids))
    np.testing.assert_allclose([v for v, _, _ in triplets], logp[q, ids], atol=LOGPROB_ATOL)

  assert meta["input_token_logprobs"][0] == [None, prompt[0], text(prompt[0])]
  assert meta["input_top_logprobs"][0] is None and meta["input_token_ids_logprobs"][0] is None
  for p in range(1, len(prompt)):
    check([meta["input_token_logprobs"][p]], p - 1, [prompt[p]])
    check(meta["input_top_logprobs"][p], p - 1, np.argsort(-logp[p - 1])[:3].tolist())
    check(meta["input_token_ids_logprobs"][p], p - 1, wanted)
  for j, token in enumerate(out):
    q = len(prompt) - 1 + j
    check([meta["output_token_logprobs"][j]], q, [token])
    check(meta["output_top_logprobs"][j], q, np.argsort(-logp[q])[:3].tolist())
    check(meta["output_token_ids_logprobs"][j], q, wanted)


def test_areal_prefill_logprob_request(served):
  body = request_fixture("areal_prefill_logprobs.json")["body"]
  status, answer = asyncio.run(http("POST", served.url, "/generate", body))
  prompt, start = body["input_ids"], body["logprob_start_len"]
  logp = log_softmax(teacher_forced_logits(served.params, [prompt], MAX_SEQ_LEN)[0])
  meta = answer["meta_info"]
  assert status == 200 and answer["output_ids"] == [] and meta["finish_reason"]["type"] == "length"
  assert [t for _, t, _ in meta["input_token_logprobs"]] == prompt[start:]
  np.testing.assert_allclose([v for v, _, _ in meta["input_token_logprobs"]],
                             [logp[p - 1, prompt[p]] for p in range(start, len(prompt))],
                             atol=LOGPROB_ATOL)
