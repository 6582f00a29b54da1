"""End-to-end RL runs on the smoke config: kill -9 resume, sharded = single device, bad config."""
import os
import subprocess
import sys

import numpy as np
import pytest

from kimi_jax.metrics.writers import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "experiments", "rl_arith.py") + ":smoke"
# Wall-clock-dependent metrics; everything else must replay exactly.
TIMING = ("time/", "tokens_per_s")


def run(workdir, *flags, env_extra=None, driver="tests.training.rl_kill_driver"):
  env = {**os.environ, **(env_extra or {})}
  return subprocess.run([sys.executable, "-m", driver, f"--config={CONFIG}",
                         f"--workdir={workdir}", *flags],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def replayable(workdir):
  return [{k: v for k, v in r.items() if not k.startswith(TIMING)}
          for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def assert_same_records(a, b, rtol, atol=1e-6):
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys(), ra["step"]
    for key in ra:
      np.testing.assert_allclose(ra[key], rb[key], rtol=rtol, atol=atol, err_msg=f"{key} @ {ra['step']}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize("kill_env", [{"KILL_BEFORE_ITERATION": "2"}, {"KILL_IN_SAVE_STEP": "2"}],
                         ids=["mid-run", "mid-checkpoint-write"])
def test_kill_and_resume_replays_the_uninterrupted_run(reference, tmp_path, kill_env):
  killed = run(str(tmp_path), env_extra=kill_env)
  assert killed.returncode == -9
  resumed = run(str(tmp_path))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from checkpoint" in resumed.stderr + resumed.stdout
  # Same seed, same checkpoint contents: identical replays on the same device (exact floats).
  assert_same_records(replayable(str(tmp_path)), replayable(reference), rtol=1e-6)


@pytest.mark.slow
def test_sharded_mesh_gives_the_single_device_curves(reference, tmp_path):
  result = run(str(tmp_path), "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
  assert result.returncode == 0, result.stderr[-3000:]
  # 8-way sharding reorders float32 reductions: 1e-4 relative covers the drift over the run,
  # and 1e-4 absolute the near-zero gradient norms of groups with no reward spread.
  assert_same_records(replayable(str(tmp_path)), replayable(reference), rtol=1e-4, atol=1e-4)


def test_unknown_override_and_bad_value_fail_at_start_naming_the_key(tmp_path):
  unknown = run(str(tmp_path), "--config.rl.taau=0.1", driver="launch.train_rl")
  assert unknown.returncode != 0 and "taau" in unknown.stderr
  bad = run(str(tmp_path), "--config.rl.tau=-1.0", driver="launch.train_rl")
  assert bad.returncode != 0 and "config.rl.tau=-1.0" in bad.stderr
  assert not os.path.exists(os.path.join(str(tmp_path), "checkpoints"))


@pytest.mark.slow
def test_rl_through_sglang_client_and_server_replays_the_engine_run(reference, tmp_path):
  """Same run, samples from our SGLang-API server over loopback HTTP: identical records."""
  import jax

  from experiments.rl_arith import get_config
  from kimi_jax.data import synthetic
  from kimi_jax.data.tokenizer import char_tokenizer
  from kimi_jax.model import init_params
  from kimi_jax.rollout.engine import RolloutEngine
  from kimi_jax.rollout.server import BackgroundServer, RolloutServer
  from kimi_jax.training import rl
  from kimi_jax.training.setup import build_model_config

  config = get_config("smoke")
  tokenizer = char_tokenizer(synthetic.CHARSET)
  model_config = build_model_config(config.model, tokenizer)
  engine = RolloutEngine(model_config, init_params(model_config, jax.random.key(9)),
                         max_batch=config.rollout.max_batch, max_seq_len=config.rollout.max_seq_len,
                         eos_token_ids=(tokenizer.eos_id,),
                         repetition_ngram=config.rl.repetition_ngram,
                         repetition_count=config.rl.repetition_count)
  server = BackgroundServer(RolloutServer(engine, tokenizer=tokenizer))
  try:
    with config.unlocked():
      config.rollout.backend, config.rollout.urls = "sglang", (server.url,)
    rl.run(config, str(tmp_path))
  finally:
    server.stop()
  assert engine.weight_version == str(config.rl.iterations)  # every sync reached the server
  assert_same_records(replayable(str(tmp_path)), replayable(reference), rtol=1e-6)


@pytest.mark.slow
def test_partial_rollouts_carry_groups_across_iterations_without_crashing(tmp_path):
  """8 tokens per iteration against a 56-token cap: most groups wait in the buffer, some
  iterations complete no group at all. Every iteration still writes a full row."""
  result = run(str(tmp_path), "--config.rl.segment_tokens=8", "--config.rl.iterations=4",
               driver="launch.train_rl")
  assert result.returncode == 0, result.stderr[-3000:]
  records = read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl"))
  rl_rows = [r for r in records if r["step"] > 0]
  assert [r["step"] for r in rl_rows] == [1, 2, 3, 4]
  assert len({frozenset(k for k in r if not k.startswith("eval/")) for r in rl_rows}) == 1
  assert all(r["buffer_groups"] > 0 for r in rl_rows)  # groups are carried over
  empty = [r for r in rl_rows if r["complete_groups"] == 0]
  trained = [r for r in rl_rows if r["complete_groups"] > 0]
  assert empty and trained
  assert all(np.isnan(r["reward"]) and np.isnan(r["kl_prev"]) for r in empty)
  assert all(r["kl_prev"] >= 0 for r in trained)  # k3 is non-negative
  assert any(r["multi_segment_frac"] > 0 for r in trained)  # groups finished over iterations
