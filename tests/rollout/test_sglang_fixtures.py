"""The client against SGLang's documented response shapes (tests/rollout/fixtures).

The fixtures follow SGLang's native API: finish reasons stop/length/abort, log-prob triplets
with null text, `output_ids` that omit the stop token, grouped n > 1 batches, SSE streams,
/get_load lists and the error envelope. A stand-in server replays them and knows only the
older endpoint names, so the client's fallbacks run too.
"""
import asyncio
import json
import os

import pytest
from aiohttp import web

from kimi_jax.rollout.protocol import completion_from_response
from kimi_jax.rollout.sglang_client import RolloutFailure, SGLangClient
from kimi_jax.rollout.types import SamplingParams

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def fixture(name: str):
  with open(os.path.join(FIXTURES, name)) as f:
    return f.read() if name.endswith(".txt") else json.load(f)


def test_answers_parse_with_tokens_from_triplets():
  stop = completion_from_response(fixture("generate_stop.json"), [1, 2, 3, 4])
  assert stop.output_ids == [17, 5, 41, 2], "the stop token is only in the triplets"
  assert stop.logprobs == [-0.6931, -1.2039, -0.1053, -0.0513]
  assert stop.finish_reason == {"type": "stop", "matched": 2}
  assert (stop.weight_version, stop.repetition, stop.prompt_ids) == ("default", False, [1, 2, 3, 4])
  length = completion_from_response(fixture("generate_length.json"), [2, 2])
  assert length.finish_reason == {"type": "length", "length": 3} and length.output_ids == [9, 9, 30]
  abort = completion_from_response(fixture("generate_abort.json"), [3, 3, 3])
  assert abort.finish_reason["type"] == "abort" and abort.output_ids == [12, 44]
  assert abort.logprobs == [-0.9163, -0.2231]


def test_answer_without_meta_info_is_a_clear_error():
  with pytest.raises(ValueError, match="not an SGLang /generate answer"):
    completion_from_response({"text": "hi"}, [1])


class ReplayServer:
  """Serves the fixtures under SGLang's older endpoint names only."""

  def __init__(self, new_names: bool = False):
    self.generate_calls = 0
    self.weight_version = "7"
    self.new_names = new_names
    self.memory_calls = []

  def app(self) -> web.Application:
    app = web.Application()
    app.router.add_post("/generate", self.generate)
    app.router.add_get("/get_model_info", self.model_info)
    app.router.add_get("/get_load", lambda r: web.json_response(fixture("get_load.json")))
    app.router.add_post("/update_weights_from_disk", self.update_weights)
    if self.new_names:  # sglang 0.5.23
      app.router.add_get("/v1/loads", lambda r: web.json_response(
          fixture("v1_loads_0_5_23.json")["answer"]))
      for path in ("/release_memory_occupation", "/resume_memory_occupation"):
        app.router.add_post(path, self.memory_occupation)
    return app

  async def memory_occupation(self, request):
    self.memory_calls.append((request.path, await request.json()))
    return web.Response(text=fixture("memory_occupation.json")["answer_body"],
                        content_type="application/json")

  async def generate(self, request):
    self.generate_calls += 1
    body = await request.json()
    first = body["input_ids"][0]
    if body.get("stream"):
      response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
      await response.prepare(request)
      await response.write(fixture("generate_stream.txt").encode())
      return response
    if first == 9 and self.generate_calls == 1:
      return web.Response(status=503, text="Service Unavailable")
    if first == 8:
      return web.json_response(fixture("error_400.json"), status=400)
    answers = {1: fixture("generate_stop.json"), 2: fixture("generate_length.json"),
               3: fixture("generate_abort.json"), 4: fixture("generate_batch_n2.json")[:2],
               5: fixture("generate_batch_n2.json")[2:], 9: fixture("generate_stop.json")}
    return web.json_response(answers[first])

  async def model_info(self, request):
    return web.json_response(dict(fixture("get_model_info.json"), weight_version=self.weight_version))

  async def update_weights(self, request):
    self.weight_version = "7"  # this stand-in always lands on version 7
    return web.json_response(fixture("update_weights_from_disk.json"))


def run_against_replay(scenario, new_names: bool = False):
  async def main():
    replay = ReplayServer(new_names)
    runner = web.AppRunner(replay.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
      async with SGLangClient([url], retries=2, backoff_s=0.01) as client:
        return replay, url, await scenario(client, url)
    finally:
      await runner.cleanup()
  return asyncio.run(main())


def test_client_parses_single_and_grouped_answers():
  async def scenario(client, url):
    singles = await client.generate([[1, 0, 0, 0], [2, 0], [3, 0, 0]], SamplingParams())
    grouped = await client.generate([[4, 1, 1], [5, 1, 1, 1, 1]], SamplingParams(n=2))
    return singles, grouped

  _, _, (singles, grouped) = run_against_replay(scenario)
  assert [c.finish_reason["type"] for c in singles] == ["stop", "length", "abort"]
  assert singles[0].output_ids == [17, 5, 41, 2]
  assert [c.prompt_ids for c in grouped] == [[4, 1, 1]] * 2 + [[5, 1, 1, 1, 1]] * 2
  assert [c.output_ids for c in grouped] == [[7, 2], [8, 8, 8], [19, 2], [21, 22]]
  assert [c.finish_reason["type"] for c in grouped] == ["stop", "length", "stop", "abort"]


def test_client_reads_a_stream_to_done():
  async def scenario(client, url):
    return [c async for _, c in client.stream([1, 0, 0, 0], SamplingParams())]

  _, _, chunks = run_against_replay(scenario)
  assert [c.output_ids for c in chunks] == [[17], [17, 5], [17, 5, 2]]
  assert [c.finish_reason for c in chunks] == [None, None, {"type": "stop", "matched": 2}]


def test_client_falls_back_to_old_endpoint_names():
  async def scenario(client, url):
    return await client.model_info(), await client.load(url)

  _, _, (info, load) = run_against_replay(scenario)
  assert info["architectures"] == ["Qwen2ForCausalLM"]
  assert load == 5, "sum of num_reqs over the two data-parallel ranks"


def test_weight_update_checks_the_reported_version():
  async def scenario(client, url):
    await client.update_weights_from_disk("/ckpt/7", "7")
    version = client.weight_version
    with pytest.raises(RuntimeError, match="reports weight_version '7' after updating to '8'"):
      await client.update_weights_from_disk("/ckpt/8", "8")
    return version, client.weight_version

  _, _, versions = run_against_replay(scenario)
  assert versions == ("7", "7")


def test_5xx_is_retried_and_4xx_is_reported():
  async def scenario(client, url):
    retried = await client.generate([[9]], SamplingParams())
    with pytest.raises(RolloutFailure) as failure:
      await client.generate([[8], [1]], SamplingParams())
    return retried, failure.value

  replay, _, (retried, failure) = run_against_replay(scenario)
  assert retried[0].output_ids == [17, 5, 41, 2]
  assert list(failure.errors) == [0] and "longer than the model's context length" in failure.errors[0]
  assert failure.completions[1][0].finish_reason["type"] == "stop"
  assert replay.generate_calls == 4, "one 503, one retry, then the 400 (not retried) and one more"


def test_client_against_sglang_0_5_23_loads_and_memory_occupation():
  async def scenario(client, url):
    load = await client.load(url)
    await client.release_memory_occupation(["kv_cache", "weights"])
    await client.resume_memory_occupation(["weights"])
    await client.resume_memory_occupation()
    return load

  replay, _, load = run_against_replay(scenario, new_names=True)
  assert load == 7, "running + waiting over both ranks of /v1/loads (no aggregate in 0.5.23)"
  requests = fixture("memory_occupation.json")
  assert replay.memory_calls == [
      ("/release_memory_occupation", requests["release_request"]),
      ("/resume_memory_occupation", requests["resume_request"]),
      ("/resume_memory_occupation", {})]
