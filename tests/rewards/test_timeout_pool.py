"""TimeoutPool: order, defaults, hard timeouts, crashes and errors, all counted exactly.

The worker targets are the functions below; workers import this module by name.
"""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from kimi_jax.rewards._timeout_pool import TimeoutPool

TARGET = f"{__name__}:behave"


def behave(action: str, value):
  """Worker target: echo `value`, or misbehave as `action` says."""
  if action == "hang":
    while True:
      pass
  if action == "exit":
    os._exit(3)
  if action == "raise":
    raise ValueError(value)
  if action == "allocate":
    return len(bytearray(value * 2**20))
  return value


@pytest.fixture(scope="module")
def pool():
  with TimeoutPool(TARGET, num_workers=2, timeout_s=1.0, memory_mb=1024) as p:
    yield p


def test_results_in_order(pool):
  assert pool.map([("echo", i) for i in range(20)], default=None) == list(range(20))


def test_failures_get_the_default_and_are_counted(pool):
  timeouts, errors = pool.timeouts, pool.errors
  calls = [("echo", 1), ("hang", 2), ("echo", 3), ("exit", 4), ("raise", 5), ("echo", 6),
           ("allocate", 4096), ("hang", 8), ("echo", 9)]
  assert pool.map(calls, default=-1) == [1, -1, 3, -1, -1, 6, -1, -1, 9]
  assert pool.timeouts - timeouts == 2
  assert pool.errors - errors == 3  # exit, raise, allocation above memory_mb
  # Every replaced worker serves the next batch.
  assert pool.map([("echo", i) for i in range(6)], default=None) == list(range(6))


def test_hanging_call_returns_near_its_deadline(pool):
  pool.map([("echo", 0)] * 2, default=None)  # both workers started
  start = time.monotonic()
  assert pool.map([("hang", 0)], default="timed out") == ["timed out"]
  # A hang detector, not a speed check: without the kill this would never return.
  assert time.monotonic() - start < 1.0 + 30.0


def _alive(pid: int) -> bool:
  """Whether `pid` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      return not dict(line.split(":", 1) for line in f)["State"].strip().startswith("Z")
  except FileNotFoundError:
    return False


def _wait_until_dead(pids, timeout_s: float) -> list[int]:
  deadline = time.monotonic() + timeout_s
  while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
    time.sleep(0.05)
  return alive


def test_workers_killed_between_calls_are_replaced_and_close_kills_all():
  pool = TimeoutPool(TARGET, num_workers=2, timeout_s=5.0, memory_mb=1024)
  assert pool.map([("echo", i) for i in range(8)], default=None) == list(range(8))
  first = pool.worker_pids
  for pid in first:  # both die while idle (e.g. the OOM killer): no call was lost
    os.kill(pid, signal.SIGKILL)
  assert _wait_until_dead(first, 5.0) == []
  assert pool.map([("echo", i) for i in range(8)], default=None) == list(range(8))
  assert pool.errors == pool.timeouts == 0
  second = pool.worker_pids
  assert set(second).isdisjoint(first)
  os.kill(second[0], signal.SIGKILL)  # a dead worker at close time is no error either
  pool.close()
  pool.close()
  assert _wait_until_dead(second, 5.0) == []
  with pytest.raises(RuntimeError, match="closed"):
    pool.map([("echo", 1)], default=None)


def test_a_pool_made_on_a_finished_thread_keeps_its_workers():
  # The kernel's parent-death signal follows the thread that forked a worker, not the process.
  made = []
  thread = threading.Thread(target=lambda: made.append(TimeoutPool(TARGET, 2, 5.0, 1024)))
  thread.start()
  thread.join()
  with made[0] as pool:
    assert pool.map([("echo", i) for i in range(6)], default=None) == list(range(6))
    assert pool.errors == 0


def test_workers_die_with_their_parent():
  # A parent killed with SIGKILL runs no clean-up; its worker, stuck in a call that never
  # returns, must still die with it.
  parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {os.getcwd()!r})
      from kimi_jax.rewards._timeout_pool import TimeoutPool
      pool = TimeoutPool({TARGET!r}, 1, 3600.0, 1024)
      pool.map([("echo", 0)], default=None)
      print(*pool.worker_pids, flush=True)
      pool.map([("hang", 0)], default=None)
      """)], stdout=subprocess.PIPE, cwd=os.getcwd(), text=True)
  workers = [int(pid) for pid in parent.stdout.readline().split()]
  time.sleep(0.5)  # the worker is now spinning in "hang"
  assert workers and all(map(_alive, workers))
  parent.kill()
  parent.wait()
  assert _wait_until_dead(workers, 10.0) == []


def test_bad_target_fails_loudly():
  with TimeoutPool("kimi_jax.no_such_module:f", 1, 1.0, 512) as broken:
    with pytest.raises(RuntimeError, match="exited during start-up"):
      broken.map([()], default=None)


@pytest.mark.parametrize("field, value", [("num_workers", 0), ("timeout_s", 0.0),
                                          ("memory_mb", -1)])
def test_arguments_are_validated(field, value):
  kwargs = dict(num_workers=1, timeout_s=1.0, memory_mb=512)
  with pytest.raises(ValueError, match=field):
    TimeoutPool(TARGET, **{**kwargs, field: value})
