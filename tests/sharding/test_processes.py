"""A process's share of a list and the job's all-gather, on one process and on stand-in
threads."""
import numpy as np
import pytest

from kimi_jax.sharding.processes import Processes, this_job
from tests.sharding.thread_job import ThreadJob


@pytest.mark.parametrize("num_items", [0, 1, 2, 7, 8, 13])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_shares_are_numpys_array_split(num_items, count):
  # np.array_split is the independent reference: contiguous, in process order, sizes within
  # one of each other with the larger first.
  expected = np.array_split(np.arange(num_items), count)
  shares = [Processes(i, count, None).share(num_items) for i in range(count)]
  assert [list(range(num_items))[s] for s in shares] == [list(e) for e in expected]


def test_one_process_job():
  job = this_job()
  assert (job.index, job.count, job.is_main) == (0, 1, True)
  assert job.allgather({"a": 1}) == [{"a": 1}]
  assert job.share(5) == slice(0, 5)


def test_stand_in_processes_gather_in_process_order():
  job = ThreadJob(3)
  gathered = job.run(lambda p: [p.allgather(p.index * 10), p.allgather(f"second {p.index}")])
  assert gathered == [[[0, 10, 20], ["second 0", "second 1", "second 2"]]] * 3
  assert [p.is_main for p in job.processes] == [True, False, False]


def test_batch_rows_are_equal_parts_in_process_order():
  # The rows a process's devices hold under a batch sharding over (data, fsdp): np.split.
  expected = np.split(np.arange(8), 4)
  assert [list(range(8))[Processes(i, 4, None).rows(8)] for i in range(4)] == \
      [list(e) for e in expected]
  with pytest.raises(ValueError, match="6 batch rows do not split over 4 processes"):
    Processes(3, 4, None).rows(6)
