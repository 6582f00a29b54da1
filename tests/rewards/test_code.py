"""Code reward: output comparison, per-test statuses, worker limit, batch rewards, fallback."""
import json
import threading
import time
import warnings

import numpy as np
import pytest

from kimi_jax.rewards import _sandbox, code
from kimi_jax.rewards._sandbox import Execution, Limits
from kimi_jax.rewards.code import (CaseStatus, code_rewards, extract_program, judge,
                                   outputs_match, parse_tests, run_tests)

SUM_PROGRAM = "import sys\nprint(sum(map(int, sys.stdin.read().split())))\n"


@pytest.mark.parametrize("expected, actual, match", [
    ("1 2\n3", "1  2 3\n\n", True),  # whitespace-separated tokens, layout free
    ("abc", "ABC", False),
    ("1 2", "1 2 3", False),
    ("", "", True),
    ("3", "3.0", False),  # integer expected: exact token
    ("3.0", "3", True),  # float expected: numeric within tolerance
    ("0.333333", "0.3333331", True),  # |diff| = 1e-7 <= 1e-6
    ("0.333333", "0.334", False),
    ("1e-9", "0", True),  # absolute tolerance near 0
    ("1e9", "1000000900", True),  # relative: 1e-6 * 1e9 = 1000 >= 900
    ("1e9", "1000002000", False),
    ("2.5", "nan", False),
    ("2.5", "2.5abc", False),
    ("-0.5", "-.5", True),
    ("YES", "yes", False),
])
def test_outputs_match(expected, actual, match):
  assert outputs_match(expected, actual) is match


def _execution(**overrides) -> Execution:
  fields = dict(timed_out=False, output_limited=False, returncode=0, stdout="42\n",
                stderr_tail="", wall_s=0.0)
  return Execution(**{**fields, **overrides})


@pytest.mark.parametrize("overrides, status", [
    ({}, CaseStatus.PASSED),
    ({"stdout": "41"}, CaseStatus.WRONG_ANSWER),
    ({"returncode": 1}, CaseStatus.RUNTIME_ERROR),  # right output but a crash: not a pass
    ({"returncode": -9}, CaseStatus.RUNTIME_ERROR),
    ({"timed_out": True, "returncode": None}, CaseStatus.TIMEOUT),
    ({"output_limited": True, "returncode": 1}, CaseStatus.OUTPUT_LIMIT),
])
def test_judge(overrides, status):
  assert judge(_execution(**overrides), "42") is status


def test_run_tests_statuses_and_score():
  # Wrong when the first number is odd, crashes on a negative first number, hangs on 0.
  program = """
import sys
a, b = map(int, sys.stdin.read().split())
if a < 0:
  raise ValueError(a)
while a == 0:
  pass
print(a + b + (a % 2))
"""
  tests = [("2 3", "5"), ("1 3", "4"), ("-1 5", "4"), ("0 1", "1"), ("4 4", "8")]
  result = run_tests(program, tests, timeout_s=1.0)
  assert result.statuses == (CaseStatus.PASSED, CaseStatus.WRONG_ANSWER,
                             CaseStatus.RUNTIME_ERROR, CaseStatus.TIMEOUT, CaseStatus.PASSED)
  assert result.score == 2 / 5


def test_run_tests_reads_stdin_and_tolerates_floats():
  program = "x = float(input())\nprint(x / 3)\n"
  assert run_tests(program, [("1", "0.333333"), ("3", "1.0")]).score == 1.0
  assert run_tests(program, [("1", "0.3334")]).score == 0.0


def test_worker_limit_is_respected(monkeypatch):
  running, peak, lock = 0, 0, threading.Lock()

  def fake_run(source, stdin, limits, packages, allow_unsandboxed):
    nonlocal running, peak
    with lock:
      running += 1
      peak = max(peak, running)
    time.sleep(0.02)
    with lock:
      running -= 1
    return _execution(stdout=stdin)

  monkeypatch.setattr(code, "run_program", fake_run)
  executions = code.run_programs([("p", str(i)) for i in range(12)], max_workers=3)
  assert peak == 3
  assert [e.stdout for e in executions] == [str(i) for i in range(12)]  # order kept


def test_budget_spent_leaves_later_jobs_unrun_and_scored_zero(monkeypatch):
  def slow_run(source, stdin, limits, packages, allow_unsandboxed):
    time.sleep(0.2)
    return _execution(stdout=stdin)

  monkeypatch.setattr(code, "run_program", slow_run)
  executions = code.run_programs([("p", "1")] * 10, max_workers=1, budget_s=0.3)
  ran = [not e.timed_out for e in executions]
  assert ran[0] and not any(ran[5:])  # ~2 jobs fit in 0.3 s of 0.2 s jobs; never 6
  assert ran == sorted(ran, reverse=True)  # jobs start in order, so only a tail is skipped
  assert all(code.judge(e, "1") is code.CaseStatus.TIMEOUT for e, r in zip(executions, ran) if not r)


def test_extract_program():
  response = "Plan.\n```python\nprint(1)\n```\nFixed:\n```py\nprint(2)\n```\nDone."
  assert extract_program(response) == "print(2)\n"
  assert extract_program("```\nprint(3)\n```") == "print(3)\n"
  assert extract_program("no code here") is None


def test_parse_tests_errors_name_the_problem():
  assert parse_tests('[["1 2", "3"]]') == [("1 2", "3")]
  with pytest.raises(ValueError, match="not JSON"):
    parse_tests("[[")
  with pytest.raises(ValueError, match="test 0 must be a"):
    parse_tests('[["only input"]]')
  with pytest.raises(ValueError, match="no test cases"):
    parse_tests("[]")


def test_limits_validation_names_the_field():
  with pytest.raises(ValueError, match="Limits.memory_mb"):
    Limits(memory_mb=0)


def test_code_rewards_binary_per_response():
  tests = json.dumps([["1 2", "3"], ["5 5", "10"]])
  wrong = "```python\nprint(3)\n```"  # passes only the first test
  responses = [f"```python\n{SUM_PROGRAM}```", wrong, "I cannot solve this."]
  np.testing.assert_array_equal(code_rewards(responses, [tests] * 3), [1.0, 0.0, 0.0])


@pytest.fixture
def without_bubblewrap(monkeypatch):
  real_which = _sandbox.shutil.which
  monkeypatch.setattr(_sandbox.shutil, "which",
                      lambda name: None if name == "bwrap" else real_which(name))
  monkeypatch.setattr(_sandbox, "_isolation", None)
  monkeypatch.delenv(_sandbox.UNSANDBOXED_ENV, raising=False)


def test_without_bubblewrap_untrusted_code_is_refused(without_bubblewrap):
  with pytest.raises(_sandbox.SandboxUnavailable) as refused:
    code_rewards([f"```python\n{SUM_PROGRAM}```"], [json.dumps([["1 2", "3"]])])
  message = str(refused.value)
  for needed in ("bubblewrap (bwrap) is not installed", "apt-get install bubblewrap",
                 "KIMI_ALLOW_UNSANDBOXED=1", "allow_unsandboxed=True"):
    assert needed in message, message


@pytest.mark.parametrize("opt_in", ["environment", "argument"])
def test_unsandboxed_runs_only_after_an_explicit_opt_in(without_bubblewrap, monkeypatch, opt_in):
  if opt_in == "environment":
    monkeypatch.setenv(_sandbox.UNSANDBOXED_ENV, "1")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = run_tests(SUM_PROGRAM, [("1 2 3", "6")], allow_unsandboxed=opt_in == "argument")
  assert any("WITHOUT isolation" in str(w.message) for w in caught)
  assert not _sandbox.isolation().bwrap
  assert result.score == 1.0
