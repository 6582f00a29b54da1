"""Train-step throughput of a ~20M-parameter LM: tokens/s, achieved FLOP/s, and the ratio to
a plain `jnp.dot` matmul's FLOP/s measured in the same run (the machine's attainable peak).
Run: .venv/bin/python benchmarks/train_step.py [--dtype=bfloat16]
     .venv/bin/python benchmarks/train_step.py --profile_dir=runs/profile/train  (trace + op table)
"""
import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import xla_profile

from kimi_jax.model import ModelConfig
from kimi_jax.sharding.rules import make_mesh
from kimi_jax.training.state import init_train_state
from kimi_jax.training.steps import jit_step, lm_step

CONFIG_20M = ModelConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=8,
                         num_heads=6, num_kv_heads=2, head_dim=64)
FLOPS_FORMULA = ("6 N T (N = parameters except the embedding lookup, T = tokens) "
                 "+ 6 L H Dh T S (causal attention scores and values, forward + backward, "
                 "counted as if every key were visible)")


def median_seconds(fn, reps: int) -> float:
  fn()  # compile + warm up
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def matmul_params(config: ModelConfig) -> int:
  """Parameters that take part in a matmul per token (all but the embedding lookup)."""
  return config.num_params - config.vocab_size * config.hidden_size


def step_flops(config: ModelConfig, batch: int, length: int) -> float:
  """FLOPS_FORMULA: 6 N per token for the matmuls plus attention scores and values."""
  tokens = batch * length
  attention = 6 * config.num_layers * config.num_heads * config.head_dim * length * tokens
  return 6 * matmul_params(config) * tokens + attention


def interleaved_medians(runners: dict, reps: int) -> dict:
  """Median seconds per call of each zero-argument runner, after one warm-up call each.

  The runners take turns every repetition, so load from other processes hits them alike.
  """
  for run in runners.values():
    jax.block_until_ready(run())
  seconds = {name: [] for name in runners}
  for _ in range(reps):
    for name, run in runners.items():
      start = time.perf_counter()
      jax.block_until_ready(run())
      seconds[name].append(time.perf_counter() - start)
  return {name: statistics.median(times) for name, times in seconds.items()}


def matmul(n: int, dtype):
  """(runner, FLOPs) of one jitted [n, n] x [n, n] `jnp.dot`: the in-run reference."""
  a = jnp.ones((n, n), dtype)
  dot = jax.jit(lambda x: jnp.dot(x, x))
  return lambda: dot(a), 2 * n**3


def matmul_flops_per_s(n: int, dtype, reps: int = 5) -> float:
  """FLOP/s of `matmul(n, dtype)` on its own."""
  run, flops = matmul(n, dtype)
  return flops / interleaved_medians({"dot": run}, reps)["dot"]


def train_step_runner(config: ModelConfig, batch: int, length: int):
  """A zero-argument runner of one sharded AdamW `lm_step` on random tokens."""
  mesh = make_mesh(data=1, fsdp=-1, tensor=1)
  state, shardings = init_train_state(config, optax.adamw(1e-4), mesh, jax.random.key(0))
  step = jit_step(lm_step, mesh, shardings, config=config)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, length))
  data = {"tokens": tokens, "targets": np.roll(tokens, -1, 1),
          "loss_mask": np.ones(tokens.shape, np.float32)}
  holder = [state]

  def run():
    holder[0], metrics = step(holder[0], data)
    return metrics["loss"]

  return run


def train_step_seconds(config: ModelConfig, batch: int, length: int, reps: int) -> float:
  """Median wall time of one train step (compile excluded)."""
  run = train_step_runner(config, batch, length)
  return interleaved_medians({"step": run}, reps)["step"]


def measure(batch: int = 8, length: int = 256, dtype: str = "float32", reps: int = 5) -> dict:
  """`train_step_vs_matmul` and the numbers behind it."""
  config = dataclasses.replace(CONFIG_20M, dtype=dtype)
  dot, dot_flops = matmul(2048, jnp.dtype(dtype))
  medians = interleaved_medians({"step": train_step_runner(config, batch, length), "dot": dot},
                                reps)
  seconds, flops, peak = medians["step"], step_flops(config, batch, length), dot_flops / medians["dot"]
  return {"train_step_vs_matmul": flops / seconds / peak,
          "train_step": dict(params=config.num_params, batch=batch, length=length, dtype=dtype,
                             devices=jax.device_count(), step_ms=seconds * 1e3,
                             tokens_per_s=batch * length / seconds,
                             step_gflops_per_s=flops / seconds / 1e9,
                             matmul_gflops_per_s=peak / 1e9, flops=FLOPS_FORMULA,
                             reference="jnp.dot of two 2048x2048 matrices, same dtype, timed in turns with the step")}


def profile(profile_dir: str, batch: int, length: int, dtype: str) -> None:
  """Trace three train steps and print where the step program spends its time."""
  xla_profile.dump_hlo(profile_dir, "jit_lm_step")
  run = train_step_runner(dataclasses.replace(CONFIG_20M, dtype=dtype), batch, length)
  jax.block_until_ready(run())  # compile
  with xla_profile.trace(profile_dir):
    for _ in range(3):
      jax.block_until_ready(run())
  print(f"trace in {profile_dir} (TensorBoard: the .xplane.pb; Perfetto: perfetto_trace.json.gz)")
  xla_profile.print_table(f"train step, batch {batch}x{length}",
                          xla_profile.op_table(profile_dir, "jit_lm_step", per=3, top=25))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--profile_dir", default=None,
                      help="instead of the benchmark: a jax.profiler trace of the step here")
  args = parser.parse_args()
  if args.profile_dir:
    profile(args.profile_dir, args.batch, args.length, args.dtype)
    return
  result = measure(args.batch, args.length, args.dtype, args.reps)
  r = result["train_step"]
  print(f"params {r['params'] / 1e6:.1f}M  batch {r['batch']}x{r['length']}  "
        f"devices {r['devices']}  dtype {r['dtype']}")
  print(f"step {r['step_ms']:.1f} ms  tokens/s {r['tokens_per_s']:,.0f}  "
        f"achieved {r['step_gflops_per_s']:.1f} GFLOP/s ({FLOPS_FORMULA})")
  print(f"jnp.dot {r['matmul_gflops_per_s']:.1f} GFLOP/s  ->  train step / matmul ratio "
        f"{result['train_step_vs_matmul']:.2f}")


if __name__ == "__main__":
  main()
