"""TimeoutPool: order, defaults, hard timeouts, crashes and errors, all counted exactly.

The worker targets are the functions below; workers import this module by name.
"""
import os
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
