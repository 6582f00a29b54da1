"""The cluster launch scripts, dry-run: the exact commands they would run."""
import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = ["--config=experiments/rl_arith.py:small", "--workdir=gs://bucket/runs/exp 1"]


def dry_run(script: str, *args: str) -> list[list[str]]:
  out = subprocess.run(["bash", os.path.join(ROOT, "launch/scripts", script), *args],
                       env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True,
                       check=True, cwd=ROOT).stdout
  return [shlex.split(line) for line in out.splitlines()]


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_local_cluster_starts_n_processes_sharing_8_devices(n):
  commands = dry_run("local_cluster.sh", str(n), "train_rl", *FLAGS)
  assert len(commands) == n
  for i, cmd in enumerate(commands):
    assert cmd[:4] == ["env", "JAX_PLATFORMS=cpu",
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={8 // n}",
                       ".venv/bin/python"]
    assert cmd[4:] == ["-m", "launch.train_rl", "--coordinator_address=127.0.0.1:12355",
                       f"--num_processes={n}", f"--process_id={i}", *FLAGS]


def test_local_cluster_refuses_a_count_that_does_not_divide_8():
  result = subprocess.run(["bash", os.path.join(ROOT, "launch/scripts/local_cluster.sh"), "3",
                           "train_rl"], capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 2 and "N=3 must divide 8" in result.stderr


def test_tpu_pod_runs_the_entry_point_on_every_worker_with_multihost():
  [cmd] = dry_run("tpu_pod.sh", "my-tpu", "us-central2-b", "train_rl", *FLAGS)
  assert cmd[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone",
                     "us-central2-b"]
  assert cmd[8:10] == ["--worker=all", "--command"]
  remote = cmd[10]
  cd, python = remote.split(" && ")
  assert cd == "cd ~/kimi_jax"  # `~` left for the workers' shells
  assert shlex.split(python) == [".venv/bin/python", "-m", "launch.train_rl", "--multihost",
                                 *FLAGS]


def test_gpu_cluster_srun_runs_one_multihost_process_per_node():
  [cmd] = dry_run("gpu_cluster.sbatch", "train_rl", *FLAGS)
  assert cmd == ["srun", "--kill-on-bad-exit=1", ".venv/bin/python", "-m", "launch.train_rl",
                 "--multihost", *FLAGS]
  with open(os.path.join(ROOT, "launch/scripts/gpu_cluster.sbatch")) as f:
    assert "#SBATCH --ntasks-per-node=1" in f.read()
