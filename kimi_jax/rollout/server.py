"""An HTTP server for RolloutEngine speaking SGLang's native API.

Endpoints: /generate (single or batch, `input_ids` or `text`, n, return_logprob, rid, SSE
streaming with cumulative chunks and `data: [DONE]`), /abort_request, /pause_generation,
/continue_generation, /flush_cache, /update_weights_from_disk, /release_memory_occupation and
/resume_memory_occupation (tags "kv_cache", "weights"), /health, /health_generate,
/get_weight_version, /model_info and /get_model_info, /server_info and /get_server_info,
/get_load and /v1/loads. Malformed requests get 400 {"error": {"message": ...}}
(`request_checks`), server faults 500 with the same shape; a client that hangs up has its samples
aborted. The engine runs on a worker thread, so admin calls are answered while it decodes; if it
fails, its requests get 500 (an error event when streaming), /health answers 503 until the
engine is reset, and serving goes on.
"""
import asyncio
import dataclasses
import datetime
import functools
import logging
import threading
import time
import uuid
from typing import Callable

from aiohttp import web

from kimi_jax.checkpointing import hf
from kimi_jax.data import image_prompts, images
from kimi_jax.rollout.engine import RolloutEngine, Update
from kimi_jax.rollout import openai_api, request_checks
from kimi_jax.rollout.protocol import (GenerateRequest, LogprobRequest, RequestError,
                                       parse_generate_request, response_json)
from kimi_jax.rollout.types import Completion, SamplingParams
from kimi_jax.rollout.worker import EngineFailure, EngineWorker

VERSION = "kimi_jax-0.1.0"
_PAUSE_MODES = ("abort", "retract", "in_place")
_HEALTH_TIMEOUT_S = 20.0
# A checkpoint may replace the served weights only if these ModelConfig fields agree.
_ARCHITECTURE_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size",
                        "num_layers", "num_heads", "num_kv_heads", "head_dim", "rope_theta",
                        "rms_norm_eps", "qkv_bias", "qk_norm", "tie_embeddings")


_json_response = functools.partial(web.json_response, dumps=request_checks.dumps)


def _error(message: str, status: int = 400) -> web.Response:
  return _json_response({"error": {"message": message}}, status=status)


async def _json_body(request: web.Request) -> dict:
  if not request.can_read_body:
    return {}
  return request_checks.parse_json_body(await request.read())


async def _event_stream(request: web.Request) -> web.StreamResponse:
  response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                         "Cache-Control": "no-cache"})
  await response.prepare(request)
  return response


async def _send_event(response: web.StreamResponse, event: dict) -> None:
  await response.write(f"data: {request_checks.dumps(event)}\n\n".encode())


async def _end_event_stream(response: web.StreamResponse) -> web.StreamResponse:
  await response.write(b"data: [DONE]\n\n")
  await response.write_eof()
  return response


@dataclasses.dataclass
class _Sample:
  """One sample of a /generate call as it streams in."""

  id: str
  prompt_ids: list[int]
  sampling: SamplingParams
  return_logprob: bool
  logprob_request: LogprobRequest
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
    max_samples_per_request: the most samples (prompts x n) one /generate may ask for.
    image_processing: how `image_data` is preprocessed for a vision-language model.
  """

  def __init__(self, engine: RolloutEngine, *, tokenizer=None, model_path: str = "",
               load_checkpoint: Callable = hf.load_hf, max_samples_per_request: int = 4096,
               image_processing: images.ImageProcessing = images.ImageProcessing()):
    self.engine = engine
    self.max_samples_per_request = max_samples_per_request
    # Prompt + output tokens per request: the KV slots, and no more than the model was made for.
    self.context_length = min(engine.max_seq_len, engine.config.max_position_embeddings)
    self.tokenizer = tokenizer
    self.image_processing = image_processing
    self.model_path = model_path
    self.load_checkpoint = load_checkpoint
    self.worker = EngineWorker(engine)
    self.url = ""
    self._bound: tuple[str, int] = ("", 0)
    self._started = time.time()
    self._open_samples = 0  # accepted by /generate and not yet answered
    self._runner: web.AppRunner | None = None

  def app(self) -> web.Application:
    app = web.Application(client_max_size=64 << 20)
    routes = [
        ("*", "/generate", self.generate),
        ("GET", "/v1/models", self.v1_models),
        ("POST", "/v1/completions", self.v1_completions),
        ("POST", "/v1/chat/completions", self.v1_chat_completions),
        ("GET", "/health", self.health), ("GET", "/health_generate", self.health_generate),
        ("GET", "/get_weight_version", self.get_weight_version),
        ("GET", "/model_info", self.model_info), ("GET", "/get_model_info", self.model_info),
        ("GET", "/server_info", self.server_info), ("GET", "/get_server_info", self.server_info),
        ("GET", "/get_load", self.get_load), ("GET", "/v1/loads", self.v1_loads),
        ("POST", "/abort_request", self.abort_request),
        ("POST", "/pause_generation", self.pause_generation),
        ("POST", "/continue_generation", self.continue_generation),
        ("*", "/flush_cache", self.flush_cache),
        ("POST", "/update_weights_from_disk", self.update_weights_from_disk),
        ("*", "/release_memory_occupation", self.release_memory_occupation),
        ("*", "/resume_memory_occupation", self.resume_memory_occupation),
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
      except EngineFailure as error:
        return _error(str(error), status=500)
      except (web.HTTPException, asyncio.CancelledError, ConnectionResetError):
        raise
      except Exception as error:  # noqa: BLE001 -- a JSON 500 instead of aiohttp's text page
        logging.exception("rollout server: %s %s failed", request.method, request.path)
        return _error(f"internal server error: {type(error).__name__}: {error}", status=500)
    return wrapped

  async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
    """Bind (port 0 = ephemeral), start the engine thread; returns the base URL."""
    self.worker.start()
    # handler_cancellation: a client that hangs up cancels its handler, which aborts its samples
    self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
    await self._runner.setup()
    site = web.TCPSite(self._runner, host, port)
    await site.start()
    bound_port = self._runner.addresses[0][1]
    self._bound = (host, bound_port)
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
    body = await _json_body(request)
    request_checks.check_generate_flags(body)
    req = parse_generate_request(body, lambda: uuid.uuid4().hex, encode)
    request_checks.check_fits(body, req, self.context_length, self.max_samples_per_request)
    vocab = self.engine.config.vocab_size
    for i, want in enumerate(req.logprobs):
      bad = [t for t in want.token_ids or () if t >= vocab]
      if bad:
        raise RequestError(f"'token_ids_logprob' of prompt {i}: ids {bad[:5]} outside [0, {vocab})")
    grouped = req.is_batch or sum(sp.n for sp in req.sampling) > 1
    answer = lambda s: self._answer(s, received)
    if not req.stream:
      answers = [await answer(s) for s in await self._run(req)]
      return _json_response(answers if grouped else answers[0])
    response = await _event_stream(request)

    async def send(samples: list[_Sample], i: int) -> None:
      chunk = await answer(samples[i])
      if grouped:
        chunk["index"] = i
      await _send_event(response, chunk)

    await self._streamed(response, req, send)
    return await _end_event_stream(response)

  async def _streamed(self, response: web.StreamResponse, req: GenerateRequest,
                      send) -> list[_Sample] | None:
    """`_run` for a stream whose status line is sent: an engine failure becomes an error
    event (then the stream ends as usual); None in that case."""
    try:
      return await self._run(req, send)
    except EngineFailure as error:
      await _send_event(response, {"error": {"message": str(error)}})
      return None

  async def _run(self, req: GenerateRequest, on_update=None) -> list[_Sample]:
    """Submit `req` and wait for all its samples; `on_update(samples, i)` after each update
    of sample i. Samples still unfinished when this ends (the client went away) are aborted."""
    prompt_images = await asyncio.get_running_loop().run_in_executor(None, self._images, req)
    arrivals: asyncio.Queue[Update] = asyncio.Queue()
    try:
      uids = await self.worker.submit(req.prompts, req.sampling, req.rids, req.sample_ids,
                                      arrivals.put_nowait, prompt_images)
    except ValueError as error:
      raise RequestError(str(error)) from error
    samples, index = [], {}
    for prompt, sp, ids, logprob, extra in zip(req.prompts, req.sampling, req.sample_ids,
                                               req.return_logprob, req.logprobs):
      for sample_id in ids:
        index[uids[len(samples)]] = len(samples)
        samples.append(_Sample(sample_id, prompt, sp, logprob, extra))
    self._open_samples += len(samples)
    try:
      waiting = len(samples)
      while waiting:
        update = await arrivals.get()
        if isinstance(update, EngineFailure):
          raise update
        i = index[update.uid]
        samples[i].apply(update)
        waiting -= update.completion is not None
        if on_update is not None:
          await on_update(samples, i)
      return samples
    finally:
      unfinished = [s.id for s in samples if s.completion is None]
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

  def _text(self, sample: _Sample) -> str | None:
    """The output decoded like SGLang's detokenizer: a matched stop string is cut off unless
    no_stop_trim. None without a tokenizer (SGLang's --skip-tokenizer-init answers)."""
    if self.tokenizer is None:
      return None
    sp = sample.sampling
    text = self.tokenizer.decode(sample.output_ids, skip_special_tokens=sp.skip_special_tokens)
    matched = (sample.completion.finish_reason.get("matched")
               if sample.completion is not None else None)
    if isinstance(matched, str) and matched in sp.stop and not sp.no_stop_trim:
      text = text[:text.find(matched)] if matched in text else text
    return text

  def _token_text(self, with_text: bool) -> Callable[[int], str | None]:
    if not with_text or self.tokenizer is None:
      return lambda token: None
    return lambda token: self.tokenizer.decode([token], skip_special_tokens=False)

  async def _logprob_fields(self, sample: _Sample) -> dict:
    """SGLang's input log-probs and top / chosen-id alternatives of one sample."""
    want = sample.logprob_request
    fields = {"input_token_logprobs": []}
    if not want.needs_scoring:
      return fields
    prompt, n = sample.prompt_ids, len(sample.output_ids)
    next_logp, top_logp, top_ids, ids_logp = await self.worker.score(
        prompt + sample.output_ids, sample.sampling.temperature, want.top_n,
        want.token_ids or ())
    text = self._token_text(want.with_text)
    triplets = lambda values, ids: [[float(v), int(t), text(int(t))] for v, t in zip(values, ids)]
    inputs = range(want.start, len(prompt)) if want.start >= 0 else range(0)
    # position p's log-probs come from the distribution after p - 1 (none for p = 0)
    fields["input_token_logprobs"] = [
        [None if p == 0 else float(next_logp[p - 1]), prompt[p], text(prompt[p])] for p in inputs]
    outputs = range(len(prompt) - 1, len(prompt) - 1 + n)
    if want.top_n:
      top = lambda q: triplets(top_logp[q], top_ids[q])
      fields["input_top_logprobs"] = [None if p == 0 else top(p - 1) for p in inputs]
      fields["output_top_logprobs"] = [top(q) for q in outputs]
    if want.token_ids:
      chosen = lambda q: triplets(ids_logp[q], want.token_ids)
      fields["input_token_ids_logprobs"] = [None if p == 0 else chosen(p - 1) for p in inputs]
      fields["output_token_ids_logprobs"] = [chosen(q) for q in outputs]
    return fields

  async def _answer(self, sample: _Sample, received: float) -> dict:
    done = sample.completion
    text = self._text(sample)
    fields = await self._logprob_fields(sample) if sample.return_logprob else None
    return response_json(
        sample.id, sample.prompt_ids, sample.output_ids, sample.logprobs,
        None if done is None else done.finish_reason,
        self.engine.weight_version if done is None else done.weight_version,
        time.perf_counter() - received, sample.return_logprob, text, fields,
        self._token_text(sample.logprob_request.with_text))

  # ---- OpenAI-compatible API ----

  async def v1_models(self, request: web.Request) -> web.Response:
    return _json_response({"object": "list", "data": [{
        "id": self.model_path, "object": "model", "created": int(self._started),
        "owned_by": "kimi_jax", "root": self.model_path, "max_model_len": self.context_length}]})

  async def v1_completions(self, request: web.Request) -> web.StreamResponse:
    encode = None if self.tokenizer is None else self.tokenizer.encode
    parsed = openai_api.parse_completion_request(await _json_body(request), encode,
                                                 self.context_length)
    return await self._openai(request, parsed, chat=False)

  async def v1_chat_completions(self, request: web.Request) -> web.StreamResponse:
    template = None if self.tokenizer is None else self.tokenizer.chat_template
    parsed = openai_api.parse_chat_request(
        await _json_body(request), None if template is None else template.render,
        None if self.tokenizer is None else self.tokenizer.encode, self.context_length)
    return await self._openai(request, parsed, chat=True)

  async def _openai(self, request: web.Request, parsed, chat: bool) -> web.StreamResponse:
    """Serve a parsed completions / chat request (choice i: prompt i // n, sample i % n)."""
    rids = [openai_api.new_id("req") for _ in parsed.prompts]
    req = GenerateRequest(
        parsed.prompts, parsed.sampling, rids,
        [[f"{rid}-{j}" for j in range(sp.n)] for rid, sp in zip(rids, parsed.sampling)],
        [parsed.return_logprob] * len(rids), [parsed.logprobs] * len(rids), parsed.stream, True,
        parsed.image_data)
    request_id = openai_api.new_id("chatcmpl" if chat else "cmpl")
    model = parsed.model or self.model_path
    kind = "chat.completion" if chat else "text_completion"
    # Counted once the images' pads are expanded (in req.prompts, while it runs).
    prompt_tokens = lambda: sum(map(len, req.prompts))
    if not parsed.stream:
      samples = await self._run(req)
      choices = [await self._openai_choice(i, s, chat) for i, s in enumerate(samples)]
      usage = openai_api.usage(prompt_tokens(), sum(len(s.output_ids) for s in samples))
      return _json_response(openai_api.envelope(kind, request_id, model, choices,
                                                   usage=usage))
    response = await _event_stream(request)
    sent = {}  # sample index -> text already streamed

    async def send(samples: list[_Sample], i: int) -> None:
      sample = samples[i]
      text = self._text(sample) or ""
      if sample.completion is None:  # hold back what a stop string might still cut off
        text = text[:len(text) - max(map(len, sample.sampling.stop), default=1) + 1]
      delta, first = text[len(sent.get(i, "")):], i not in sent
      if not (delta or first or sample.completion):
        return
      sent[i] = text
      reason = openai_api.finish_reason(None if sample.completion is None
                                        else sample.completion.finish_reason)
      if chat:
        choice = {"index": i, "delta": {"role": "assistant", "content": delta} if first
                  else {"content": delta}, "logprobs": None, "finish_reason": reason}
      else:
        choice = {"index": i, "text": delta, "logprobs": None, "finish_reason": reason}
      await _send_event(response, openai_api.envelope(kind + ("" if not chat else ".chunk"),
                                                      request_id, model, [choice]))

    samples = await self._streamed(response, req, send)
    if parsed.include_usage and samples is not None:
      await _send_event(response, openai_api.envelope(
          kind + (".chunk" if chat else ""), request_id, model, [],
          usage=openai_api.usage(prompt_tokens(), sum(len(s.output_ids) for s in samples))))
    return await _end_event_stream(response)

  async def _openai_choice(self, index: int, sample: _Sample, chat: bool) -> dict:
    text = self._text(sample) or ""
    reason = sample.completion.finish_reason
    choice = {"index": index, "logprobs": None, "finish_reason": openai_api.finish_reason(reason),
              "matched_stop": openai_api.matched_stop(reason)}
    if sample.return_logprob:
      fields = await self._logprob_fields(sample)
      token_text = self._token_text(True)
      triplets = [[lp, t, token_text(t) or ""] for lp, t in zip(sample.logprobs, sample.output_ids)]
      top = fields.get("output_top_logprobs")
      choice["logprobs"] = (openai_api.chat_logprobs(triplets, top) if chat
                            else openai_api.completion_logprobs(triplets, top))
    if chat:
      choice["message"] = {"role": "assistant", "content": text}
    else:
      choice["text"] = text
    return choice

  # ---- admin ----

  async def health(self, request: web.Request) -> web.Response:
    if not self.worker.healthy:
      return web.Response(status=503, text="rollout engine failed; resetting\n")
    return web.Response(status=200)

  async def model_info(self, request: web.Request) -> web.Response:
    config = self.engine.config
    return _json_response({
        "model_path": self.model_path, "tokenizer_path": self.model_path if self.tokenizer else None,
        "is_generation": True, "preferred_sampling_params": None,
        "weight_version": self.engine.weight_version,
        "has_image_understanding": config.vision is not None,
        "has_audio_understanding": False, "model_type": config.architecture,
        "architectures": hf.config_to_hf(config)["architectures"]})

  async def server_info(self, request: web.Request) -> web.Response:
    """SGLang's answer: its ServerArgs fields (slime compares several with the ones it would
    launch), scheduler facts, `internal_states` and `version`."""
    load = self.worker.load
    host, port = self._bound
    return _json_response({
        "model_path": self.model_path, "tokenizer_path": self.model_path if self.tokenizer else None,
        "tokenizer_mode": "auto", "skip_tokenizer_init": self.tokenizer is None,
        "load_format": "auto", "trust_remote_code": False, "dtype": self.engine.config.dtype,
        "served_model_name": self.model_path, "host": host, "port": port, "url": self.url,
        "context_length": self.context_length, "max_running_requests": self.engine.max_batch,
        "max_total_num_tokens": self.engine.max_batch * self.engine.max_seq_len,
        "chunked_prefill_size": self.engine.prefill_tokens, "random_seed": self.engine.seed,
        "tp_size": 1, "dp_size": 1, "pp_size": 1, "ep_size": 1, "nnodes": 1, "node_rank": 0,
        "base_gpu_id": 0, "gpu_id_step": 1, "dist_init_addr": None,
        "enable_memory_saver": True,  # /release_memory_occupation really frees device memory
        "disaggregation_mode": "null", "skip_server_warmup": True,
        "weight_version": self.engine.weight_version, "version": VERSION,
        "internal_states": [{"num_running_reqs": load.num_running,
                             "num_queued_reqs": load.num_queued, "paused": self.worker.paused}]})

  async def get_weight_version(self, request: web.Request) -> web.Response:
    return _json_response({"weight_version": self.engine.weight_version})

  async def health_generate(self, request: web.Request) -> web.Response:
    """200 once a one-token generation completes, 503 if none does within the timeout."""
    arrivals: asyncio.Queue[Update] = asyncio.Queue()
    rid = f"HEALTH_CHECK_{uuid.uuid4().hex}"
    try:
      await self.worker.submit([[0]], [SamplingParams(max_new_tokens=1, ignore_eos=True)], [rid],
                               [[rid]], arrivals.put_nowait)
    except ValueError as error:  # e.g. memory released
      return web.Response(status=503, text=f"{error}\n")
    try:
      while True:
        update = await asyncio.wait_for(arrivals.get(), _HEALTH_TIMEOUT_S)
        if isinstance(update, EngineFailure):
          return web.Response(status=503, text=f"{update}\n")
        if update.completion is not None:
          break
    except asyncio.TimeoutError:
      await self.worker.abort([rid], "health check timed out")
      return web.Response(status=503, text="no generation within the health-check timeout\n")
    return web.Response(status=200)

  def _counts(self) -> tuple[int, int]:
    running = min(self.worker.load.num_running, self._open_samples)
    return running, self._open_samples - running

  async def get_load(self, request: web.Request) -> web.Response:
    running, waiting = self._counts()
    return _json_response([{"dp_rank": 0, "num_reqs": running + waiting,
                               "num_waiting_reqs": waiting,
                               "num_tokens": self.worker.load.num_tokens}])

  async def v1_loads(self, request: web.Request) -> web.Response:
    load = self.worker.load
    running, waiting = self._counts()
    usage = load.num_tokens / (self.engine.max_batch * self.engine.max_seq_len)
    utilization = running / self.engine.max_batch
    return _json_response({
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
    if request_checks.flag(body, "abort_all"):
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
    return _json_response({"message": "Generation paused successfully.", "status": "ok"})

  async def continue_generation(self, request: web.Request) -> web.Response:
    await self.worker.set_paused(False)
    return _json_response({"message": "Generation continued successfully.", "status": "ok"})

  async def flush_cache(self, request: web.Request) -> web.Response:
    # No prefix cache to flush; like SGLang 0.5, refuse while requests run unless paused.
    if self._open_samples and not self.worker.paused:
      return web.Response(status=400, text="Cache not flushed: requests are running or waiting.\n")
    return web.Response(status=200, text="Cache flushed.\n")

  async def update_weights_from_disk(self, request: web.Request) -> web.Response:
    body = await _json_body(request)
    path = body.get("model_path")
    if not isinstance(path, str) or not path:
      raise RequestError("'model_path' (an HF safetensors directory) is required")
    version = body.get("weight_version")
    version = self.engine.weight_version if version is None else str(version)
    abort_all = request_checks.flag(body, "abort_all_requests")
    failed = lambda message: _json_response(
        {"success": False, "message": message, "num_paused_requests": 0}, status=400)
    try:
      config, params = await asyncio.get_running_loop().run_in_executor(
          None, self.load_checkpoint, path)
    except Exception as error:  # noqa: BLE001 -- any unreadable checkpoint is the caller's error
      return failed(f"Failed to load {path}: {type(error).__name__}: {error}")
    poisoned = await asyncio.get_running_loop().run_in_executor(
        None, request_checks.non_finite_tensor, params)
    if poisoned is not None:
      return failed(f"{path}: tensor {poisoned} holds NaN or infinite values; weights not loaded")
    differs = {f: (getattr(config, f), getattr(self.engine.config, f))
               for f in _ARCHITECTURE_FIELDS if getattr(config, f) != getattr(self.engine.config, f)}
    if differs:
      return failed(f"{path}: config differs from the served model in (new, served) {differs}")
    if abort_all:
      await self.worker.abort(None, "aborted by /update_weights_from_disk")
    try:
      await self.worker.swap_weights(params, version)
    except ValueError as error:
      return failed(str(error))
    return _json_response({"success": True, "message": "Succeeded to update model weights.",
                              "num_paused_requests": 0})


  async def _memory_occupation(self, request: web.Request, change) -> web.Response:
    tags = (await _json_body(request)).get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
      raise RequestError(f"'tags' must be null or a list of strings, got {tags!r}")
    try:
      await change(tags)
    except ValueError as error:
      raise RequestError(str(error)) from error
    return _json_response(None)  # SGLang answers 200 with a JSON null

  async def release_memory_occupation(self, request: web.Request) -> web.Response:
    """Hybrid deployment: drop the KV cache and/or weights from device memory until resumed."""
    return await self._memory_occupation(request, self.worker.release_memory)

  async def resume_memory_occupation(self, request: web.Request) -> web.Response:
    return await self._memory_occupation(request, self.worker.resume_memory)


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
