"""Threads standing in for the processes of one job: each gets a `Processes` whose all-gather
meets the others' at a barrier, so code that splits work over processes runs in one test."""
import functools
import threading
from concurrent import futures

from kimi_jax.sharding.processes import Processes


class ThreadJob:
  """`count` stand-in processes; `run(fn)` calls fn(processes) on one thread per process."""

  def __init__(self, count: int, timeout_s: float = 300.0):
    self._barrier = threading.Barrier(count, timeout=timeout_s)
    self._objects = [None] * count
    self.processes = [Processes(i, count, functools.partial(self._allgather, i))
                      for i in range(count)]

  def _allgather(self, index: int, obj) -> list:
    self._objects[index] = obj
    self._barrier.wait()  # every object is in
    gathered = list(self._objects)
    self._barrier.wait()  # every process has read them before the next gather writes
    return gathered

  def run(self, fn) -> list:
    """fn(processes) of every process, in process order; the first failure is raised (the
    barrier is broken so no thread waits for it)."""
    def guarded(processes):
      try:
        return fn(processes)
      except BaseException:
        self._barrier.abort()
        raise
    with futures.ThreadPoolExecutor(len(self.processes)) as pool:
      return [f.result() for f in [pool.submit(guarded, p) for p in self.processes]]
