"""Math reward: the committed case table, GSM8K self-agreement, extraction, hard timeouts."""
import collections
import json
import os
import time

import numpy as np
import pytest

from kimi_jax.data.sources import gsm8k_answer, shared_data_path
from kimi_jax.rewards.math import MathVerifier, extract_final_answer, math_reward

CASES_PATH = os.path.join(os.path.dirname(__file__), "data", "math_cases.jsonl")
REQUIRED_CATEGORIES = {"fraction", "decimal", "percent", "units", "interval", "set", "equation",
                       "latex", "expression", "extraction", "hedge"}
HANGING_ANSWER = r"\boxed{9^{9^{9^{9}}}}"  # sympy tries to build the integer: never returns


def _load_cases() -> list[dict]:
  cases = []
  with open(CASES_PATH) as f:
    for line_no, line in enumerate(f, 1):
      row = json.loads(line)
      for field, kind in (("category", str), ("gold", str), ("response", str),
                          ("expected", int)):
        if not isinstance(row.get(field), kind):
          raise ValueError(f"{CASES_PATH}:{line_no}: field {field!r} must be {kind.__name__}")
      if row["expected"] not in (0, 1):
        raise ValueError(f"{CASES_PATH}:{line_no}: field 'expected' must be 0 or 1")
      cases.append({**row, "line": line_no})
  return cases


CASES = _load_cases()


@pytest.fixture(scope="module")
def verifier():
  with MathVerifier(num_workers=2, timeout_s=10.0) as v:
    yield v


def test_case_table_coverage():
  assert len(CASES) >= 150
  by_category = collections.Counter(c["category"] for c in CASES)
  assert REQUIRED_CATEGORIES <= set(by_category), by_category
  wrong = collections.Counter(c["category"] for c in CASES if c["expected"] == 0)
  assert all(wrong[c] >= 2 for c in REQUIRED_CATEGORIES), wrong  # failures in every category


def test_case_table(verifier):
  rewards = verifier.rewards([c["response"] for c in CASES], [c["gold"] for c in CASES])
  mismatches = [f"line {c['line']}: gold {c['gold']!r} response {c['response']!r} "
                f"expected {c['expected']} got {r}" for c, r in zip(CASES, rewards)
                if r != c["expected"]]
  assert not mismatches, "\n".join(mismatches)
  assert verifier.timeouts == verifier.errors == 0


def _gsm8k_rows() -> list[dict]:
  path = shared_data_path("gsm8k/test.jsonl")
  assert os.path.exists(path), (f"GSM8K test split missing at {path}: set KIMI_JAX_SHARED_DATA "
                                f"to the shared data directory")
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_gsm8k_answers_verify_against_themselves(verifier):
  rows = _gsm8k_rows()
  assert len(rows) == 1319
  solutions = [r["answer"] for r in rows]
  golds = [gsm8k_answer(s) for s in solutions]
  np.testing.assert_array_equal(verifier.rewards(solutions, golds), 1.0)
  # Control: each solution against the next problem's gold fails wherever the numbers differ.
  shifted = golds[1:] + golds[:1]
  differ = np.array([float(a) != float(b) for a, b in zip(golds, shifted)])
  assert differ.sum() > 1200
  np.testing.assert_array_equal(verifier.rewards(solutions, shifted)[differ], 0.0)


@pytest.mark.parametrize("response, answer", [
    (r"so \boxed{\frac{1}{2}} done", r"\frac{1}{2}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    ("#### 1,234\nmore text", "1,234"),
    ("Answer: $5$.", "5"),
    ("ANSWER:  x = 3 \nthen", "x = 3"),
    (r"\boxed{3} then #### 4 then Answer: 5", "3"),
    ("#### 4\nAnswer: 5", "4"),
    ("The answer is 5", None),
    (r"\boxed{}", None),
    ("Answer:", None),
])
def test_extract_final_answer(response, answer):
  assert extract_final_answer(response) == answer


def test_hanging_input_scores_zero_and_the_pool_keeps_working():
  with MathVerifier(num_workers=2, timeout_s=1.0) as v:
    v.rewards([r"\boxed{1}"] * 2, ["1"] * 2)  # workers started
    start = time.monotonic()
    rewards = v.rewards([HANGING_ANSWER, r"\boxed{2}", "#### 7"], ["3", "2", "8"])
    # A hang detector, not a speed check: without the hard kill this never returns.
    assert time.monotonic() - start < 1.0 + 30.0
    np.testing.assert_array_equal(rewards, [0.0, 1.0, 0.0])
    assert v.timeouts == 1
    np.testing.assert_array_equal(v.rewards([r"\boxed{2}", HANGING_ANSWER], ["2", "2"]),
                                  [1.0, 0.0])
    assert v.timeouts == 2


def test_math_reward_single_call():
  assert math_reward(r"The area is \boxed{\frac{3}{4}}.", "0.75") == 1.0
  assert math_reward(r"The area is \boxed{\frac{4}{3}}.", "0.75") == 0.0
  assert math_reward("no final answer", "0.75") == 0.0


def test_rewards_length_mismatch_is_an_error(verifier):
  with pytest.raises(ValueError, match="2 responses but 1 golds"):
    verifier.rewards(["a", "b"], ["1"])
