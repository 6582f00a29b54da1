"""The processes of one JAX job (hosts) as work that splits over them: each process's
contiguous share of a list of items, and an all-gather of small Python objects.

`Processes` names a process's place in the job and the job's all-gather, so code that splits
work (evaluation, rollout servers shared by every host) runs unchanged on one process, on the
processes of a real job (`this_job`), or on threads standing in for processes.
"""
import dataclasses
import pickle
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils


def allgather_objects(obj) -> list:
  """`obj` of every process, in process order, on every process (a collective: every process
  must call it). Objects travel pickled between the processes of one job."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(pickle.dumps(obj), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [pickle.loads(row[:int(n)].tobytes()) for row, n in zip(gathered, sizes.reshape(-1))]


@dataclasses.dataclass(frozen=True)
class Processes:
  """Process `index` of `count`; `allgather(obj)` returns every process's `obj` in process
  order on every process (a collective: all of them call it, in the same order)."""
  index: int
  count: int
  allgather: Callable[[object], list]

  @property
  def is_main(self) -> bool:
    """Process 0: the one that acts for all on shared resources (files, servers)."""
    return self.index == 0

  def share(self, num_items: int) -> slice:
    """This process's contiguous part of `num_items` items: the first `num_items % count`
    processes take one item more than the rest (a process may get none)."""
    per, extra = divmod(num_items, self.count)
    start = self.index * per + min(self.index, extra)
    return slice(start, start + per + (self.index < extra))

  def rows(self, num_rows: int) -> slice:
    """This process's rows of a `num_rows`-row batch: the index-th of `count` equal parts, the
    rows its devices hold under the batch sharding."""
    if num_rows % self.count:
      raise ValueError(f"{num_rows} batch rows do not split over {self.count} processes")
    per = num_rows // self.count
    return slice(self.index * per, (self.index + 1) * per)

  def barrier(self) -> None:
    """Returns once every process has reached it."""
    self.allgather(None)


def this_job() -> Processes:
  """This process in the running JAX job (process 0 of 1 without `jax.distributed`)."""
  return Processes(jax.process_index(), jax.process_count(), allgather_objects)
