"""Async client for SGLang's native HTTP API: real SGLang servers or our RolloutServer.

Token-in/token-out: one /generate request per prompt (its n samples come back grouped), sent
to the least-loaded healthy server of a data-parallel fleet, with a concurrency limit,
timeouts, and retries with exponential backoff on connection errors and 5xx answers (a 4xx is
the caller's mistake and is raised at once). Every prompt is answered or reported failed
exactly once: `generate` returns all completions, or raises `RolloutFailure` carrying the
answers it got and one error per failed prompt.
"""
import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Sequence

import aiohttp

from kimi_jax.rollout.protocol import completion_from_response, generate_request_json
from kimi_jax.rollout.types import Completion, SamplingParams

_RETRYABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)


class ServerRequestError(RuntimeError):
  """A server rejected a request as malformed (4xx); retrying would not help."""


class RolloutFailure(RuntimeError):
  """Some prompts failed on every attempt.

  `completions[i]` holds prompt i's samples (None where it failed); `errors[i]` says why.
  """

  def __init__(self, completions: list[list[Completion] | None], errors: dict[int, str]):
    self.completions = completions
    self.errors = errors
    shown = "; ".join(f"prompt {i}: {e}" for i, e in list(errors.items())[:3])
    super().__init__(f"{len(errors)} of {len(completions)} prompts failed: {shown}")


def _error_message(status: int, text: str) -> str:
  try:
    body = json.loads(text)
    message = body["error"]["message"] if "error" in body else body.get("message", text)
  except (ValueError, TypeError, KeyError):
    message = text
  return f"HTTP {status}: {message}"


class SGLangClient:
  """Talks to one or more SGLang-compatible servers; use it inside one event loop.

  Args:
    urls: base URLs of the fleet, e.g. ["http://127.0.0.1:30000"].
    max_concurrency: /generate requests in flight at once, over all servers.
    timeout_s: total time allowed for one HTTP request.
    retries: extra attempts per prompt after a connection error, timeout or 5xx.
    backoff_s: first retry delay; doubles with each retry.
    cooldown_s: a server that failed is skipped for this long while others are healthy.
  """

  def __init__(self, urls: Sequence[str], *, max_concurrency: int = 64, timeout_s: float = 600.0,
               retries: int = 3, backoff_s: float = 0.2, cooldown_s: float = 5.0):
    if not urls:
      raise ValueError("SGLangClient needs at least one server URL")
    self.urls = [u.rstrip("/") for u in urls]
    self.max_concurrency = max_concurrency
    self.timeout = aiohttp.ClientTimeout(total=timeout_s)
    self.retries = retries
    self.backoff_s = backoff_s
    self.cooldown_s = cooldown_s
    self.weight_version: str | None = None
    self._in_flight = {u: 0 for u in self.urls}
    self._down_until = {u: 0.0 for u in self.urls}
    self._turn = 0
    self._session: aiohttp.ClientSession | None = None
    self._slots: asyncio.Semaphore | None = None

  async def __aenter__(self) -> "SGLangClient":
    return self

  async def __aexit__(self, *exc) -> None:
    await self.close()

  async def close(self) -> None:
    if self._session is not None:
      await self._session.close()
      self._session = None

  def _http(self) -> aiohttp.ClientSession:
    if self._session is None:
      self._session = aiohttp.ClientSession(timeout=self.timeout)
      self._slots = asyncio.Semaphore(self.max_concurrency)
    return self._session

  def _pick(self, avoid: set[str]) -> str:
    """Least in-flight among healthy servers not in `avoid` (rotating ties)."""
    now = time.monotonic()
    candidates = ([u for u in self.urls if u not in avoid and self._down_until[u] <= now]
                  or [u for u in self.urls if u not in avoid] or self.urls)
    self._turn += 1
    rotated = candidates[self._turn % len(candidates):] + candidates[:self._turn % len(candidates)]
    return min(rotated, key=self._in_flight.__getitem__)

  # ---- generation ----

  async def generate(self, prompts: Sequence[Sequence[int]],
                     sampling: SamplingParams | Sequence[SamplingParams], *,
                     return_logprob: bool = True,
                     images: Sequence[Sequence[str]] | None = None) -> list[Completion]:
    """Completions grouped [p0 x n, p1 x n, ...], as from RolloutEngine.generate; `images`:
    per prompt its image sources, sent as SGLang's `image_data`."""
    per_prompt = ([sampling] * len(prompts) if isinstance(sampling, SamplingParams)
                  else list(sampling))
    if len(per_prompt) != len(prompts):
      raise ValueError(f"sampling: {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
    images = [None] * len(prompts) if images is None else images
    outcomes = await asyncio.gather(
        *(self._generate_one(list(p), sp, return_logprob, im)
          for p, sp, im in zip(prompts, per_prompt, images)),
        return_exceptions=True)
    errors = {i: str(o) for i, o in enumerate(outcomes) if isinstance(o, BaseException)}
    if errors:
      raise RolloutFailure([None if isinstance(o, BaseException) else o for o in outcomes], errors)
    return [c for samples in outcomes for c in samples]

  async def _generate_one(self, prompt_ids: list[int], sampling: SamplingParams,
                          return_logprob: bool, images=None) -> list[Completion]:
    body = generate_request_json(prompt_ids, sampling, uuid.uuid4().hex, return_logprob)
    if images:
      body["image_data"] = list(images)
    answer = await self._post_with_retries("/generate", body)
    answers = answer if isinstance(answer, list) else [answer]
    if len(answers) != sampling.n:
      raise RuntimeError(f"/generate answered {len(answers)} samples, expected n={sampling.n}")
    return [completion_from_response(a, prompt_ids) for a in answers]

  async def _post_with_retries(self, path: str, body: dict):
    session, failures, tried = self._http(), [], set()
    for attempt in range(self.retries + 1):
      if attempt:
        await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
      url = self._pick(tried)
      tried.add(url)
      async with self._slots:
        self._in_flight[url] += 1
        try:
          async with session.post(url + path, json=body) as response:
            text = await response.text()
            if response.status == 200:
              return json.loads(text)
            failure = _error_message(response.status, text)
            if response.status < 500:
              raise ServerRequestError(f"{url}{path}: {failure}")
        except _RETRYABLE as error:
          failure = f"{type(error).__name__}: {error}"
        finally:
          self._in_flight[url] -= 1
      self._down_until[url] = time.monotonic() + self.cooldown_s
      failures.append(f"{url}: {failure}")
    raise RuntimeError(f"{path} failed after {self.retries + 1} attempts: {failures}")

  async def stream(self, prompt_ids: Sequence[int], sampling: SamplingParams, *,
                   return_logprob: bool = True) -> AsyncIterator[tuple[int, Completion]]:
    """Yields (sample index, cumulative Completion) per server event; finish_reason is None
    until a sample finishes. Not retried: a broken stream raises."""
    body = generate_request_json(list(prompt_ids), sampling, uuid.uuid4().hex, return_logprob,
                                 stream=True)
    session, url = self._http(), self._pick(set())
    async with self._slots:
      self._in_flight[url] += 1
      try:
        async with session.post(url + "/generate", json=body) as response:
          if response.status != 200:
            raise ServerRequestError(f"{url}/generate: "
                                     f"{_error_message(response.status, await response.text())}")
          async for line in response.content:
            line = line.strip()
            if not line.startswith(b"data: "):
              continue
            payload = line[len(b"data: "):]
            if payload == b"[DONE]":
              return
            event = json.loads(payload)
            if "error" in event:
              raise ServerRequestError(f"{url}/generate stream: {event['error']}")
            yield event.get("index", 0), completion_from_response(event, list(prompt_ids))
      finally:
        self._in_flight[url] -= 1
    raise RuntimeError(f"{url}/generate stream ended without data: [DONE]")

  # ---- fleet administration ----

  async def _request(self, method: str, url: str, path: str, body: dict | None = None):
    async with self._http().request(method, url + path, json=body) as response:
      text = await response.text()
      return response.status, text

  async def _get_json_with_fallback(self, url: str, paths: tuple[str, ...]):
    """GET the first of `paths` the server knows (newer SGLang names first)."""
    for path in paths:
      status, text = await self._request("GET", url, path)
      if status == 200:
        return path, json.loads(text)
      if status != 404:
        raise RuntimeError(f"{url}{path}: {_error_message(status, text)}")
    raise RuntimeError(f"{url}: none of {paths} exists")

  async def model_info(self, url: str | None = None) -> dict:
    return (await self._get_json_with_fallback(url or self.urls[0],
                                               ("/model_info", "/get_model_info")))[1]

  async def server_info(self, url: str | None = None) -> dict:
    return (await self._get_json_with_fallback(url or self.urls[0],
                                               ("/server_info", "/get_server_info")))[1]

  async def load(self, url: str) -> int:
    """Requests running or waiting on `url` (/v1/loads, else /get_load)."""
    path, body = await self._get_json_with_fallback(url, ("/v1/loads", "/get_load"))
    if path == "/v1/loads":  # per-rank counts (sglang 0.5.23 sends no "aggregate")
      return sum(int(rank["num_running_reqs"]) + int(rank["num_waiting_reqs"])
                 for rank in body["loads"])
    if isinstance(body, dict):  # older SGLang: {"load": N}
      return int(body["load"])
    return sum(int(rank["num_reqs"]) for rank in body)

  async def abort_all(self) -> None:
    """Abort everything on every server; aborted requests answer with their tokens so far."""
    await self._post_everywhere("/abort_request", {"abort_all": True})

  async def _post_everywhere(self, path: str, body: dict) -> None:
    async def post(url):
      status, text = await self._request("POST", url, path, body)
      if status != 200:
        raise RuntimeError(f"{url}{path}: {_error_message(status, text)}")
    await asyncio.gather(*(post(u) for u in self.urls))

  async def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
    """Every server drops `tags` ("kv_cache", "weights"; None: all) from device memory
    (hybrid deployment: the trainer gets the accelerator while rollouts are idle)."""
    await self._post_everywhere("/release_memory_occupation",
                                {} if tags is None else {"tags": list(tags)})

  async def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
    """Undo `release_memory_occupation` for `tags` (None: all)."""
    await self._post_everywhere("/resume_memory_occupation",
                                {} if tags is None else {"tags": list(tags)})

  async def wait_until_idle(self, poll_s: float = 0.05, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
      loads = await asyncio.gather(*(self.load(u) for u in self.urls))
      if not any(loads):
        return
      if time.monotonic() > deadline:
        raise TimeoutError(f"servers still busy after {timeout_s}s: {dict(zip(self.urls, loads))}")
      await asyncio.sleep(poll_s)

  async def update_weights_from_disk(self, model_path: str, weight_version: str, *,
                                     abort_all_requests: bool = False) -> None:
    """Point every server at an HF safetensors directory; checks each reports the version."""
    body = {"model_path": model_path, "weight_version": str(weight_version),
            "abort_all_requests": abort_all_requests, "flush_cache": True}

    async def update(url):
      status, text = await self._request("POST", url, "/update_weights_from_disk", body)
      answer = json.loads(text) if text else {}
      if status != 200 or not answer.get("success"):
        raise RuntimeError(f"{url}/update_weights_from_disk: {_error_message(status, text)}")
      reported = (await self.model_info(url)).get("weight_version")
      if str(reported) != str(weight_version):
        raise RuntimeError(f"{url}: reports weight_version {reported!r} after updating to "
                           f"{weight_version!r}")

    results = await asyncio.gather(*(update(u) for u in self.urls), return_exceptions=True)
    failed = [str(r) for r in results if isinstance(r, BaseException)]
    if failed:
      raise RuntimeError(f"weight update failed on {len(failed)} of {len(self.urls)} servers: "
                         f"{failed}")
    self.weight_version = str(weight_version)
