"""Code reward: run an untrusted Python program on stdin/stdout test cases in the sandbox.

Each test is one sandboxed run (`_sandbox.run_program`: own uid, namespaces, seccomp, rlimits,
process group killed on timeout); without bubblewrap every call raises
`_sandbox.SandboxUnavailable` unless `allow_unsandboxed=True` (or KIMI_ALLOW_UNSANDBOXED=1). Outputs are compared here, in the trusted parent, as whitespace-
separated tokens: exact string equality, except that where the expected token is a float literal
the actual token must be a number within FLOAT_ABS_TOL or FLOAT_REL_TOL of it. The program never
sees the expected output, so nothing it prints or defines (an object whose __eq__ is always
True, say) can affect the comparison.
"""
import concurrent.futures
import dataclasses
import enum
import json
import math
import os
import re
import time
from typing import Sequence

import numpy as np

from kimi_jax.rewards._sandbox import Execution, Limits, check_isolation, run_program

# Usual judge tolerance for real-valued answers: |actual - expected| <= max(abs, rel * |expected|).
FLOAT_ABS_TOL = 1e-6
FLOAT_REL_TOL = 1e-6
_FLOAT_LITERAL = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+(?=[eE]))(?:[eE][+-]?\d+)?")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_FENCED_CODE = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)


class CaseStatus(enum.Enum):
  PASSED = "passed"
  WRONG_ANSWER = "wrong_answer"
  RUNTIME_ERROR = "runtime_error"  # non-zero exit, killed by a signal, or out of memory
  TIMEOUT = "timeout"
  OUTPUT_LIMIT = "output_limit"


@dataclasses.dataclass(frozen=True)
class SuiteResult:
  """Per-test-case statuses of one program, in test order."""
  statuses: tuple[CaseStatus, ...]

  @property
  def score(self) -> float:
    """Fraction of tests passed."""
    return sum(s is CaseStatus.PASSED for s in self.statuses) / len(self.statuses)


def _tokens_match(expected: str, actual: str) -> bool:
  if _FLOAT_LITERAL.fullmatch(expected):
    return bool(_NUMBER.fullmatch(actual)) and math.isclose(
        float(actual), float(expected), rel_tol=FLOAT_REL_TOL, abs_tol=FLOAT_ABS_TOL)
  return expected == actual


def outputs_match(expected: str, actual: str) -> bool:
  """Token-wise comparison of program output with the expected output (module docstring)."""
  expected_tokens, actual_tokens = expected.split(), actual.split()
  return len(expected_tokens) == len(actual_tokens) and all(
      map(_tokens_match, expected_tokens, actual_tokens))


def judge(execution: Execution, expected: str) -> CaseStatus:
  """Status of one test case from its execution, judged here in the trusted parent."""
  if execution.timed_out:
    return CaseStatus.TIMEOUT
  if execution.output_limited:
    return CaseStatus.OUTPUT_LIMIT
  if execution.returncode != 0:
    return CaseStatus.RUNTIME_ERROR
  return CaseStatus.PASSED if outputs_match(expected, execution.stdout) else (
      CaseStatus.WRONG_ANSWER)


DEFAULT_WORKERS = os.cpu_count() or 1  # each job is one sandboxed process


def _not_run(budget_s: float) -> Execution:
  """A job the reward's time budget ran out before: scored like a timeout."""
  return Execution(timed_out=True, output_limited=False, returncode=None, stdout="",
                   stderr_tail=f"not run: the reward's {budget_s} s budget was spent", wall_s=0.0)


def run_programs(jobs: Sequence[tuple[str, str]], limits: Limits = Limits(),
                 max_workers: int = DEFAULT_WORKERS, python_packages: tuple[str, ...] = (),
                 allow_unsandboxed: bool = False,
                 budget_s: float | None = None) -> list[Execution]:
  """Sandboxed executions of (source, stdin) jobs, at most `max_workers` at a time, in order.

  With `budget_s`, jobs not started within the budget are not run (they read as timeouts), so
  the whole call returns within budget_s + one job's timeout.
  """
  if max_workers < 1:
    raise ValueError(f"max_workers must be >= 1, got {max_workers}")
  check_isolation(allow_unsandboxed)  # refuse before any job starts
  deadline = None if budget_s is None else time.monotonic() + budget_s

  def run(job):
    if deadline is not None and time.monotonic() > deadline:
      return _not_run(budget_s)
    return run_program(*job, limits, python_packages, allow_unsandboxed)

  with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
    return list(pool.map(run, jobs))


def _check_tests(tests: Sequence[tuple[str, str]], where: str) -> None:
  if not tests:
    raise ValueError(f"{where}: no test cases")
  for i, test in enumerate(tests):
    if len(test) != 2 or not all(isinstance(part, str) for part in test):
      raise ValueError(f"{where}: test {i} must be a (stdin, expected stdout) pair of strings, "
                       f"got {test!r:.80}")


def run_test_suites(programs: Sequence[str], suites: Sequence[Sequence[tuple[str, str]]],
                    timeout_s: float = 2.0, memory_mb: int = 256,
                    max_workers: int = DEFAULT_WORKERS, allow_unsandboxed: bool = False,
                    budget_s: float | None = None) -> list[SuiteResult]:
  """`run_tests` for many programs (program i against suite i) through one worker pool."""
  if len(programs) != len(suites):
    raise ValueError(f"{len(programs)} programs but {len(suites)} test suites")
  for i, tests in enumerate(suites):
    _check_tests(tests, f"suite {i}")
  limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb)
  jobs = [(program, stdin) for program, tests in zip(programs, suites) for stdin, _ in tests]
  executions = iter(run_programs(jobs, limits, max_workers,
                                 allow_unsandboxed=allow_unsandboxed, budget_s=budget_s))
  return [SuiteResult(tuple(judge(next(executions), expected) for _, expected in tests))
          for tests in suites]


def run_tests(program: str, tests: Sequence[tuple[str, str]], timeout_s: float = 2.0,
              memory_mb: int = 256, max_workers: int = DEFAULT_WORKERS,
              allow_unsandboxed: bool = False) -> SuiteResult:
  """Run Python `program` once per (stdin, expected stdout) test, sandboxed; per-test statuses.

  `timeout_s` (wall clock) and `memory_mb` (address space) apply to each run.
  """
  return run_test_suites([program], [tests], timeout_s, memory_mb, max_workers,
                         allow_unsandboxed)[0]


def extract_program(response: str) -> str | None:
  """The last fenced code block (```python, ```py or bare ```) of a response; None if none."""
  blocks = _FENCED_CODE.findall(response)
  return blocks[-1] if blocks else None


def parse_tests(answer: str) -> list[tuple[str, str]]:
  """Test cases stored as a prompt's answer: a JSON list of [stdin, expected stdout] pairs."""
  try:
    pairs = json.loads(answer)
  except json.JSONDecodeError as e:
    raise ValueError(f"code answer is not JSON ({e}): {answer!r:.80}") from None
  if not isinstance(pairs, list):
    raise ValueError(f"code answer must be a JSON list of [stdin, stdout] pairs: {answer!r:.80}")
  tests = [tuple(pair) if isinstance(pair, list) else pair for pair in pairs]
  _check_tests(tests, "code answer")
  return tests


def code_rewards(responses: Sequence[str], answers: Sequence[str], timeout_s: float = 2.0,
                 memory_mb: int = 256, max_workers: int = DEFAULT_WORKERS,
                 allow_unsandboxed: bool = False, budget_s: float = 120.0) -> np.ndarray:
  """1.0 where the response's program passes every test of its answer (`parse_tests`), else 0.0.

  Binary like the math reward (k1.5: a program must pass all tests; no partial credit); float64
  [B]. A response without a code block scores 0; so does a wrong, crashing or timing-out
  program, and one whose tests the `budget_s` of the whole batch did not reach.
  """
  if len(responses) != len(answers):
    raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
  programs = [extract_program(r) for r in responses]
  rows = [i for i, program in enumerate(programs) if program is not None]
  results = run_test_suites([programs[i] for i in rows], [parse_tests(answers[i]) for i in rows],
                            timeout_s, memory_mb, max_workers, allow_unsandboxed, budget_s)
  rewards_B = np.zeros(len(responses))
  rewards_B[rows] = [float(result.score == 1.0) for result in results]
  return rewards_B
