"""The engine on its own thread, so an asyncio server stays responsive while it decodes.

Only the worker thread touches the engine. The event loop sends it commands and receives
every `Update` through per-request sinks called on the loop. Commands come in two kinds:
urgent ones (abort, pause) run before the next decode chunk; ordered ones (submit, weight
swap) run in arrival order, and a weight swap waits until the engine is idle (or paused), so
requests already admitted finish on the weights they started with, like SGLang's
/update_weights_from_disk. An urgent command still comes after the ordered ones sent before it
that can run (not a weight swap waiting for idle), so an abort reaches a request submitted
just before it.

If a decode step raises, every request in flight receives an `EngineFailure` instead of an
`Update`, the engine is reset and the loop goes on; `healthy` is False from the failure until
the reset has succeeded.
"""
import asyncio
import collections
import dataclasses
import logging
import threading
import time
from typing import Callable

from kimi_jax.rollout.engine import RolloutEngine, Update


class EngineFailure(RuntimeError):
  """Delivered to the sink of every request that was in flight when the engine failed."""

  def __init__(self, uid: int, message: str):
    super().__init__(message)
    self.uid = uid


Sink = Callable[[Update | EngineFailure], None]
_THROUGHPUT_EMA = 0.9


@dataclasses.dataclass(frozen=True)
class LoadSnapshot:
  num_running: int = 0
  num_queued: int = 0
  num_tokens: int = 0
  tokens_per_s: float = 0.0


def _resolve(future: asyncio.Future, result=None, error: BaseException | None = None):
  if future.done():  # the awaiting handler was cancelled
    return
  if error is None:
    future.set_result(result)
  else:
    future.set_exception(error)


class EngineWorker:
  """Owns `engine`; call `start()` from inside the event loop that will receive updates."""

  def __init__(self, engine: RolloutEngine):
    self.engine = engine
    self.load = LoadSnapshot()
    self.paused = False
    self.healthy = True
    self._loop: asyncio.AbstractEventLoop | None = None
    self._wake = threading.Condition()
    # Commands with their sending order: (seq, run) and (seq, run, barrier).
    self._sent = 0
    self._urgent: list[tuple[int, Callable[[], None]]] = []
    self._ordered: collections.deque[tuple[int, Callable[[], None], bool]] = collections.deque()
    self._sinks: dict[int, Sink] = {}
    self._uid_names: dict[int, tuple[str, str]] = {}  # uid -> (request rid, sample id)
    self._stopping = False
    self._thread = threading.Thread(target=self._run, name="rollout-engine", daemon=True)

  def start(self) -> None:
    self._loop = asyncio.get_running_loop()
    self._thread.start()

  def stop(self) -> None:
    with self._wake:
      self._stopping = True
      self._wake.notify()
    self._thread.join()

  # ---- commands, called from the event loop ----

  def _call(self, fn, *, urgent: bool = False, barrier: bool = False) -> asyncio.Future:
    future = self._loop.create_future()

    def run():
      try:
        result = fn()
      except Exception as error:  # handed to the awaiting handler
        self._loop.call_soon_threadsafe(_resolve, future, None, error)
      else:
        self._loop.call_soon_threadsafe(_resolve, future, result)

    with self._wake:
      self._sent += 1
      if urgent:
        self._urgent.append((self._sent, run))
      else:
        self._ordered.append((self._sent, run, barrier))
      self._wake.notify()
    return future

  def submit(self, prompts, sampling, rids: list[str], sample_ids: list[list[str]],
             sink: Sink, images=None) -> asyncio.Future:
    """Queue prompts (a rid per prompt, an id per sample, optional images per prompt);
    resolves to their uids, grouped like `engine.submit`."""
    def run():
      uids = self.engine.submit(prompts, sampling, images)
      names = [(rid, sample_id) for rid, ids in zip(rids, sample_ids) for sample_id in ids]
      for uid, name in zip(uids, names):
        self._uid_names[uid] = name
        self._sinks[uid] = sink
      return uids
    return self._call(run)

  def abort(self, rids: list[str] | None, message: str) -> asyncio.Future:
    """Abort the samples whose rid or id starts with one of `rids` (SGLang matches prefixes,
    so "r" reaches a batch's "r_0", "r_1"...; None: all); they finish with their tokens so far."""
    def run():
      uids = None if rids is None else [
          uid for uid, names in self._uid_names.items()
          if any(name.startswith(r) for name in names for r in rids)]
      if uids != []:
        self._dispatch(self.engine.abort(uids, message))
    return self._call(run, urgent=True)

  def set_paused(self, paused: bool, abort_message: str | None = None) -> asyncio.Future:
    def run():
      if abort_message is not None:
        self._dispatch(self.engine.abort(None, abort_message))
      self.paused = paused
    return self._call(run, urgent=True)

  def swap_weights(self, params, weight_version: str) -> asyncio.Future:
    return self._call(lambda: self.engine.update_weights(params, weight_version), barrier=True)

  def score(self, token_ids, temperature: float, top_n: int, ids) -> asyncio.Future:
    """`engine.score` on the engine thread (between decode chunks)."""
    return self._call(lambda: self.engine.score(token_ids, temperature, top_n, ids))

  def release_memory(self, tags) -> asyncio.Future:
    """Once the engine is idle (or paused), free the device memory of `tags`."""
    return self._call(lambda: self.engine.release_memory(tags), barrier=True)

  def resume_memory(self, tags) -> asyncio.Future:
    return self._call(lambda: self.engine.resume_memory(tags), barrier=True)

  # ---- the worker thread ----

  def _head_ready(self) -> bool:
    """Under the lock: may the oldest ordered command run now (a barrier waits for idle)?"""
    return bool(self._ordered) and (not self._ordered[0][2] or self.paused
                                    or not self.engine.has_work)

  def _ready(self) -> bool:
    """Under the lock: is there anything to do right now?"""
    return self._stopping or bool(self._urgent) or self._head_ready() or self._can_step()

  def _can_step(self) -> bool:
    return self.engine.has_work and not self.paused

  def _run(self) -> None:
    while True:
      with self._wake:
        self._wake.wait_for(self._ready)
        if self._stopping:
          return
        urgent, self._urgent = self._urgent, []
      for seq, run in urgent:
        self._run_ordered(sent_before=seq)
        run()
      self._run_ordered()
      throughput = self.load.tokens_per_s
      if self._can_step():
        start = time.perf_counter()
        try:
          updates = self.engine.step()
        except Exception as error:  # noqa: BLE001 -- any failure fails the requests in flight
          self._recover(error)
        else:
          self._dispatch(updates)
          rate = sum(len(u.new_ids) for u in updates) / max(time.perf_counter() - start, 1e-9)
          throughput = _THROUGHPUT_EMA * throughput + (1 - _THROUGHPUT_EMA) * rate
      self.load = LoadSnapshot(self.engine.num_running, self.engine.num_queued,
                               self.engine.num_tokens, throughput)

  def _run_ordered(self, sent_before: float = float("inf")) -> None:
    """Run the ordered commands sent before `sent_before` while the oldest may run now."""
    while True:
      with self._wake:
        if not self._head_ready() or self._ordered[0][0] >= sent_before:
          return
        _, run, _ = self._ordered.popleft()
      run()

  def _recover(self, error: Exception) -> None:
    """Fail every request in flight with `error`, then reset the engine."""
    self.healthy = False
    message = f"engine failure: {type(error).__name__}: {error}"
    logging.error("rollout %s; failing %d requests and resetting the engine", message,
                  len(self._sinks), exc_info=error)
    sinks, self._sinks = self._sinks, {}
    self._uid_names.clear()
    for uid, sink in sinks.items():
      self._loop.call_soon_threadsafe(sink, EngineFailure(uid, message))
    try:
      self.engine.reset(message)
    except Exception:  # noqa: BLE001 -- stays unhealthy; reported, not raised on this thread
      logging.exception("rollout engine reset failed; /health stays 503")
      return
    self.healthy = True

  def _dispatch(self, updates: list[Update]) -> None:
    for update in updates:
      sink = self._sinks.get(update.uid)
      if update.completion is not None:
        self._sinks.pop(update.uid, None)
        self._uid_names.pop(update.uid, None)
      if sink is not None:
        self._loop.call_soon_threadsafe(sink, update)
