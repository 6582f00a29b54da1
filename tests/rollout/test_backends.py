"""The rollout contract: every backend implements `RolloutBackend`; the SGLang backend's memory
calls reach SGLang's endpoints on every server."""
import asyncio
import threading

import pytest
from aiohttp import web

from kimi_jax.rollout.backends import EngineBackend, RolloutBackend, SGLangBackend
from tests.rollout.fakes import FakeBackend
from tests.rollout.tiny_model import CFG, EOS, peaked_params


class RecordingServer:
  """An HTTP server on its own thread answering 200 to any POST and recording (path, body)."""

  def __init__(self):
    self.posts = []
    self._loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def record(request):
      self.posts.append((request.path, await request.json()))
      return web.json_response({"success": True})

    async def start():
      app = web.Application()
      app.router.add_post("/{path}", record)
      self._runner = web.AppRunner(app)
      await self._runner.setup()
      site = web.TCPSite(self._runner, "127.0.0.1", 0)
      await site.start()
      self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    def run():
      self._loop.run_until_complete(start())
      ready.set()
      self._loop.run_forever()

    self._thread = threading.Thread(target=run, daemon=True)
    self._thread.start()
    ready.wait()

  def stop(self):
    asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join()


class RolloutSection:  # the `rollout` and `rl` config fields EngineBackend reads
  max_batch, max_seq_len, repetition_ngram, repetition_count = 2, 16, 0, 0


def test_engine_sglang_and_fake_backends_implement_the_protocol(tmp_path):
  engine = EngineBackend(CFG, peaked_params(0), RolloutSection, RolloutSection, [EOS], "0")
  sglang = SGLangBackend(CFG, None, ["http://127.0.0.1:1"], str(tmp_path))
  try:
    for backend in (engine, sglang, FakeBackend()):
      assert isinstance(backend, RolloutBackend), type(backend).__name__
  finally:
    sglang.close()
  assert not isinstance(object(), RolloutBackend)


def test_sglang_release_and_resume_reach_every_server(tmp_path):
  servers = [RecordingServer(), RecordingServer()]
  backend = SGLangBackend(CFG, None, [s.url for s in servers], str(tmp_path))
  try:
    backend.release()
    backend.resume()
  finally:
    backend.close()
    for server in servers:
      server.stop()
  for server in servers:  # SGLang's colocated-training endpoints; an empty body frees all tags
    assert server.posts == [("/release_memory_occupation", {}), ("/resume_memory_occupation", {})]


def test_sglang_backend_needs_urls(tmp_path):
  with pytest.raises(ValueError, match="config.rollout.urls is empty"):
    SGLangBackend(CFG, None, [], str(tmp_path))
