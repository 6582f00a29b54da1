"""One job as two JAX processes (4 fake CPU devices each, gloo collectives) against the same job
as one process with 8 devices: launch/scripts/local_cluster.sh, global batches built from each
process's rows, process 0 the only writer."""
import json
import os
import socket
import subprocess
import sys

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


@pytest.mark.slow
def test_sft_stage_as_two_processes_equals_one_process(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  single = subprocess.Popen([sys.executable, "-m", "launch.train_sft", f"--workdir={one}", *FLAGS],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  cluster = subprocess.run(["bash", "launch/scripts/local_cluster.sh", "2", "train_sft",
                            f"--workdir={two}", *FLAGS], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PORT": str(free_port()), "PYTHON": sys.executable},
                           timeout=900)
  single_out = single.communicate(timeout=900)[0].decode()
  assert single.returncode == 0, single_out[-3000:]
  assert cluster.returncode == 0, cluster.stdout[-3000:]  # both processes exited 0
  assert "[0] held-out" in cluster.stdout and "[1] held-out" in cluster.stdout

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
