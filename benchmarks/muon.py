"""Update time of our Muon vs optax.contrib.muon and optax.adamw, measured in one run.

A ~60M-parameter tree in the model's layout (8 layers, D=512, F=1536, V=32000, untied).
Each optimizer's jitted `update` is timed with block_until_ready; the optimizers take turns
every repetition so machine noise hits them alike; medians are compared.

  .venv/bin/python benchmarks/muon.py [--reps 5]
"""
import argparse
import statistics
import time

import jax
import numpy as np
import optax

from kimi_jax.model import ModelConfig, init_params
from kimi_jax.optimizers.muon import muon
from kimi_jax.optimizers.routing import route_by_path

CONFIG = ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=8,
                     num_heads=8, num_kv_heads=8, head_dim=64)
LEARNING_RATE, WEIGHT_DECAY = 1e-3, 0.1


def optimizers(params) -> dict:
  """Equivalent configurations: Nesterov, Moonlight scaling, shared lr and weight decay."""
  return {
      "ours": muon(LEARNING_RATE, WEIGHT_DECAY),
      "optax.contrib.muon": optax.contrib.muon(
          LEARNING_RATE, weight_decay=WEIGHT_DECAY, adam_weight_decay=WEIGHT_DECAY,
          adam_b2=0.95, consistent_rms=0.2,
          muon_weight_dimension_numbers=route_by_path(params)),
      "optax.adamw": optax.adamw(LEARNING_RATE, b2=0.95, weight_decay=WEIGHT_DECAY),
  }


def time_updates(txs: dict, params, grads, reps: int) -> dict:
  """Median seconds per jitted update, after one warm-up (compile) call each."""
  runners = {}
  for name, tx in txs.items():
    update, state = jax.jit(tx.update), tx.init(params)
    jax.block_until_ready(update(grads, state, params))
    runners[name] = (update, state)
  seconds = {name: [] for name in txs}
  for _ in range(reps):
    for name, (update, state) in runners.items():
      start = time.perf_counter()
      jax.block_until_ready(update(grads, state, params))
      seconds[name].append(time.perf_counter() - start)
  return {name: statistics.median(times) for name, times in seconds.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args()
  params = init_params(CONFIG, jax.random.key(0))
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype), params)
  num_params = sum(p.size for p in jax.tree.leaves(params))
  print(f"{num_params / 1e6:.1f}M parameters, backend {jax.default_backend()}, "
        f"{args.reps} reps")
  medians = time_updates(optimizers(params), params, grads, args.reps)
  for name, seconds in medians.items():
    print(f"{name:>20}: {seconds * 1e3:9.1f} ms")
  print(f"ours / optax.contrib.muon = {medians['ours'] / medians['optax.contrib.muon']:.3f}x")
  print(f"ours / optax.adamw        = {medians['ours'] / medians['optax.adamw']:.1f}x")


if __name__ == "__main__":
  main()
