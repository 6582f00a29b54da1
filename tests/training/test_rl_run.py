"""End-to-end RL runs on the smoke config: kill -9 resume, sharded = single device, bad config."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from kimi_jax.metrics.writers import read_jsonl
from kimi_jax.training.rl import curve_records

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "experiments", "rl_arith.py") + ":smoke"
# Wall-clock-dependent metrics and what the process holds in memory (differs with
# rollout.colocate); everything else must replay exactly.
TIMING = ("time/", "tokens_per_s", "memory/")


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
  assert unknown.returncode != 0 and "'config.rl.taau'" in unknown.stderr
  nested = run(str(tmp_path), "--config.rl.length_penalty.weightt=0.1", driver="launch.train_rl")
  assert nested.returncode != 0
  assert ("unknown config key 'config.rl.length_penalty.weightt'" in nested.stderr
          and "did you mean 'config.rl.length_penalty.weight'" in nested.stderr), nested.stderr
  bad = run(str(tmp_path), "--config.rl.tau=-1.0", driver="launch.train_rl")
  assert bad.returncode != 0 and "config.rl.tau=-1.0" in bad.stderr
  # Used only after the SFT warm-up: still checked before any work starts.
  for flag, message in [("--config.rl.loss=ppo", "config.rl.loss='ppo'"),
                        ("--config.rollout.backend=vllm", "config.rollout.backend='vllm'")]:
    late = run(str(tmp_path), flag, driver="launch.train_rl")
    assert late.returncode != 0 and message in late.stderr, late.stderr[-2000:]
  assert not os.path.exists(os.path.join(str(tmp_path), "checkpoints"))
  assert not os.path.exists(os.path.join(str(tmp_path), "hf_sft"))


@pytest.mark.slow
def test_corrupt_newest_checkpoint_resumes_from_the_previous_one(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  newest = max(int(name) for name in os.listdir(checkpoints) if name.isdigit())
  damaged = 0
  for root, _, files in os.walk(os.path.join(checkpoints, str(newest), "state")):
    for name in files:
      if os.path.basename(root) == "d":  # array data chunks
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"\x00garbage")
        damaged += 1
  assert damaged
  resumed = run(workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  output = resumed.stderr + resumed.stdout
  skipped = [line for line in output.splitlines() if "is unreadable" in line]
  assert len(skipped) == 1 and f"checkpoint step {newest} " in skipped[0], skipped
  assert f"resumed from checkpoint {newest - 1}" in output
  assert_same_records(replayable(workdir), replayable(reference), rtol=1e-6)


@pytest.mark.slow
def test_error_right_after_an_async_save_exits_with_the_save_complete(tmp_path):
  failed = run(str(tmp_path), "--config.rl.iterations=1",
               env_extra={"FAIL_AFTER_SAVE_STEP": "0"})
  assert failed.returncode == 1 and "injected failure right after saving step 0" in failed.stderr
  assert os.listdir(os.path.join(str(tmp_path), "checkpoints")) == ["0"]  # no tmp directory


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


@pytest.mark.slow
def test_colocated_run_gives_the_same_metrics_and_frees_the_engine_while_training(reference,
                                                                                   tmp_path):
  """rollout.colocate=True: the engine drops its weights and KV cache while the trainer runs and
  gets the new weights back for the next iteration; the run replays the reference exactly."""
  from experiments.rl_arith import get_config
  from kimi_jax.data import synthetic
  from kimi_jax.data.tokenizer import char_tokenizer
  from kimi_jax.training.setup import build_model_config

  result = run(str(tmp_path), "--config.rollout.colocate=True")
  assert result.returncode == 0, result.stderr[-3000:]
  assert_same_records(replayable(str(tmp_path)), replayable(reference), rtol=1e-6)
  config = get_config("smoke")
  model = build_model_config(config.model, char_tokenizer(synthetic.CHARSET))
  rows, cache = config.rollout.max_batch, config.rollout.max_seq_len
  # the engine's own weight copy + its KV cache (float32), in closed form
  engine_bytes = 4 * (model.vocab_size * model.hidden_size * (1 if model.tie_embeddings else 2)
                      + model.num_layers * 2 * rows * cache * model.num_kv_heads * model.head_dim)
  colocated = [r for r in read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl")) if r["step"]]
  separate = [r for r in read_jsonl(os.path.join(reference, "metrics.jsonl")) if r["step"]]
  for c, s in zip(colocated, separate):
    assert s["memory/train_bytes"] - c["memory/train_bytes"] >= engine_bytes, c["step"]
    print(f"step {c['step']}: train phase holds {c['memory/train_bytes']:,} bytes colocated, "
          f"{s['memory/train_bytes']:,} not; rollout phase {c['memory/rollout_bytes']:,} / "
          f"{s['memory/rollout_bytes']:,}")


def test_curves_begin_at_the_starting_policy_eval():
  start = {"step": 0, "start/pass@1": 0.3, "start/pass@1_chart": 0.25, "start/mean_tokens": 4.0}
  iteration = {"step": 1, "reward": 0.5}
  evaluated = {"step": 5, "reward": 0.6, "eval/pass@1": 0.7}
  assert curve_records([start, iteration, {"step": 1, "sft/loss": 1.0}, evaluated]) == [
      {"step": 0, "eval/pass@1": 0.3, "eval/pass@1_chart": 0.25, "eval/mean_tokens": 4.0},
      iteration, evaluated]
