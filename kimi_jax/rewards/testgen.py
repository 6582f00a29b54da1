"""Test-case generation for code problems with CYaRon and the k1.5 agreement rule.

A generator program (model-written, so untrusted) reads one integer seed on stdin and prints one
test input, typically with CYaRon (`import cyaron`). It runs for seeds 0..num_cases-1; failed
runs are dropped and duplicate inputs kept once. Every ground-truth solution then runs on every
input. k1.5 rule, with its defaults of 50 cases and 10 solutions:
- keep a case if at least `min_agreeing` (7) solutions print the same output (same
  whitespace-separated tokens); that majority output becomes the expected output;
- keep the problem if at least `min_passing` (9) solutions pass every kept case (judged like the
  code reward, `code.outputs_match`) and at least one case is kept.
Every program, generator and solutions alike, runs in the code sandbox.
"""
import collections
import dataclasses
from typing import Sequence

from kimi_jax.rewards._sandbox import Execution, Limits
from kimi_jax.rewards.code import outputs_match, run_programs

GENERATOR_PACKAGES = ("cyaron", "colorful", "xeger")  # CYaRon and the packages it imports


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  num_cases: int = 50
  min_agreeing: int = 7
  min_passing: int = 9
  timeout_s: float = 2.0  # per program run
  memory_mb: int = 256
  max_workers: int = 2
  allow_unsandboxed: bool = False  # run without bubblewrap (rlimits only): see _sandbox


@dataclasses.dataclass(frozen=True)
class GeneratedTests:
  """Outcome for one problem: the kept (stdin, expected stdout) cases and the evidence."""
  cases: list[tuple[str, str]]
  keep_problem: bool
  inputs: list[str]  # every distinct generated input, in seed order
  agreement: list[int]  # per input: size of the largest group of solutions with equal output
  passing: list[bool]  # per solution: passes every kept case


def _limits(config: GenerationConfig) -> Limits:
  return Limits(timeout_s=config.timeout_s, memory_mb=config.memory_mb)


def generate_inputs(generator: str, config: GenerationConfig) -> list[str]:
  """Distinct outputs of the generator over seeds 0..num_cases-1, failed runs dropped."""
  executions = run_programs([(generator, f"{seed}\n") for seed in range(config.num_cases)],
                            _limits(config), config.max_workers, GENERATOR_PACKAGES,
                            config.allow_unsandboxed)
  return list(dict.fromkeys(e.stdout for e in executions if e.ok))


def majority_output(executions: Sequence[Execution]) -> tuple[str | None, int]:
  """The most common output among successful runs (compared as token lists) and its count."""
  groups = collections.defaultdict(list)
  for e in executions:
    if e.ok:
      groups[tuple(e.stdout.split())].append(e.stdout)
  if not groups:
    return None, 0
  outputs = max(groups.values(), key=len)
  return outputs[0], len(outputs)


def generate_tests(generator: str, solutions: Sequence[str],
                   config: GenerationConfig = GenerationConfig()) -> GeneratedTests:
  """Generate inputs, run all solutions on them and apply the k1.5 rule (module docstring)."""
  for field in ("min_agreeing", "min_passing"):
    if not 1 <= getattr(config, field) <= len(solutions):
      raise ValueError(f"GenerationConfig.{field}={getattr(config, field)} must lie in "
                       f"[1, {len(solutions)}] for {len(solutions)} solutions")
  inputs = generate_inputs(generator, config)
  runs = run_programs([(s, stdin) for s in solutions for stdin in inputs], _limits(config),
                      config.max_workers, allow_unsandboxed=config.allow_unsandboxed)
  by_solution = [runs[i * len(inputs):(i + 1) * len(inputs)] for i in range(len(solutions))]
  cases, agreement = [], []
  for j, stdin in enumerate(inputs):
    output, count = majority_output([executions[j] for executions in by_solution])
    agreement.append(count)
    if count >= config.min_agreeing:
      cases.append((j, stdin, output))
  passing = [all(executions[j].ok and outputs_match(output, executions[j].stdout)
                 for j, _, output in cases) for executions in by_solution]
  return GeneratedTests(cases=[(stdin, output) for _, stdin, output in cases],
                        keep_problem=bool(cases) and sum(passing) >= config.min_passing,
                        inputs=inputs, agreement=agreement, passing=passing)
