"""Train-step throughput of a ~20M-parameter LM: tokens/s, achieved FLOP/s, and the ratio to
a plain `jnp.dot` matmul's FLOP/s measured in the same run (the machine's attainable peak).
Run: .venv/bin/python benchmarks/train_step.py [--dtype=bfloat16]
"""
import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kimi_jax.model import ModelConfig
from kimi_jax.sharding.rules import make_mesh
from kimi_jax.training.state import init_train_state
from kimi_jax.training.steps import jit_step, lm_step

CONFIG_20M = ModelConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=8,
                         num_heads=6, num_kv_heads=2, head_dim=64)


def median_seconds(fn, reps: int) -> float:
  fn()  # compile + warm up
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def step_flops(config: ModelConfig, batch: int, length: int) -> float:
  """6 N per token for the matmuls (forward + backward) plus causal attention scores."""
  tokens = batch * length
  matmul_params = config.num_params - config.vocab_size * config.hidden_size  # lookup is free
  attention = 6 * config.num_layers * config.num_heads * config.head_dim * length * tokens
  return 6 * matmul_params * tokens + attention


def matmul_flops_per_s(n: int, dtype) -> float:
  a = jnp.ones((n, n), dtype)
  dot = jax.jit(lambda x: jnp.dot(x, x))
  return 2 * n**3 / median_seconds(lambda: dot(a).block_until_ready(), reps=5)


def train_step_seconds(config: ModelConfig, batch: int, length: int, reps: int) -> float:
  """Median wall time of one sharded AdamW `lm_step` on random tokens (compile excluded)."""
  mesh = make_mesh(data=1, fsdp=-1, tensor=1)
  state, shardings = init_train_state(config, optax.adamw(1e-4), mesh, jax.random.key(0))
  step = jit_step(lm_step, mesh, shardings, config=config)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, length))
  data = {"tokens": tokens, "targets": np.roll(tokens, -1, 1),
          "loss_mask": np.ones(tokens.shape, np.float32)}
  holder = [state]

  def run():
    holder[0], metrics = step(holder[0], data)
    metrics["loss"].block_until_ready()

  return median_seconds(run, reps)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args()

  config = dataclasses.replace(CONFIG_20M, dtype=args.dtype)
  seconds = train_step_seconds(config, args.batch, args.length, args.reps)
  flops = step_flops(config, args.batch, args.length)
  peak = matmul_flops_per_s(2048, jnp.dtype(args.dtype))
  print(f"params {config.num_params / 1e6:.1f}M  batch {args.batch}x{args.length}  "
        f"devices {jax.device_count()} ({jax.devices()[0].platform})  dtype {args.dtype}")
  print(f"step {seconds * 1e3:.1f} ms  tokens/s {args.batch * args.length / seconds:,.0f}  "
        f"achieved {flops / seconds / 1e9:.1f} GFLOP/s")
  print(f"jnp.dot {peak / 1e9:.1f} GFLOP/s  ->  train step / matmul ratio {flops / seconds / peak:.2f}")


if __name__ == "__main__":
  main()
