"""RL from an HF checkpoint on real task data, through the real rewards.

A tiny random Qwen2 with a byte-level BPE tokenizer trained here and a Qwen-style chat template
stands in for a downloaded checkpoint; GSM8K rows come from the shared test split; code rows
carry `tests: [{input, output}]`. The math run samples from the model itself; the planted runs
swap the rollout backend for one that answers with chosen responses, so correct, wrong, hedged,
hanging and malicious answers provably meet the real rewards inside the loop.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers

from experiments import code_rl, math_rl
from kimi_jax.data.sources import shared_data_path
from kimi_jax.metrics.writers import read_jsonl
from kimi_jax.rewards.code import code_rewards
from kimi_jax.rewards.math import math_reward
from kimi_jax.training import rl
from tests.hf_checkpoints import save_tiny_qwen2_checkpoint
from tests.planted_backend import PlantedBackend

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tiny_qwen2"))
  save_tiny_qwen2_checkpoint(directory)
  return directory


def write_jsonl(path, rows) -> str:
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


@pytest.fixture(scope="module")
def gsm8k_files(tmp_path_factory):
  """The 12 shortest GSM8K test questions: 8 to train on, 4 held out."""
  with open(shared_data_path("gsm8k/test.jsonl")) as f:
    rows = sorted((json.loads(line) for line in f), key=lambda r: len(r["question"]))[:12]
  directory = tmp_path_factory.mktemp("gsm8k")
  return (write_jsonl(directory / "train.jsonl", rows[:8]),
          write_jsonl(directory / "eval.jsonl", rows[8:]), rows)


def gold(row) -> str:
  return row["answer"].rsplit("####", 1)[1].strip().replace(",", "")


def chat_prompt(checkpoint: str, template: str, question: str) -> str:
  """The prompt transformers renders for the question: the independent reference."""
  hf_tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
  return hf_tok.apply_chat_template([{"role": "user", "content": template.replace(
      "{question}", question)}], add_generation_prompt=True, tokenize=False)


def samples(workdir: str) -> list[dict]:
  files = sorted(os.listdir(os.path.join(workdir, "samples")))
  return [row for name in files for row in read_jsonl(os.path.join(workdir, "samples", name))]


@pytest.mark.slow
def test_math_rl_from_an_hf_checkpoint_through_the_launcher(checkpoint, gsm8k_files, tmp_path):
  train, heldout, rows = gsm8k_files
  workdir = str(tmp_path / "run")
  result = subprocess.run(
      [sys.executable, "-m", "launch.train_rl", f"--config={REPO}/experiments/math_rl.py:smoke",
       f"--config.init.checkpoint={checkpoint}", f"--config.data.train={train}",
       f"--config.data.eval={heldout}", f"--workdir={workdir}"],
      cwd=REPO, capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  config = math_rl.get_config("smoke")
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
      f"iter_{i:05d}.jsonl" for i in range(config.rl.iterations)]
  by_question = {r["question"]: r for r in rows[:8]}
  sampled = samples(workdir)
  assert sampled
  for row in sampled:
    question = next(q for q in by_question if q in row["prompt"])
    assert row["prompt"] == chat_prompt(checkpoint, math_rl.MATH_TEMPLATE, question)
    assert "####" not in row["prompt"]  # the gold solution never reaches the policy
    assert row["answer"] == gold(by_question[question])
    assert row["correct"] == (math_reward(row["response"], row["answer"]) == 1.0)
    assert row["reward"] == pytest.approx(row["task_reward"] + row["length_reward"]
                                          + row["repetition_penalty"])
  metrics = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert any("reward/math" in m and "accuracy/math" in m for m in metrics)
  exported = os.path.join(workdir, "hf")
  assert (transformers.AutoTokenizer.from_pretrained(exported).chat_template
          == transformers.AutoTokenizer.from_pretrained(checkpoint).chat_template)
  model = transformers.AutoModelForCausalLM.from_pretrained(exported)
  assert model.config.vocab_size == transformers.AutoConfig.from_pretrained(checkpoint).vocab_size


def planted_run(monkeypatch, config, workdir: str, responses) -> list[dict]:
  monkeypatch.setattr(rl, "build_backend", lambda config, model_config, tokenizer, *_:
                      PlantedBackend(tokenizer, responses))
  rl.run(config, workdir)
  return samples(workdir)


def with_overrides(config, **sections):
  config = config.copy_and_resolve_references()
  config.unlock()
  for dotted, value in sections.items():
    section, key = dotted.split("__")
    config[section][key] = value
  config.lock()
  return config


def test_math_rewards_inside_the_loop(monkeypatch, checkpoint, gsm8k_files, tmp_path):
  train, heldout, rows = gsm8k_files
  golds = {r["question"]: gold(r) for r in rows}

  def responses(prompt: str):
    g = next(golds[q] for q in golds if q in prompt)
    return [f"So the answer is \\boxed{{{g}}}.", f"So the answer is \\boxed{{{int(g) + 1}}}.",
            f"#### {g}", f"\\boxed{{{int(g) + 1} = {g}}}"]  # the last is a hedge, not an answer

  config = with_overrides(math_rl.get_config("smoke"), init__checkpoint=checkpoint,
                          data__train=train, data__eval=heldout, rl__max_response_tokens=64,
                          rl__segment_tokens=64, rollout__max_seq_len=512, eval__max_new_tokens=64)
  sampled = planted_run(monkeypatch, config, str(tmp_path), responses)
  expected = {"So the answer is \\boxed{": True, "#### ": True}
  for row in sampled:
    planted_correct = any(row["response"].startswith(p) and row["response"].endswith(
        f"{row['answer']}" + ("}." if p.startswith("So") else "")) for p in expected)
    assert row["correct"] == planted_correct, row["response"]
  assert {r["correct"] for r in sampled} == {True, False}


CODE_ROWS = [
    {"question": "Read two integers and print their sum.",
     "tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "-5 9\n", "output": "4\n"}]},
    {"question": "Read one integer n and print n squared.",
     "tests": [{"input": "3\n", "output": "9\n"}, {"input": "-4\n", "output": "16\n"}]},
]
CORRECT = {"sum": "print(sum(map(int, input().split())))",
           "squared": "n = int(input())\nprint(n * n)"}
BAD = ["print(42)",  # wrong
       "while True:\n    pass",  # hangs: killed at the per-test timeout
       "import os\nprint(open('/etc/shadow').read())",  # malicious: no such file in the sandbox
       "raise SystemExit(3)"]  # crashes


def test_code_rewards_inside_the_loop(monkeypatch, checkpoint, tmp_path):
  train = write_jsonl(tmp_path / "train.jsonl", CODE_ROWS)
  heldout = write_jsonl(tmp_path / "eval.jsonl", CODE_ROWS[:1])

  def responses(prompt: str):
    program = CORRECT["sum" if "sum" in prompt else "squared"]
    return [f"```python\n{p}\n```" for p in [program] + BAD]

  config = with_overrides(code_rl.get_config("smoke"), init__checkpoint=checkpoint,
                          data__train=train, data__eval=heldout, rl__k=5,
                          rl__max_response_tokens=96, rl__segment_tokens=96,
                          rollout__max_seq_len=512, eval__max_new_tokens=96)
  sampled = planted_run(monkeypatch, config, str(tmp_path / "run"), responses)
  for row in sampled:
    is_correct = any(p in row["response"] for p in CORRECT.values())
    assert row["correct"] == is_correct and row["task_reward"] == float(is_correct), row
  tests = {r["question"]: json.dumps([[t["input"], t["output"]] for t in r["tests"]])
           for r in CODE_ROWS}
  independent = code_rewards([r["response"] for r in sampled],
                             [next(tests[q] for q in tests if q in r["prompt"]) for r in sampled])
  np.testing.assert_array_equal(independent, [r["task_reward"] for r in sampled])
  assert {r["correct"] for r in sampled} == {True, False}
