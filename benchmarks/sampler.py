"""Prompt sampler throughput and state size: 200k prompts, global batch 512.

Per strategy: batches/s of draw + update (the per-iteration host cost), the ratio against a
bare `numpy.random.Generator.choice` over the same weights measured in the same run, and the
JSON state size against the raw binary size of the table, for a mostly unvisited table and a
fully visited one.

  .venv/bin/python benchmarks/sampler.py
"""
import json
import time

import numpy as np

from kimi_jax.data.samplers import (Curriculum, GradualSchedule, Prioritized, PromptSampler,
                                    Uniform)
from kimi_jax.data.sources import Prompt

NUM_PROMPTS, BATCH, K = 200_000, 512, 8
REPEATS = 50


def per_second(fn, repeats: int = REPEATS) -> float:
  fn()  # warm-up
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return repeats / (time.perf_counter() - start)


def report_state(it, label: str) -> None:
  raw_bytes = it.table.success_P.nbytes + it.table.visits_P.nbytes
  encoded = json.dumps(it.get_state())
  restore = per_second(lambda: it.set_state(json.loads(encoded)), repeats=5)
  print(f"state ({label}): {len(encoded):,} bytes of JSON = {len(encoded) / raw_bytes:.2f}x "
        f"the raw float64+int64 table; json.loads + set_state {1e3 / restore:.1f} ms")


def main():
  prompts = [Prompt(question=f"q{i}", answer="0", id=f"p{i}", difficulty=1 + i % 4)
             for i in range(NUM_PROMPTS)]
  rng = np.random.default_rng(0)
  strategies = {"uniform": Uniform(), "prioritized": Prioritized(0.05),
                "curriculum+prioritized": Curriculum(GradualSchedule(1, 10), Prioritized(0.05))}

  weights_N = rng.random(NUM_PROMPTS) + 0.05
  bare = per_second(lambda: rng.choice(NUM_PROMPTS, BATCH, p=weights_N / weights_N.sum()))
  print(f"{NUM_PROMPTS} prompts, global batch {BATCH}, {K} samples per prompt")
  print(f"reference numpy choice: {bare:8.1f} batches/s")
  print(f"{'strategy':>24} {'batches/s':>10} {'prompts/s':>10} {'vs numpy':>9}")
  for name, strategy in strategies.items():
    it = iter(PromptSampler(prompts, strategy, BATCH, seed=0, process_index=0, process_count=1))

    def iteration():
      ids = [p.id for p in next(it) for _ in range(K)]
      it.update(ids, rng.integers(0, 2, len(ids)))

    rate = per_second(iteration)
    print(f"{name:>24} {rate:10.1f} {rate * BATCH:10.0f} {rate / bare:8.2f}x")

  report_state(it, "after the runs above")
  it.update([p.id for p in prompts], rng.random(NUM_PROMPTS))
  report_state(it, "every prompt visited")


if __name__ == "__main__":
  main()
