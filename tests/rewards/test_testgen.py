"""k1.5 test generation on small problems with correct and planted-wrong solutions.

The expected kept cases and verdicts are computed here from the generated inputs with plain
Python references, independently of the rule's implementation.
"""
import pytest

from kimi_jax.rewards.testgen import (GenerationConfig, generate_inputs, generate_tests,
                                      majority_output)
from kimi_jax.rewards._sandbox import Execution

# n in 1..12, then n distinct values in [1, 100], written with CYaRon.
GENERATOR = """
import random
from cyaron import Vector, randint
random.seed(int(input()))
n = randint(1, 12)
print(n)
print(*(v[0] for v in Vector.random(n, [(1, 100)])))
"""
CONFIG = GenerationConfig(num_cases=12, timeout_s=1.0)  # small: 12 x 11 sandboxed runs a problem
READ = "n = int(input())\nxs = list(map(int, input().split()))\n"
SUM_VARIANTS = [
    READ + "print(sum(xs))",
    READ + "t = 0\nfor x in xs:\n  t += x\nprint(t)",
    READ + "import functools, operator\nprint(functools.reduce(operator.add, xs, 0))",
    READ + "print(sum(sorted(xs)))",
    READ + "print(str(sum(xs)) + '\\n')",  # trailing blank line: same tokens
    READ + "print(' ' + str(sum(xs)))",
    READ + "print(sum(x for x in xs))",
    READ + "print(sum(xs[::-1]))",
    READ + "import math\nprint(math.fsum(xs).__int__())",
]
MAX_VARIANTS = [READ + "print(max(xs))", READ + "print(sorted(xs)[-1])",
                READ + "m = xs[0]\nfor x in xs:\n  m = x if x > m else m\nprint(m)"]


def _parse(stdin: str) -> list[int]:
  n, *xs = map(int, stdin.split())
  assert len(xs) == n
  return xs


def test_default_config_is_the_paper_rule():
  assert (GenerationConfig().num_cases, GenerationConfig().min_agreeing,
          GenerationConfig().min_passing) == (50, 7, 9)


def test_inputs_come_from_the_cyaron_generator():
  inputs = generate_inputs(GENERATOR, CONFIG)
  assert len(inputs) == len(set(inputs)) >= 11  # 12 seeds, a duplicate is unlikely
  for stdin in inputs:
    xs = _parse(stdin)
    assert 1 <= len(xs) <= 12 and len(set(xs)) == len(xs) and all(1 <= x <= 100 for x in xs)


def test_failed_and_duplicate_generator_runs_are_dropped():
  generator = "s = int(input())\nif s % 5 == 4:\n  raise SystemExit(1)\nprint(s % 3)"
  # Seeds 0..9 print 0,1,2,0,-,2,0,1,2,- -> distinct in seed order.
  assert generate_inputs(generator, GenerationConfig(num_cases=10)) == ["0\n", "1\n", "2\n"]


def test_cases_without_a_7_of_10_majority_are_dropped():
  # 6 correct, 4 sharing one bug on odd n: odd-n cases split 6/4 and must go; even-n cases
  # have 10/10 and stay. The kept cases then pass all 10 solutions, so the problem is kept.
  buggy = READ + "print(sum(xs) + n % 2)"
  result = generate_tests(GENERATOR, SUM_VARIANTS[:6] + [buggy] * 4, CONFIG)
  even = [s for s in result.inputs if len(_parse(s)) % 2 == 0]
  assert 0 < len(even) < len(result.inputs)  # both kinds were generated
  assert [stdin for stdin, _ in result.cases] == even
  assert all(int(out) == sum(_parse(stdin)) for stdin, out in result.cases)
  assert result.agreement == [10 if s in even else 6 for s in result.inputs]
  assert result.passing == [True] * 10
  assert result.keep_problem


def test_problem_is_dropped_when_two_of_ten_solutions_fail():
  # 8 correct always agree, so every case is kept; the 2 wrong ones (a crash on big values,
  # a min instead of max when the first value is even) fail some kept case: 8 < 9 passing.
  crash = READ + "assert max(xs) < 60\nprint(max(xs))"
  minimum = READ + "print(min(xs) if xs[0] % 2 == 0 else max(xs))"
  correct = (MAX_VARIANTS * 3)[:8]
  result = generate_tests(GENERATOR, correct + [crash, minimum], CONFIG)
  inputs = [_parse(s) for s in result.inputs]
  assert any(max(xs) >= 60 for xs in inputs)
  assert any(xs[0] % 2 == 0 and min(xs) != max(xs) for xs in inputs)
  assert [stdin for stdin, _ in result.cases] == result.inputs
  assert [int(out) for _, out in result.cases] == [max(xs) for xs in inputs]
  assert result.passing == [True] * 8 + [False, False]
  assert not result.keep_problem


def test_problem_is_kept_with_nine_passing_despite_a_hanging_solution():
  # 9 correct; the 10th loops for ever when n is a multiple of 5 and is killed at the timeout
  # (a failed run agrees with nothing). 9 >= 9: keep.
  hangs = READ + "while n % 5 == 0:\n  pass\nprint(sum(xs))"
  result = generate_tests(GENERATOR, SUM_VARIANTS + [hangs], CONFIG)
  triggers = [len(_parse(s)) % 5 == 0 for s in result.inputs]
  assert any(triggers)
  assert result.agreement == [9 if t else 10 for t in triggers]
  assert len(result.cases) == len(result.inputs)
  assert result.passing == [True] * 9 + [False]
  assert result.keep_problem


def test_invalid_thresholds_name_the_field():
  with pytest.raises(ValueError, match=r"GenerationConfig.min_passing=9 must lie in \[1, 8\]"):
    generate_tests(GENERATOR, SUM_VARIANTS[:8], CONFIG)


def _run(stdout: str, ok: bool = True) -> Execution:
  return Execution(timed_out=not ok, output_limited=False, returncode=0 if ok else None,
                   stdout=stdout, stderr_tail="", wall_s=0.0)


def test_majority_output_groups_by_tokens_and_ignores_failures():
  runs = [_run("1 2\n"), _run("1  2"), _run("3"), _run("1 2", ok=False), _run("3")]
  assert majority_output(runs) == ("1 2\n", 2)
  assert majority_output([_run("x", ok=False)]) == (None, 0)
