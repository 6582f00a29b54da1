"""The long model's graded samples split over processes: each process samples its share of the
prompts, every process gets all of them as one process would, and process 0 alone writes
long_samples.jsonl."""
import threading

from experiments import long2short_arith
from kimi_jax.data.tasks import build_task
from kimi_jax.sharding.processes import Processes
from kimi_jax.training import long2short_run
from tests.eval.planted_backend import TOKENIZER, PlantedBackend
from tests.sharding.thread_job import ThreadJob


def test_long_model_samples_are_split_over_processes(tmp_path, monkeypatch):
  config = long2short_arith.get_config("shortest,smoke")
  task = build_task(config.task, seed=config.seed)
  current = threading.local()  # the calling thread's stand-in process and its backend
  monkeypatch.setattr(long2short_run, "this_job", lambda: current.processes)
  monkeypatch.setattr(long2short_run.multihost, "is_main_process",
                      lambda: current.processes.is_main)
  monkeypatch.setattr(long2short_run, "build_backend", lambda *args: current.backend)

  def sample(processes):
    current.processes, current.backend = processes, PlantedBackend()
    workdir = tmp_path / f"{processes.index}_of_{processes.count}"
    workdir.mkdir()
    samples = long2short_run.sample_long_model(config, task, TOKENIZER, None, None, str(workdir))
    return samples, current.backend

  one, one_backend = sample(Processes(0, 1, lambda obj: [obj]))
  (samples0, backend0), (samples1, backend1) = ThreadJob(2).run(sample)
  assert samples0 == samples1 == one
  assert len(one) == config.long2short.num_prompts * config.long2short.num_samples
  # Each process sent only its half of the requests, seeded as one process seeds them.
  half = len(one) // 2
  for part, backend in ((slice(0, half), backend0), (slice(half, None), backend1)):
    assert backend.questions == one_backend.questions[part]
    assert [s.seed for s in backend.sampling] == [s.seed for s in one_backend.sampling[part]]
  written = lambda name: (tmp_path / name / "long_samples.jsonl")
  assert written("0_of_2").read_text() == written("0_of_1").read_text()
  assert not written("1_of_2").exists()
