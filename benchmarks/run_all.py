"""`make bench`: every benchmark in one process, ratios to references measured in the same run.

Writes runs/bench/results.json (the ratios, the numbers behind them, the machine's load) and
runs/bench/results.md (the table), and appends the run to runs/bench/history.jsonl. With
--readme, rewrites the README's benchmark table from an existing results.json instead.
Run: .venv/bin/python benchmarks/run_all.py [--only=decode,muon] [--readme]
"""
import argparse
import datetime
import functools
import json
import os
import pathlib
import platform
import subprocess
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

import attention_memory  # noqa: E402
import decode  # noqa: E402
import muon  # noqa: E402
import partial_rollout  # noqa: E402
import prefix_sharing  # noqa: E402
import train_step  # noqa: E402

# Repetitions sized so that the whole run takes ~10 minutes on 2 quiet cores.
BENCHMARKS = {"train_step": functools.partial(train_step.measure, reps=5),
              "decode": functools.partial(decode.measure, repeats=3),
              "muon": functools.partial(muon.measure, reps=3),
              "partial_rollout": partial_rollout.measure,
              "attention_memory": attention_memory.measure,
              "prefix_sharing": functools.partial(prefix_sharing.measure, reps=3)}
# key: (comparison, goal or None (reported only), what the ratio is measured against)
GOALS = {
    "train_step_vs_matmul": (">=", 0.6, "train-step FLOP/s (6ND + attention) of a ~19M LM, batch "
                             "8x256 / FLOP/s of a 2048x2048 jnp.dot"),
    "decode_vs_roofline": (">=", 0.4, "engine tokens/s x 2 x matmul params (~19M Qwen2, batch 64, "
                           "128 prompt + 128 new) / jnp.dot FLOP/s"),
    "decode_step_vs_roofline": (None, None, "decode_vs_roofline without the prefill: batch "
                                "64 / (time past each row's first token / 127 steps)"),
    "decode_vs_hf_tiny": (">=", 10.0, "engine tokens/s / transformers generate tokens/s, 86k "
                          "model, batch 32, greedy"),
    "decode_vs_hf_20m": (None, None, "engine tokens/s / transformers generate tokens/s, ~19M "
                         "Qwen2, batch 64, 128 + 128 tokens, greedy"),
    "muon_ns_vs_matmul": (">=", 0.6, "Newton-Schulz FLOP/s (counted per matrix) on the 60M tree "
                          "/ jnp.dot FLOP/s"),
    "partial_vs_full_rl_iteration": ("<=", 0.6, "mean iteration time with partial rollouts / "
                                     "without, heavy-tailed lengths"),
    "attention_memory_16k_vs_2k": ("<=", 9.0, "blockwise fwd+bwd XLA temp bytes at 16k / at 2k "
                                   "tokens"),
    "prefill_tokens_shared_fraction": (None, None, "prompt tokens of one RL iteration (32 prompts "
                                       "x k=8) whose KV cache is copied, not recomputed; FLOPs "
                                       "saved in results.json"),
}
OUT = pathlib.Path("runs/bench")
README_START, README_END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def machine() -> dict:
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
  return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              commit=commit, cpus=os.cpu_count(), load_average=os.getloadavg(),
              backend=jax.default_backend(), jax=jax.__version__, python=platform.python_version())


def goal_met(key: str, value: float) -> bool | None:
  op, goal, _ = GOALS[key]
  if goal is None:
    return None
  return value >= goal if op == ">=" else value <= goal


def markdown_table(results: dict) -> str:
  m = results["machine"]
  lines = [f"Measured {m['date']} at {m['commit']} on {m['cpus']} CPUs ({m['backend']}), load "
           f"average {m['load_average'][0]:.1f} at the start and "
           f"{results['load_average_end'][0]:.1f} at the end.", "",
           "| key | value | goal | met | reference (same run) |", "|---|---|---|---|---|"]
  for key, (op, goal, reference) in GOALS.items():
    if key not in results["ratios"]:
      continue
    value = results["ratios"][key]
    met = goal_met(key, value)
    lines.append(f"| `{key}` | {value:.2f} | {'' if goal is None else f'{op} {goal:g}'} | "
                 f"{'' if met is None else ('yes' if met else 'no')} | {reference} |")
  return "\n".join(lines) + "\n"


def rewrite_readme(readme: pathlib.Path, table: str) -> None:
  text = readme.read_text()
  if README_START not in text or README_END not in text:
    raise ValueError(f"{readme}: no {README_START} ... {README_END} block to rewrite")
  head, rest = text.split(README_START, 1)
  tail = rest.split(README_END, 1)[1]
  readme.write_text(f"{head}{README_START}\n{table}{README_END}{tail}")


def write(results: dict) -> str:
  """results.json and results.md as they stand (after every benchmark: a failed or killed run
  keeps what finished)."""
  results["load_average_end"] = os.getloadavg()
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / "results.json").write_text(json.dumps(results, indent=2))
  table = markdown_table(results)
  (OUT / "results.md").write_text(table)
  return table


def run(names: list[str]) -> dict:
  results = {"machine": machine(), "ratios": {}, "details": {}, "seconds": {}, "errors": {}}
  for name in names:
    start = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
      measured = BENCHMARKS[name]()
    except Exception as error:  # noqa: BLE001 - one broken benchmark must not lose the others
      results["errors"][name] = f"{type(error).__name__}: {error}"
      print(f"   FAILED: {results['errors'][name]}", flush=True)
      measured = {}
    for key, value in measured.items():
      target = results["ratios"] if key in GOALS else results["details"]
      target[key] = value
      if key in GOALS:
        print(f"   {key} = {value:.3f}", flush=True)
    results["seconds"][name] = time.perf_counter() - start
    write(results)
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmarks")
  parser.add_argument("--readme", action="store_true",
                      help="only rewrite README.md's table from runs/bench/results.json")
  args = parser.parse_args()
  if args.readme:
    results = json.loads((OUT / "results.json").read_text())
    rewrite_readme(pathlib.Path("README.md"), markdown_table(results))
    return
  unknown = set(args.only.split(",")) - set(BENCHMARKS)
  if unknown:
    raise ValueError(f"--only: unknown benchmarks {sorted(unknown)}; known {list(BENCHMARKS)}")
  results = run(args.only.split(","))
  with open(OUT / "history.jsonl", "a") as f:
    f.write(json.dumps(results) + "\n")
  print(write(results))
  if results["errors"]:
    raise SystemExit(f"benchmarks failed: {sorted(results['errors'])}")


if __name__ == "__main__":
  main()
