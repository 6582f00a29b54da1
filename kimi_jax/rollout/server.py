"""An HTTP server for RolloutEngine speaking SGLang's native API (DESIGN.md section 6).

Endpoints: /generate (single or batch, `input_ids` or `text`, n, return_logprob, rid, SSE
streaming with cumulative chunks and `data: [DONE]`), /abort_request, /pause_generation,
/continue_generation, /flush_cache, /update_weights_from_disk, /health, /model_info and
/get_model_info, /server_info and /get_server_info, /get_load and /v1/loads. Malformed
requests get 400 {"error": {"message": ...}}. The engine runs on a worker thread, so admin
calls are answered while it decodes.
"""
import asyncio
import dataclasses
import datetime
import json
import threading
import time
import uuid
from typing import Callable

from aiohttp import web

from kimi_jax.checkpointing import hf
from kimi_jax.data import image_prompts, images
from kimi_jax.rollout.engine import RolloutEngine, Update
from kimi_jax.rollout.protocol import RequestError, parse_generate_request, response_json
from kimi_jax.rollout.types import Completion
from kimi_jax.rollout.worker import EngineWorker

VERSION = "kimi_jax-0.1.0"
_PAUSE_MODES = ("abort", "retract", "in_place")
# A checkpoint may replace the served weights only if these ModelConfig fields agree.
_ARCHITECTURE_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size",
                        "num_layers", "num_heads", "num_kv_heads", "head_dim", "rope_theta",
                        "rms_norm_eps", "qkv_bias", "qk_norm", "tie_embeddings")


def _error(message: str, status: int = 400) -> web.Response:
  return web.json_response({"error": {"message": message}}, status=status)


async def _json_body(request: web.Request) -> dict:
  if not request.can_read_body:
    return {}
  try:
    body = await request.json()
  except json.JSONDecodeError as error:
    raise RequestError(f"request body is not valid JSON: {error}") from error
  if not isinstance(body, dict):
    raise RequestError("request body must be a JSON object")
  return body


@dataclasses.dataclass
class _Sample:
  """One sample of a /generate call as it streams in."""

  rid: str
  prompt_ids: list[int]
  return_logprob: bool
  output_ids: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  completion: Completion | None = None

  def apply(self, update: Update) -> None:
    self.output_ids += update.new_ids
    self.logprobs += update.new_logprobs
    self.completion = update.completion


class RolloutServer:
  """The aiohttp application around one engine.

  Args:
    engine: serves every request; its weights change through /update_weights_from_disk.
    tokenizer: optional; enables `text` prompts and the `text` field of answers.
    model_path: reported by /model_info.
    load_checkpoint: path -> (ModelConfig, params), used by /update_weights_from_disk.
    image_processing: how `image_data` is preprocessed for a vision-language model.
  """

  def __init__(self, engine: RolloutEngine, *, tokenizer=None, model_path: str = "",
               load_checkpoint: Callable = hf.load_hf,
               image_processing: images.ImageProcessing = images.ImageProcessing()):
    self.engine = engine
    self.tokenizer = tokenizer
    self.image_processing = image_processing
    self.model_path = model_path
    self.load_checkpoint = load_checkpoint
    self.worker = EngineWorker(engine)
    self.url = ""
    self._open_samples = 0  # accepted by /generate and not yet answered
    self._runner: web.AppRunner | None = None

  def app(self) -> web.Application:
    app = web.Application(client_max_size=64 << 20)
    routes = [
        ("*", "/generate", self.generate),
        ("GET", "/health", self.health),
        ("GET", "/model_info", self.model_info), ("GET", "/get_model_info", self.model_info),
        ("GET", "/server_info", self.server_info), ("GET", "/get_server_info", self.server_info),
        ("GET", "/get_load", self.get_load), ("GET", "/v1/loads", self.v1_loads),
        ("POST", "/abort_request", self.abort_request),
        ("POST", "/pause_generation", self.pause_generation),
        ("POST", "/continue_generation", self.continue_generation),
        ("*", "/flush_cache", self.flush_cache),
        ("POST", "/update_weights_from_disk", self.update_weights_from_disk),
    ]
    for method, path, handler in routes:
      app.router.add_route(method, path, self._answer_request_errors(handler))
    return app

  @staticmethod
  def _answer_request_errors(handler):
    async def wrapped(request):
      try:
        return await handler(request)
      except RequestError as error:
        return _error(str(error))
    return wrapped

  async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
    """Bind (port 0 = ephemeral), start the engine thread; returns the base URL."""
    self.worker.start()
    self._runner = web.AppRunner(self.app(), access_log=None)
    await self._runner.setup()
    site = web.TCPSite(self._runner, host, port)
    await site.start()
    bound_port = self._runner.addresses[0][1]
    self.url = f"http://{host}:{bound_port}"
    return self.url

  async def stop(self) -> None:
    if self._runner is not None:
      await self._runner.cleanup()
    await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)

  # ---- /generate ----

  async def generate(self, request: web.Request) -> web.StreamResponse:
    received = time.perf_counter()
    encode = None if self.tokenizer is None else self.tokenizer.encode
    req = parse_generate_request(await _json_body(request), lambda: uuid.uuid4().hex, encode)
    prompt_images = await asyncio.get_running_loop().run_in_executor(None, self._images, req)
    arrivals: asyncio.Queue[Update] = asyncio.Queue()
    try:
      uids = await self.worker.submit(req.prompts, req.sampling, req.rids, arrivals.put_nowait,
                                      prompt_images)
    except ValueError as error:
      raise RequestError(str(error)) from error
    samples, index = [], {}
    for prompt, sp, rid, logprob in zip(req.prompts, req.sampling, req.rids, req.return_logprob):
      for _ in range(sp.n):
        index[uids[len(samples)]] = len(samples)
        samples.append(_Sample(rid, prompt, logprob))
    self._open_samples += len(samples)
    grouped = req.is_batch or len(samples) > 1
    answer = lambda s: self._answer(s, received)
    try:
      if not req.stream:
        await self._collect(arrivals, samples, index)
        answers = [answer(s) for s in samples]
        return web.json_response(answers if grouped else answers[0])
      response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                             "Cache-Control": "no-cache"})
      await response.prepare(request)

      async def send(i: int) -> None:
        chunk = answer(samples[i])
        if grouped:
          chunk["index"] = i
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

      await self._collect(arrivals, samples, index, send)
      await response.write(b"data: [DONE]\n\n")
      await response.write_eof()
      return response
    finally:
      unfinished = [s.rid for s in samples if s.completion is None]
      self._open_samples -= len(samples)
      if unfinished:  # the client went away: free the rows
        self.worker.abort(sorted(set(unfinished)), "client disconnected")

  def _images(self, req) -> list[images.ProcessedImages | None]:
    """Each prompt's `image_data` preprocessed; its image pads (one per image, or runs already
    of the image's length) expanded in `req.prompts` in place."""
    if not any(req.image_data):
      return [None] * len(req.prompts)
    vision = self.engine.config.vision
    if vision is None:
      raise RequestError("'image_data' given, but this model has no vision tower")
    processed = []
    for i, sources in enumerate(req.image_data):
      try:
        prompt_images = images.preprocess(sources, self.image_processing)
        counts = image_prompts.image_token_counts(prompt_images, vision.spatial_merge_size)
        req.prompts[i] = image_prompts.expand_image_pads(req.prompts[i], vision.image_token_id,
                                                         counts)
      except (ValueError, TypeError) as error:
        raise RequestError(f"prompt {i}: {error}") from error
      processed.append(prompt_images)
    return processed

  @staticmethod
  async def _collect(arrivals, samples, index, on_update=None) -> None:
    waiting = len(samples)
    while waiting:
      update = await arrivals.get()
      i = index[update.uid]
      samples[i].apply(update)
      waiting -= update.completion is not None
      if on_update is not None:
        await on_update(i)

  def _answer(self, sample: _Sample, received: float) -> dict:
    done = sample.completion
    text = None if self.tokenizer is None else self.tokenizer.decode(sample.output_ids)
    return response_json(
        sample.rid, sample.prompt_ids, sample.output_ids, sample.logprobs,
        None if done is None else done.finish_reason,
        self.engine.weight_version if done is None else done.weight_version,
        time.perf_counter() - received, sample.return_logprob, text)

  # ---- admin ----

  async def health(self, request: web.Request) -> web.Response:
    return web.Response(status=200)

  async def model_info(self, request: web.Request) -> web.Response:
    config = self.engine.config
    return web.json_response({
        "model_path": self.model_path, "tokenizer_path": self.model_path if self.tokenizer else None,
        "is_generation": True, "preferred_sampling_params": None,
        "weight_version": self.engine.weight_version,
        "has_image_understanding": config.vision is not None,
        "has_audio_understanding": False, "model_type": config.architecture,
        "architectures": hf.config_to_hf(config)["architectures"]})

  async def server_info(self, request: web.Request) -> web.Response:
    load = self.worker.load
    return web.json_response({
        "model_path": self.model_path, "served_model_name": self.model_path, "url": self.url,
        "max_running_requests": self.engine.max_batch, "context_length": self.engine.max_seq_len,
        "weight_version": self.engine.weight_version, "version": VERSION,
        "internal_states": [{"num_running_reqs": load.num_running,
                             "num_queued_reqs": load.num_queued, "paused": self.worker.paused}]})

  def _counts(self) -> tuple[int, int]:
    running = min(self.worker.load.num_running, self._open_samples)
    return running, self._open_samples - running

  async def get_load(self, request: web.Request) -> web.Response:
    running, waiting = self._counts()
    return web.json_response([{"dp_rank": 0, "num_reqs": running + waiting,
                               "num_waiting_reqs": waiting,
                               "num_tokens": self.worker.load.num_tokens}])

  async def v1_loads(self, request: web.Request) -> web.Response:
    load = self.worker.load
    running, waiting = self._counts()
    usage = load.num_tokens / (self.engine.max_batch * self.engine.max_seq_len)
    utilization = running / self.engine.max_batch
    return web.json_response({
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(), "version": VERSION,
        "dp_rank_count": 1,
        "loads": [{"dp_rank": 0, "num_running_reqs": running, "num_waiting_reqs": waiting,
                   "num_total_reqs": running + waiting, "num_used_tokens": load.num_tokens,
                   "token_usage": usage, "gen_throughput": load.tokens_per_s,
                   "utilization": utilization}],
        "aggregate": {"total_running_reqs": running, "total_waiting_reqs": waiting,
                      "total_reqs": running + waiting, "avg_token_usage": usage,
                      "avg_throughput": load.tokens_per_s, "avg_utilization": utilization}})

  async def abort_request(self, request: web.Request) -> web.Response:
    body = await _json_body(request)
    if body.get("abort_all"):
      await self.worker.abort(None, "aborted by /abort_request")
    elif isinstance(body.get("rid"), str):
      await self.worker.abort([body["rid"]], "aborted by /abort_request")
    else:
      raise RequestError("give 'rid' (a string) or 'abort_all': true")
    return web.Response(status=200)

  async def pause_generation(self, request: web.Request) -> web.Response:
    mode = (await _json_body(request)).get("mode", "abort")
    if mode not in _PAUSE_MODES:
      raise RequestError(f"'mode'={mode!r}: must be one of {_PAUSE_MODES}")
    await self.worker.set_paused(True, "aborted by /pause_generation" if mode == "abort" else None)
    return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

  async def continue_generation(self, request: web.Request) -> web.Response:
    await self.worker.set_paused(False)
    return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

  async def flush_cache(self, request: web.Request) -> web.Response:
    # No prefix cache to flush; like SGLang, refuse while requests are in flight.
    if self._open_samples:
      return web.Response(status=400, text="Cache not flushed: requests are running or waiting.\n")
    return web.Response(status=200, text="Cache flushed.\n")

  async def update_weights_from_disk(self, request: web.Request) -> web.Response:
    body = await _json_body(request)
    path = body.get("model_path")
    if not isinstance(path, str) or not path:
      raise RequestError("'model_path' (an HF safetensors directory) is required")
    version = body.get("weight_version")
    version = self.engine.weight_version if version is None else str(version)
    failed = lambda message: web.json_response(
        {"success": False, "message": message, "num_paused_requests": 0}, status=400)
    try:
      config, params = await asyncio.get_running_loop().run_in_executor(
          None, self.load_checkpoint, path)
    except (OSError, ValueError) as error:
      return failed(f"Failed to load {path}: {error}")
    differs = {f: (getattr(config, f), getattr(self.engine.config, f))
               for f in _ARCHITECTURE_FIELDS if getattr(config, f) != getattr(self.engine.config, f)}
    if differs:
      return failed(f"{path}: config differs from the served model in (new, served) {differs}")
    if body.get("abort_all_requests"):
      await self.worker.abort(None, "aborted by /update_weights_from_disk")
    try:
      await self.worker.swap_weights(params, version)
    except ValueError as error:
      return failed(str(error))
    return web.json_response({"success": True, "message": "Succeeded to update model weights.",
                              "num_paused_requests": 0})


class BackgroundServer:
  """A RolloutServer on its own thread and event loop (tests, in-process trainers)."""

  def __init__(self, server: RolloutServer, host: str = "127.0.0.1", port: int = 0):
    self.server = server
    self._loop = asyncio.new_event_loop()
    started = threading.Event()
    failure: list[BaseException] = []

    def run():
      asyncio.set_event_loop(self._loop)
      try:
        self._loop.run_until_complete(server.start(host, port))
      except BaseException as error:  # reported to the constructor
        failure.append(error)
        started.set()
        return
      started.set()
      self._loop.run_forever()

    self._thread = threading.Thread(target=run, name="rollout-server", daemon=True)
    self._thread.start()
    started.wait()
    if failure:
      raise failure[0]
    self.url = server.url

  def stop(self) -> None:
    asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result()
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join()
    self._loop.close()
