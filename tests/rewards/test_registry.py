"""Reward registry: per-task dispatch, length penalty on top, built-in math and code rewards."""
import json

import numpy as np
import pytest

from kimi_jax.data import synthetic
from kimi_jax.rewards.registry import REGISTRY, RewardRegistry, per_response, score_rollout

EXACT = 1e-12  # hand values below are sums of a few short binary fractions


@pytest.fixture
def registry():
  r = RewardRegistry()
  r.register("arith", per_response(lambda response, answer: float(
      synthetic.is_correct(response, answer))))
  r.register("parity", per_response(lambda response, answer: float(
      int(response) % 2 == int(answer))))
  return r


def test_dispatch_by_task_and_length_penalty(registry):
  tasks = ["arith", "arith", "arith", "even_odd", "even_odd"]
  responses = ["7+5=12#12", "7+5=13#13", "1+1=2#2", "4", "7"]
  answers = ["12", "12", "2", "0", "0"]
  lengths = [10, 20, 30, 5, 5]
  groups = [0, 0, 0, 1, 1]
  scores = score_rollout({"arith": "arith", "even_odd": "parity"}, tasks, responses,
                         answers, lengths, groups, length_penalty_weight=0.2,
                         length_penalty_warmup=3, iteration=3, registry=registry)
  np.testing.assert_array_equal(scores.correct, [True, False, True, True, False])
  np.testing.assert_array_equal(scores.task, [1.0, 0.0, 1.0, 1.0, 0.0])
  # Group 0: lambda = 0.5 - (len - 10) / 20 = (0.5, 0, -0.5); the wrong one keeps min(0, 0).
  # Group 1: equal lengths -> no length reward.
  np.testing.assert_allclose(scores.rewards, [1 + 0.2 * 0.5, 0.0, 1 - 0.2 * 0.5, 1.0, 0.0],
                             atol=EXACT)


def test_length_penalty_is_off_during_warmup(registry):
  scores = score_rollout({"arith": "arith"}, ["arith"] * 2, ["1+1=2#2", "1+1=3#3"],
                         ["2", "2"], [4, 40], [0, 0], length_penalty_weight=0.2,
                         length_penalty_warmup=3, iteration=2, registry=registry)
  np.testing.assert_array_equal(scores.rewards, [1.0, 0.0])


def test_builtin_math_and_code_rewards():
  tests = json.dumps([["2 3", "5"], ["10 -4", "6"]])
  program = "```python\nprint(sum(map(int, input().split())))\n```"
  tasks = ["gsm8k", "gsm8k", "code"]
  rewards = REGISTRY.task_rewards({"gsm8k": "math", "code": "code"}, tasks,
                                  ["So #### 1,200", r"\boxed{1201}", program],
                                  ["1200", "1200", tests])
  np.testing.assert_array_equal(rewards, [1.0, 0.0, 1.0])


def test_errors_name_the_problem(registry):
  with pytest.raises(ValueError, match="already registered"):
    registry.register("arith", per_response(lambda r, a: 0.0))
  with pytest.raises(ValueError, match=r"unknown reward 'nope'; registered: \['arith', 'parity'\]"):
    registry.task_rewards({"t": "nope"}, ["t"], ["r"], ["a"])
  with pytest.raises(ValueError, match=r"no reward configured for task\(s\) \['other'\]"):
    registry.task_rewards({"t": "arith"}, ["t", "other"], ["r", "r"], ["a", "a"])
  with pytest.raises(ValueError, match="got 2 tasks, 1 responses and 1 answers"):
    registry.task_rewards({"t": "arith"}, ["t", "t"], ["r"], ["a"])
  registry.register("broken", lambda responses, answers: np.full(len(responses), 2.0))
  with pytest.raises(ValueError, match=r"reward 'broken' must return 1 values in \[0, 1\]"):
    registry.task_rewards({"t": "broken"}, ["t"], ["r"], ["a"])


def test_question_rewards_get_the_questions_of_their_rows_only(registry):
  calls = []

  def mentions_answer(questions, responses, answers):
    calls.append((list(questions), list(responses), list(answers)))
    return np.array([float(a in q) for q, a in zip(questions, answers)])

  run_registry = registry.copy()
  run_registry.register("judge", mentions_answer, needs_questions=True)
  rewards = run_registry.task_rewards(
      {"arith": "arith", "word": "judge"}, ["arith", "word", "arith", "word"],
      ["1+1=2#2", "r1", "1+1=3#3", "r3"], ["2", "4", "2", "9"],
      ["1+1", "what is 2+2 (4)?", "1+1", "what is 3*3?"])
  np.testing.assert_array_equal(rewards, [1.0, 1.0, 0.0, 0.0])
  assert calls == [(["what is 2+2 (4)?", "what is 3*3?"], ["r1", "r3"], ["4", "9"])]
  with pytest.raises(ValueError, match="unknown reward 'judge'"):  # the copy leaves its source
    registry.task_rewards({"word": "judge"}, ["word"], ["r"], ["a"], ["q"])
  with pytest.raises(ValueError, match="reward 'judge' \\(task 'word'\\) grades against the "
                                       "question: pass questions_B"):
    run_registry.task_rewards({"word": "judge"}, ["word"], ["r"], ["a"])
  with pytest.raises(ValueError, match="got 2 questions for 1 tasks"):
    run_registry.task_rewards({"word": "judge"}, ["word"], ["r"], ["a"], ["q", "q"])
