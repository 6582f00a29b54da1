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
from kimi_jax.rewards.judge import JUDGE_PROMPT_TEMPLATE, RMExample
from kimi_jax.rewards.math import math_reward
from kimi_jax.rewards.registry import REGISTRY
from kimi_jax.training import rl, run_rewards
from tests.hf_checkpoints import save_tiny_qwen2_checkpoint
from tests.planted_backend import PlantedBackend
from tests.test_serve import _serve

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


# The judge is a separate model with its own chat template, so a judge prompt rendered with the
# policy's template would show.
JUDGE_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }} (grader)\n"
                  "{{ message['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant (grader)\n{% endif %}")
JUDGED = {"The result is 7, I checked it.": 'Matches.\n{"correct": true}',
          "The result is 8, I think.": 'It differs.\n{"correct": false}',
          "Not sure at all.": "I cannot tell."}  # no verdict: scores 0


@pytest.fixture(scope="module")
def judge_checkpoint(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tiny_judge"))
  save_tiny_qwen2_checkpoint(directory, seed=1, chat_template=JUDGE_TEMPLATE)
  return directory


def test_cot_rm_rewards_inside_the_loop(monkeypatch, checkpoint, judge_checkpoint, gsm8k_files,
                                        tmp_path):
  """The policy answers with planted responses; a planted judge backend answers true, false or
  no verdict depending on the response in its prompt; the loop's rewards follow the verdicts."""
  train, heldout, rows = gsm8k_files
  judge_prompts = []

  def judge_replies(prompt: str):
    judge_prompts.append(prompt)
    return [next(reply for response, reply in JUDGED.items() if f"\n{response}\n" in prompt)]

  monkeypatch.setattr(run_rewards, "judge_backend", lambda judge_config, tokenizer, workdir:
                      PlantedBackend(tokenizer, judge_replies))
  config = with_overrides(math_rl.get_config("smoke"), init__checkpoint=checkpoint,
                          data__train=train, data__eval=heldout, data__reward="cot_rm",
                          rl__k=3, rl__max_response_tokens=32, rl__segment_tokens=32,
                          rollout__max_seq_len=512, eval__max_new_tokens=32)
  config.unlock()
  config.rewards.cot_rm.update(checkpoint=judge_checkpoint, max_new_tokens=32)
  config.lock()
  sampled = planted_run(monkeypatch, config, str(tmp_path), lambda prompt: list(JUDGED))

  assert {r["response"] for r in sampled} == set(JUDGED)
  for row in sampled:
    expected = float(JUDGED[row["response"]].endswith('{"correct": true}'))
    assert row["task_reward"] == expected and row["correct"] == bool(expected), row
  # The math verifier would grade every planted response wrong: the judge alone gave the 1s.
  assert all(math_reward(r["response"], r["answer"]) == 0.0 for r in sampled)

  hf_judge = transformers.AutoTokenizer.from_pretrained(judge_checkpoint)
  questions = {r["question"]: gold(r) for r in rows}
  for row in sampled:
    question = next(q for q in questions if q in row["prompt"])
    expected_prompt = hf_judge.apply_chat_template([{"role": "user", "content": (
        JUDGE_PROMPT_TEMPLATE.format(question=question, reference=row["answer"],
                                     response=row["response"]))}],
        add_generation_prompt=True, tokenize=False)
    assert expected_prompt in judge_prompts
  assert all(p.startswith("<|im_start|>user (grader)\n") for p in judge_prompts)
  # Held-out request r gets option (eval.seed + r) % 3 of JUDGED, judged by the same judge.
  expected = np.mean([(config.eval.seed + r) % len(JUDGED) == 0 for r in range(len(rows) - 8)])
  metrics = read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl"))
  heldout = [m[key] for m in metrics for key in ("start/pass@1", "eval/pass@1") if key in m]
  assert len(heldout) == config.rl.iterations + 1 and all(a == expected for a in heldout)


@pytest.mark.parametrize("served", ["in_process", pytest.param("launch_serve",
                                                                marks=pytest.mark.slow)])
def test_cot_rm_judge_serves_its_checkpoint(judge_checkpoint, tmp_path, served):
  """The judge checkpoint on the in-process engine (no urls) or behind an SGLang-API server
  (urls): its greedy replies match transformers' greedy generation on the same chat-rendered
  prompt."""
  config = math_rl.get_config("smoke")
  config.unlock()
  config.rewards.cot_rm.update(checkpoint=judge_checkpoint, max_new_tokens=8)
  server = None
  if served == "launch_serve":
    server, url = _serve(judge_checkpoint, config.rewards.cot_rm.max_seq_len)
    config.rewards.cot_rm.urls = (url,)
  config.lock()
  try:
    rewards = run_rewards.build_run_rewards(config, ["math", "cot_rm"], str(tmp_path))
    examples = [RMExample("What is 6 * 7?", "42", "6 * 7 = 42"),
                RMExample("Natalia sold 48 clips", "72", "#### 70")]
    judgements = rewards.judge.judge(examples)
    registry_rewards = rewards.registry.task_rewards(  # a random model gives no verdict: 0
        {"math": "cot_rm"}, ["math"], ["6 * 7 = 42"], ["42"], ["What is 6 * 7?"])
    rewards.close()
  finally:
    if server is not None:
      server.kill()
      server.wait()
  hf_tok = transformers.AutoTokenizer.from_pretrained(judge_checkpoint)
  model = transformers.AutoModelForCausalLM.from_pretrained(judge_checkpoint)
  for example, judgement in zip(examples, judgements):
    ids = hf_tok.apply_chat_template([{"role": "user", "content": JUDGE_PROMPT_TEMPLATE.format(
        question=example.question, reference=example.reference, response=example.response)}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False,
                         eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
    assert judgement.text == hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert judgement.correct is None  # a random model gives no verdict: reward 0
  np.testing.assert_array_equal(registry_rewards, [0.0])


def test_cot_rm_without_a_judge_checkpoint_names_the_field(tmp_path):
  with pytest.raises(ValueError, match=r"config.rewards.cot_rm.checkpoint='': must be the "
                                       r"judge's HF directory"):
    run_rewards.build_run_rewards(math_rl.get_config("smoke"), ["cot_rm"], str(tmp_path))
  assert run_rewards.build_run_rewards(math_rl.get_config("smoke"), ["math"],
                                       str(tmp_path)).registry is REGISTRY
