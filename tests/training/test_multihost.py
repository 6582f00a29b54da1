"""One job as two JAX processes (4 fake CPU devices each, gloo collectives) against the same job
as one process with 8 devices: launch/scripts/local_cluster.sh, global batches built from each
process's rows, process 0 the only writer; RL with each process rolling out its slice of the
groups, killed with SIGKILL and resumed."""
import collections
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = ["--config=experiments/rl_arith.py:smoke", "--config.mesh.data=2",
         "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def read_rows(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


ONE_PROCESS_ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def start_cluster(entry: str, workdir: str, *flags: str) -> subprocess.Popen:
  """launch/scripts/local_cluster.sh with 2 processes, in its own session (killable as one)."""
  return subprocess.Popen(["bash", "launch/scripts/local_cluster.sh", "2", entry,
                           f"--workdir={workdir}", *FLAGS, *flags], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True,
                          env={**os.environ, "PORT": str(free_port()), "PYTHON": sys.executable})


def finish(process: subprocess.Popen) -> str:
  out = process.communicate(timeout=900)[0]
  assert process.returncode == 0, out[-3000:]  # every process exited 0
  return out


@pytest.fixture(scope="module")
def rl_one_process(tmp_path_factory) -> str:
  """The workdir of `launch.train_rl` on the smoke config as one process with 8 devices."""
  workdir = str(tmp_path_factory.mktemp("rl_one"))
  subprocess.run([sys.executable, "-m", "launch.train_rl", f"--workdir={workdir}", *FLAGS],
                 cwd=ROOT, env=ONE_PROCESS_ENV, check=True, capture_output=True, timeout=900)
  return workdir


# Metric -> absolute tolerance, all at rtol 1e-4: float32 sums split differently over two
# processes differ in the last bits. The S - S_ref terms are differences of response log-prob
# sums of ~30 nats, so float32 rounding of the sums (~4e-6) shows as absolute error.
RL_KEYS = {**dict.fromkeys(("reward", "loss", "grad_norm", "length_mean", "accuracy", "entropy",
                            "pg_loss", "seq_logp", "max_attention_logit", "complete_groups",
                            "buffer_groups", "updates", "eval/pass@1", "eval/mean_tokens",
                            "start/pass@1"), 0.0),
           **dict.fromkeys(("log_ratio", "tau_loss", "kl_prev"), 1e-5)}


def assert_same_rl_run(one: str, two: str) -> None:
  """Same metrics rows (one writer: as many rows as one process writes) and the same samples."""
  rows_one, rows_two = read_rows(f"{one}/metrics.jsonl"), read_rows(f"{two}/metrics.jsonl")
  assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [0, 1, 2, 3]
  for a, b in zip(rows_one, rows_two):
    assert b.keys() == a.keys()
    for key in RL_KEYS.keys() & a.keys():
      np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=RL_KEYS[key],
                                 err_msg=f"step {a['step']} {key}")
  samples = lambda d: sorted(os.path.basename(p) for p in glob.glob(f"{d}/samples/*.jsonl"))
  assert samples(two) == samples(one) == [f"iter_{i:05d}.jsonl" for i in range(3)]
  # Process 0 writes the samples of its own slices: rows of the one-process files.
  row = lambda r: (r["prompt"], r["response"], r["correct"], r["num_tokens"], r["segments"])
  counts = []
  for name in samples(one):
    a, b = read_rows(f"{one}/samples/{name}"), read_rows(f"{two}/samples/{name}")
    assert not collections.Counter(map(row, b)) - collections.Counter(map(row, a)), name
    counts.append((len(b), len(a)))
  assert 0 < sum(b for b, _ in counts) < sum(a for _, a in counts)
  assert sorted(os.listdir(f"{two}/hf")) == sorted(os.listdir(f"{one}/hf"))


@pytest.mark.slow
def test_rl_as_two_processes_equals_one_process(rl_one_process, tmp_path):
  # Each process samples its slice of the prompt groups (seeds keyed by group id), scores them
  # and trains on them; only per-row facts cross processes: the same rollouts, minibatches and
  # updates as one process.
  two = str(tmp_path / "two")
  out = finish(start_cluster("train_rl", two))
  assert "[0] summary:" in out and "[1] summary:" not in out
  assert_same_rl_run(rl_one_process, two)


@pytest.mark.slow
def test_rl_as_two_processes_sharing_an_sglang_server_equals_one_process(rl_one_process,
                                                                         tmp_path):
  # Both processes send their own rollout and eval requests to one of our SGLang-API servers
  # (on a thread of this test's process); process 0 alone writes and loads each version's
  # weights. The same rollouts and updates as one process sampling with its own engine.
  import jax
  from experiments import rl_arith
  from kimi_jax.data.tasks import build_task
  from kimi_jax.model import init_params
  from kimi_jax.rollout.server import BackgroundServer
  from kimi_jax.training.setup import build_model_config, build_tokenizer
  from tests.rollout.recording_server import RecordingEngine, RecordingRolloutServer
  config = rl_arith.get_config("smoke")
  tokenizer = build_tokenizer(config, build_task(config.task, seed=config.seed))
  model_config = build_model_config(config.model, tokenizer)
  engine = RecordingEngine(model_config, init_params(model_config, jax.random.key(0)),
                           max_batch=config.rollout.max_batch,
                           max_seq_len=config.rollout.max_seq_len,
                           eos_token_ids=tuple(tokenizer.eos_ids),
                           repetition_ngram=config.rl.repetition_ngram,
                           repetition_count=config.rl.repetition_count)  # as EngineBackend
  server = BackgroundServer(RecordingRolloutServer(engine, tokenizer=tokenizer))
  two = str(tmp_path / "two")
  try:
    out = finish(start_cluster("train_rl", two, "--config.rollout.backend=sglang",
                               f"--config.rollout.urls=('{server.url}',)"))
  finally:
    server.stop()
  assert "[0] summary:" in out and "[1] summary:" not in out
  assert_same_rl_run(rl_one_process, two)
  # One weight update per policy version (the start, then each iteration's).
  assert [e for e in engine.events if e[0] != "generate"] == [
      ("update", v) for v in ("0", "1", "2", "3")]
  assert os.listdir(f"{two}/rollout_weights") == ["v3"]
  # Held-out requests (seeds eval.seed + row) reach the server once per evaluation (start,
  # steps 2 and 3): each process sent only its share. Rollout seeds are hashed 30-bit ints.
  first, num_rows = config.eval.seed, config.task.num_heldout * config.eval.samples
  eval_seeds = [e[1] for e in engine.events
                if e[0] == "generate" and first <= e[1] < first + num_rows]
  assert sorted(eval_seeds) == sorted(list(range(first, first + num_rows)) * 3)


@pytest.mark.slow
def test_rl_two_processes_killed_and_resumed_equals_one_process(rl_one_process, tmp_path):
  two = str(tmp_path / "two")
  cluster = start_cluster("train_rl", two)
  deadline = time.monotonic() + 900
  while not os.path.isdir(f"{two}/checkpoints/1") and cluster.poll() is None:
    assert time.monotonic() < deadline
    time.sleep(0.1)
  os.killpg(cluster.pid, signal.SIGKILL)  # both processes and the script, mid-run
  cluster.communicate()
  assert not os.path.exists(f"{two}/summary.json"), "the run finished before the kill"
  out = finish(start_cluster("train_rl", two))
  assert "[0] resumed from checkpoint" in out and "[1] resumed from checkpoint" in out
  assert_same_rl_run(rl_one_process, two)


@pytest.mark.slow
def test_sft_stage_as_two_processes_equals_one_process(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  single = subprocess.Popen([sys.executable, "-m", "launch.train_sft", f"--workdir={one}", *FLAGS],
                            cwd=ROOT, env=ONE_PROCESS_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  cluster_out = finish(start_cluster("train_sft", two))
  finish(single)
  assert "[0] held-out" in cluster_out and "[1] held-out" in cluster_out

  rows_one, rows_two = (read_rows(os.path.join(d, "sft_metrics.jsonl")) for d in (one, two))
  # One writer: as many rows as the one-process run, not one per process.
  assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one]
  for a, b in zip(rows_one, rows_two):
    # float32 reductions split differently over processes: 1e-4 relative.
    for key in ("sft/loss", "sft/grad_norm", "sft/num_tokens"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-4, err_msg=key)
  with open(os.path.join(one, "sft_summary.json")) as f1, \
       open(os.path.join(two, "sft_summary.json")) as f2:
    assert json.load(f2) == json.load(f1)  # held-out eval on each process's own engine
  assert sorted(os.listdir(os.path.join(two, "hf"))) == sorted(os.listdir(os.path.join(one, "hf")))


@pytest.mark.slow
def test_a_process_other_than_0_writes_only_checkpoints(tmp_path, monkeypatch):
  # A whole RL run (SFT warm-up, evals, samples, checkpoints, HF export) as a process that is
  # not process 0: every file but the orbax checkpoints (which every process writes, here to
  # config.checkpoint.directory outside the workdir) is left to process 0.
  from experiments import rl_arith
  from kimi_jax.training import multihost, rl
  config = rl_arith.get_config("smoke")
  config.rl.iterations = 2  # an eval (every 2) and the end of the run
  config.checkpoint.directory = str(tmp_path / "checkpoints")
  monkeypatch.setattr(multihost, "is_main_process", lambda: False)
  assert rl.run(config, str(tmp_path / "run")) == {}
  assert os.listdir(tmp_path / "run") == []
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]  # checkpoint.keep = 2


def test_resuming_with_another_process_count_names_the_saved_count():
  from kimi_jax.training import rl
  with pytest.raises(ValueError, match="buffers of 2 processes; resume it with that many"):
    rl.process_buffer([[], []])


def test_a_process_reads_its_rows_from_its_own_shards_only(monkeypatch):
  # Process 1 of 2 (simulated on this process's 8 devices): its rows of a batch-sharded array
  # are the second half, read shard by shard from the devices it holds (those of rows 4..8);
  # the policy trainer keeps only these rows' log-probs.
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from kimi_jax.training import multihost
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"))
  x_BxT = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
  by_rows = jax.device_put(x_BxT, NamedSharding(mesh, PartitionSpec("data", "tensor")))
  replicated_rows = jax.device_put(x_BxT, NamedSharding(mesh, PartitionSpec(None, "tensor")))
  array_type, all_shards = type(by_rows), type(by_rows).addressable_shards
  own = lambda array: [s for s in all_shards.__get__(array)
                       if (s.index[0].start or 0) >= 4 or s.index[0].start is None]
  monkeypatch.setattr(multihost.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost.jax, "process_index", lambda: 1)
  monkeypatch.setattr(array_type, "is_fully_addressable", property(lambda self: False))
  monkeypatch.setattr(array_type, "addressable_shards", property(own))
  to_numpy = array_type.__array__
  def shard_only(self, *args, **kwargs):  # reading the whole (8, 6) array would gather it
    assert self.shape != x_BxT.shape, "the whole array was read"
    return to_numpy(self, *args, **kwargs)
  monkeypatch.setattr(array_type, "__array__", shard_only)
  np.testing.assert_array_equal(multihost.local_rows(by_rows), x_BxT[4:])
  np.testing.assert_array_equal(multihost.local_rows(replicated_rows), x_BxT[4:])
  np.testing.assert_array_equal(multihost.local_rows(x_BxT), x_BxT[4:])  # host arrays: sliced
  monkeypatch.setattr(array_type, "addressable_shards",
                      property(lambda self: own(self)[len(own(self)) // 2:]))
  with pytest.raises(ValueError, match=r"rows 4\.\.8 of a \(8, 6\) array are not all"):
    multihost.local_rows(by_rows)
