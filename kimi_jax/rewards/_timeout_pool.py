"""Worker processes that call one trusted function with a hard timeout on every call.

math-verify (sympy) can run for ever on some inputs, and its own timeout (signal.alarm) fails
in threads and cannot interrupt long C calls such as huge integer powers. Here each call runs in
a long-lived worker process; a call that overruns its deadline has its worker SIGKILLed and
replaced and yields the caller's default, while the other workers keep going.

Workers are `python -m kimi_jax.rewards._timeout_pool module:function memory_mb`, fresh
interpreters (the parent, which may hold JAX threads, is never forked) speaking JSON lines:
a list of arguments in, {"result": value} or {"error": text} out, after a first "ready" line.

Workers never outlive the pool's process: each runs in its own process group (killed as a whole)
and asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG), so a kill -9 of the
trainer does not leave a worker spinning on a hopeless input. PR_SET_PDEATHSIG fires when the
*thread* that forked the worker exits, so every worker is started by one long-lived launcher
thread, never by the (possibly short-lived) thread that calls `map`. A worker that dies between
calls is replaced before it is given work.
"""
import collections
import ctypes
import importlib
import json
import os
import queue
import resource
import selectors
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

_READY = b"ready"
_STARTUP_TIMEOUT_S = 120.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class _Launcher:
  """Starts processes from one daemon thread that lives as long as the interpreter."""

  def __init__(self):
    self._requests: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=self._serve, name="timeout-pool-launcher", daemon=True).start()

  def _serve(self) -> None:
    while True:
      argv, reply = self._requests.get()
      try:
        reply.put(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   start_new_session=True))
      except BaseException as error:  # handed to the caller
        reply.put(error)

  def popen(self, argv: list[str]) -> subprocess.Popen:
    reply: queue.SimpleQueue = queue.SimpleQueue()
    self._requests.put((argv, reply))
    result = reply.get()
    if isinstance(result, BaseException):
      raise result
    return result


_launcher: _Launcher | None = None
_launcher_lock = threading.Lock()


def _launch(argv: list[str]) -> subprocess.Popen:
  global _launcher
  with _launcher_lock:
    if _launcher is None:
      _launcher = _Launcher()
  return _launcher.popen(argv)


class _Worker:
  """One worker process; `pending` holds (call index, deadline) while it computes."""

  def __init__(self, target: str, memory_mb: int):
    self.proc = _launch([sys.executable, "-m", __name__, target, str(memory_mb),
                         str(os.getpid())])
    self.started = time.monotonic()
    self.ready = False
    self.pending: tuple[int, float] | None = None
    self._buffer = b""

  def send(self, index: int, args: Sequence[Any], timeout_s: float) -> bool:
    """Hand the worker a call; False if it has died (the call did not reach it)."""
    try:
      self.proc.stdin.write(json.dumps(list(args)).encode() + b"\n")
      self.proc.stdin.flush()
    except (BrokenPipeError, ValueError):  # ValueError: our end is already closed
      return False
    self.pending = (index, time.monotonic() + timeout_s)
    return True

  def read_lines(self) -> list[bytes] | None:
    """Complete lines received so far; None once the worker has closed its output (died)."""
    chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
    if not chunk:
      return None
    *lines, self._buffer = (self._buffer + chunk).split(b"\n")
    return lines

  def kill(self) -> None:
    try:
      os.killpg(self.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    self.proc.wait()
    for pipe in (self.proc.stdin, self.proc.stdout):
      try:
        pipe.close()
      except OSError:  # unflushed input for a dead worker
        pass


class TimeoutPool:
  """`num_workers` processes running `target` ("module:function"), one call at a time each.

  `map` is thread-safe (calls from several threads are serialised). Counters: `timeouts`
  (calls killed at their deadline), `errors` (calls that raised or whose worker died).
  """

  def __init__(self, target: str, num_workers: int, timeout_s: float, memory_mb: int):
    for name, value in (("num_workers", num_workers), ("timeout_s", timeout_s),
                        ("memory_mb", memory_mb)):
      if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    self.target, self.timeout_s, self.memory_mb = target, timeout_s, memory_mb
    self.timeouts = self.errors = 0
    self._lock = threading.Lock()
    self._selector = selectors.DefaultSelector()
    self._workers: list[_Worker] = []
    self._closed = False
    for _ in range(num_workers):
      self._workers.append(self._start())

  @property
  def worker_pids(self) -> list[int]:
    return [w.proc.pid for w in self._workers]

  def _start(self) -> _Worker:
    worker = _Worker(self.target, self.memory_mb)
    self._selector.register(worker.proc.stdout, selectors.EVENT_READ, worker)
    return worker

  def _stop(self, worker: _Worker) -> None:
    try:
      self._selector.unregister(worker.proc.stdout)
    except (KeyError, ValueError):  # never registered, or its pipe is already closed
      pass
    worker.kill()

  def _replace(self, worker: _Worker) -> None:
    self._stop(worker)
    self._workers[self._workers.index(worker)] = self._start()

  def map(self, calls: Sequence[Sequence[Any]], default: Any) -> list[Any]:
    """`target(*args)` for each args in `calls`, in order; `default` where a call failed."""
    with self._lock:
      if self._closed:
        raise RuntimeError(f"TimeoutPool for {self.target} is closed")
      results = [default] * len(calls)
      todo = collections.deque(range(len(calls)))
      while todo or any(w.pending for w in self._workers):
        for worker in list(self._workers):
          if worker.ready and worker.pending is None and todo:
            index = todo.popleft()
            if not worker.send(index, calls[index], self.timeout_s):
              todo.appendleft(index)
              self._replace(worker)
        for key, _ in self._selector.select(self._next_wakeup()):
          self._receive(key.data, results)
        self._enforce_deadlines()
      return results

  def _next_wakeup(self) -> float:
    deadlines = [w.pending[1] for w in self._workers if w.pending]
    deadlines += [w.started + _STARTUP_TIMEOUT_S for w in self._workers if not w.ready]
    return max(0.0, min(deadlines) - time.monotonic())

  def _receive(self, worker: _Worker, results: list[Any]) -> None:
    lines = worker.read_lines()
    if lines is None:  # died: out of memory, or killed from outside
      code = worker.proc.wait()
      if not worker.ready and code >= 0:  # exited by itself: the target cannot be imported
        raise RuntimeError(f"worker for {self.target} exited during start-up "
                           f"(code {code}); see its stderr above")
      self.errors += worker.pending is not None
      self._replace(worker)
      return
    for line in lines:
      if line == _READY:
        worker.ready = True
        continue
      reply = json.loads(line)
      index, _ = worker.pending
      worker.pending = None
      if "result" in reply:
        results[index] = reply["result"]
      else:
        self.errors += 1

  def _enforce_deadlines(self) -> None:
    now = time.monotonic()
    for worker in list(self._workers):
      if worker.pending and now >= worker.pending[1]:
        self.timeouts += 1
        self._replace(worker)
      elif not worker.ready and now >= worker.started + _STARTUP_TIMEOUT_S:
        raise RuntimeError(f"worker for {self.target} not ready after {_STARTUP_TIMEOUT_S} s")

  def close(self) -> None:
    """Kill every worker (idempotent)."""
    with self._lock:
      if self._closed:
        return
      self._closed = True
      for worker in self._workers:
        self._stop(worker)
      self._workers = []
      self._selector.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _die_with(parent_pid: int) -> None:
  """SIGKILL this process when its parent dies (and now if it already has)."""
  libc = ctypes.CDLL(None, use_errno=True)
  if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
  if os.getppid() != parent_pid:  # the parent died before prctl took effect
    os._exit(1)


def _serve(target: str, memory_mb: int) -> None:
  """Worker main loop; results go to a private copy of stdout, stray prints to stderr."""
  memory = memory_mb * 2**20
  resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
  replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
  module, function = target.split(":")
  fn = getattr(importlib.import_module(module), function)
  replies.write(_READY + b"\n")
  replies.flush()
  for line in sys.stdin.buffer:
    try:
      reply = {"result": fn(*json.loads(line))}
    except Exception as e:  # noqa: BLE001 -- any failure of one call is that call's error
      reply = {"error": f"{type(e).__name__}: {e}"}
    replies.write(json.dumps(reply).encode() + b"\n")
    replies.flush()


if __name__ == "__main__":
  _die_with(int(sys.argv[3]))
  _serve(sys.argv[1], int(sys.argv[2]))
