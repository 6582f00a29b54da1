"""Reward throughput on 2 workers: math verifications/s and sandboxed program runs/s.

Each figure comes with a reference measured in the same run (the machine is shared and noisy):
- math: the pool against the same comparisons in-process, one at a time, without timeouts;
- code: sandboxed runs against bare `python3 -c` launches, both 2 at a time; plus the
  per-launch cost of the sandbox with and without bubblewrap (when bubblewrap works here).
Run: .venv/bin/python benchmarks/rewards.py [--math-calls=400] [--runs=100]
"""
import argparse
import concurrent.futures
import subprocess
import time

from kimi_jax.rewards import _sandbox
from kimi_jax.rewards.code import run_programs
from kimi_jax.rewards.math import MathVerifier, extract_final_answer, is_equivalent

WORKERS = 2
# Typical final answers (integers, fractions, percentages, sets, intervals, equations, roots,
# a wrong one), made distinct by i so that math-verify's parse caches do not flatter either side.
MATH_TEMPLATES = [("{i}", "#### {i}"), (r"\frac{{1}}{{{i}}}", r"\boxed{{1/{i}}}"),
                  (r"{i}\%", r"\boxed{{{i}}}"), (r"\{{1,{i}\}}", r"\boxed{{\{{{i},1\}}}}"),
                  ("[1,{i})", r"\boxed{{[1, {i})}}"), ("y={i}x+1", r"\boxed{{y=1+{i}x}}"),
                  (r"{i}\sqrt{{2}}", r"\boxed{{\sqrt{{{i}^2 \cdot 2}}}}"),
                  ("{i}", "Answer: {i}1")]
PROGRAM = "import sys\nprint(sum(map(int, sys.stdin.read().split())))\n"


def _math_pairs(calls: int, offset: int) -> tuple[list[str], list[str]]:
  pairs = [(gold.format(i=i + offset), response.format(i=i + offset))
           for i in range(2, calls // len(MATH_TEMPLATES) + 3)
           for gold, response in MATH_TEMPLATES][:calls]
  return [g for g, _ in pairs], [r for _, r in pairs]


def math_benchmark(calls: int) -> None:
  golds, responses = _math_pairs(calls, offset=0)
  for gold, response in zip(*_math_pairs(len(MATH_TEMPLATES), offset=10**6)):
    is_equivalent(gold, extract_final_answer(response))  # warm up (lazy imports)
  start = time.perf_counter()
  for gold, response in zip(golds, responses):
    is_equivalent(gold, extract_final_answer(response))
  inline_s = time.perf_counter() - start
  with MathVerifier(num_workers=WORKERS, timeout_s=10.0) as verifier:
    verifier.rewards(*reversed(_math_pairs(WORKERS * 8, offset=2 * 10**6)))  # start, warm up
    start = time.perf_counter()
    verifier.rewards(responses, golds)
    pool_s = time.perf_counter() - start
  print(f"math: {calls / pool_s:8.1f} verifications/s ({WORKERS} workers, "
        f"{1e3 * pool_s / calls:.2f} ms each); in-process reference {calls / inline_s:8.1f}/s; "
        f"ratio {inline_s / pool_s:.2f}x")


def _launches_per_s(launch, n: int) -> float:
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
    list(pool.map(lambda _: launch(), range(n)))
  return n / (time.perf_counter() - start)


def _ms_per_launch(launch, n: int) -> float:
  start = time.perf_counter()
  for _ in range(n):
    launch()
  return 1e3 * (time.perf_counter() - start) / n


def code_benchmark(runs: int) -> None:
  mode = _sandbox.isolation()
  python = _sandbox.python_interpreter()
  bare = lambda: subprocess.run([python, "-s", "-B", "-c", PROGRAM], input=b"1 2",
                                capture_output=True, check=True)
  run_programs([(PROGRAM, "1 2")] * WORKERS, max_workers=WORKERS)  # warm up
  start = time.perf_counter()
  run_programs([(PROGRAM, "1 2")] * runs, max_workers=WORKERS)
  sandboxed = runs / (time.perf_counter() - start)
  reference = _launches_per_s(bare, runs)
  print(f"code: {sandboxed:8.1f} sandboxed runs/s ({WORKERS} workers, bubblewrap "
        f"{'on' if mode.bwrap else 'OFF'}, dedicated uid {'on' if mode.dedicated_uid else 'off'})"
        f"; bare python launches {reference:8.1f}/s; ratio {reference / sandboxed:.2f}x")
  per_launch = {"bare python": _ms_per_launch(bare, runs // 4)}
  for bwrap in ([True, False] if mode.bwrap else [False]):
    per_launch[f"sandbox, bwrap {'on' if bwrap else 'off'}"] = _ms_per_launch(
        lambda: _sandbox._launch(PROGRAM, "1 2", _sandbox.Limits(), (), bwrap, slot=0),
        runs // 4)
  print("per launch, one at a time: " + ", ".join(f"{k} {v:.1f} ms" for k, v in
                                                 per_launch.items()))
  if mode.bwrap:
    print(f"bubblewrap adds {per_launch['sandbox, bwrap on'] - per_launch['sandbox, bwrap off']:.1f}"
          f" ms per launch")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--math-calls", type=int, default=400)
  parser.add_argument("--runs", type=int, default=100)
  args = parser.parse_args()
  math_benchmark(args.math_calls)
  code_benchmark(args.runs)


if __name__ == "__main__":
  main()
