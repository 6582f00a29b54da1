"""The long2short stage end to end at smoke size, each method checked against its rule computed
independently from the files the run leaves behind (long_samples.jsonl, shortest_sft.jsonl,
dpo_pairs.jsonl, the merged safetensors)."""
import json

import jax
import numpy as np
import pytest

from experiments import long2short_arith
from experiments.rl_arith import get_config as rl_config
from kimi_jax.checkpointing.hf import load_hf, save_hf
from kimi_jax.data import synthetic
from kimi_jax.data.tokenizer import load_tokenizer
from kimi_jax.metrics.writers import read_jsonl
from kimi_jax.model import init_params
from kimi_jax.training import long2short_run, sft_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> str:
  """A smoke-size model warmed up long enough to answer some level-1 prompts."""
  workdir = tmp_path_factory.mktemp("long")
  config = rl_config("smoke")
  with config.unlocked():
    config.sft.steps = 150
  sft_run.run(config, str(workdir))
  return str(workdir / "hf")


def l2s_config(variant: str, long_model: str, **long2short):
  config = long2short_arith.get_config(f"{variant},smoke")
  with config.unlocked():
    config.init.checkpoint = long_model
    config.long2short.update(long2short)
  return config


def read_rows(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def groups_of(samples: list[dict]) -> dict[str, list[dict]]:
  groups = {}
  for sample in samples:
    groups.setdefault(sample["prompt"], []).append(sample)
  return groups


def shortest_correct(group):
  correct = [s for s in group if s["correct"]]
  return min(correct, key=lambda s: s["num_tokens"]) if correct else None


def check_grading(samples: list[dict], num_samples: int) -> None:
  """Every sample is graded as the task's own checker says; num_samples per prompt."""
  for s in samples:
    assert s["correct"] == synthetic.is_correct(s["response"], synthetic.solve(s["prompt"]).answer)
  assert all(len(g) == num_samples for g in groups_of(samples).values())
  assert any(s["correct"] for s in samples), "the warmed-up model solved nothing: test is vacuous"


def test_shortest_rejection_sampling_keeps_the_shortest_correct(tmp_path, long_model):
  config = l2s_config("shortest", long_model)
  results = long2short_run.run(config, str(tmp_path))
  samples = read_rows(tmp_path / "long_samples.jsonl")
  check_grading(samples, config.long2short.num_samples)
  expected = [(prompt, best["response"]) for prompt, group in groups_of(samples).items()
              if (best := shortest_correct(group)) is not None]
  kept = [(r["prompt"], r["response"]) for r in read_rows(tmp_path / "shortest_sft.jsonl")]
  assert kept == expected
  _, long_params = load_hf(long_model)
  _, short_params = load_hf(str(tmp_path / "hf"))
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), long_params, short_params)
  assert max(jax.tree.leaves(moved)) > 0  # the SFT steps changed the long model
  assert set(results) == {"long", "short (shortest)"}
  assert (tmp_path / "eval" / "eval.png").exists()


def test_dpo_pairs_follow_the_rule(tmp_path, long_model):
  config = l2s_config("dpo", long_model)
  long2short_run.run(config, str(tmp_path))
  samples = read_rows(tmp_path / "long_samples.jsonl")
  check_grading(samples, config.long2short.num_samples)
  expected = []
  for prompt, group in groups_of(samples).items():
    chosen = shortest_correct(group)
    if chosen is not None:
      expected += [(prompt, chosen["response"], s["response"]) for s in group
                   if (not s["correct"] and s["num_tokens"] > chosen["num_tokens"])
                   or s["num_tokens"] >= 1.5 * chosen["num_tokens"]]
  pairs = [(p["prompt"], p["chosen"], p["rejected"])
           for p in read_rows(tmp_path / "dpo_pairs.jsonl")]
  assert pairs == expected and pairs
  dpo_metrics = read_jsonl(str(tmp_path / "long2short_metrics.jsonl"))
  assert dpo_metrics[-1]["step"] == config.long2short.dpo.steps


def test_merge_is_the_weighted_average(tmp_path, long_model):
  model_config, long_params = load_hf(long_model)
  short_dir = tmp_path / "short"
  save_hf(str(short_dir), model_config, init_params(model_config, jax.random.key(7)),
          tokenizer=load_tokenizer(long_model))
  config = l2s_config("merge", long_model, short_checkpoint=str(short_dir), merge_weight=0.25)
  long2short_run.run(config, str(tmp_path / "run"))
  _, short_params = load_hf(str(short_dir))
  _, merged = load_hf(str(tmp_path / "run" / "hf"))
  expected = jax.tree.map(lambda a, b: 0.25 * np.asarray(a, np.float64) + 0.75 * np.asarray(b),
                          long_params, short_params)
  # float32 products and sum: a few ulps of the float64 reference.
  jax.tree.map(lambda m, e: np.testing.assert_allclose(m, e, rtol=1e-6, atol=1e-7),
               merged, expected)


def test_long2short_rl_starts_from_the_long_model(tmp_path, long_model):
  config = l2s_config("rl", long_model)
  results = long2short_run.run(config, str(tmp_path))
  records = read_jsonl(str(tmp_path / "metrics.jsonl"))
  # The RL run's starting eval is the long checkpoint's own eval (both greedy, same prompts).
  assert records[0]["start/pass@1"] == results["long"]["eval/pass@1"]
  assert records[0]["start/mean_tokens"] == results["long"]["eval/mean_tokens"]
  rl_records = [r for r in records if r.get("complete_groups")]  # iterations that trained
  assert rl_records and all(r["length_max"] <= config.rl.max_response_tokens for r in rl_records)
  assert config.rl.length_penalty.warmup_iterations == 0 and config.rl.length_penalty.weight > 0
  assert not (tmp_path / "hf_sft").exists()  # no warm-up: it started from the checkpoint


def test_bad_method_and_missing_checkpoint_name_the_key(tmp_path, long_model):
  with pytest.raises(ValueError, match="long2short.method='nope'"):
    long2short_run.run(l2s_config("rl", long_model, method="nope"), str(tmp_path))
  config = l2s_config("rl", long_model)
  with config.unlocked():
    config.init.checkpoint = ""
  with pytest.raises(ValueError, match="config.init.checkpoint"):
    long2short_run.run(config, str(tmp_path))
  with pytest.raises(ValueError, match="unknown config variant"):
    long2short_arith.get_config("shorter")
