"""Muon on a ~60M-parameter tree: Newton-Schulz efficiency against an in-run matmul, and the
update time of our Muon vs optax.contrib.muon and optax.adamw, measured in one run.

The tree has the model's layout (8 layers, D=512, F=1536, V=32000, untied). Newton-Schulz
FLOPs are counted per matrix: with m x n the matrix (m <= n, the side the Gram matrix uses),
each iteration costs 4 m^2 n + 2 m^3 (X X^T, A^2, (bA + cA^2) X). `muon_ns_vs_matmul` is that
count over the time of `orthogonalize_tree` on every Muon-routed leaf, divided by the FLOP/s
of a 2048x2048 float32 `jnp.dot`. Jitted functions are timed with block_until_ready; the
optimizers take turns every repetition so machine noise hits them alike; medians are compared.

  .venv/bin/python benchmarks/muon.py [--reps 5]
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kimi_jax.model import ModelConfig, init_params
from kimi_jax.optimizers.muon import DEFAULT_NS_COEFFS, fan_in_out, muon, orthogonalize_tree
from kimi_jax.optimizers.routing import leaf_routing, route_by_path
from train_step import interleaved_medians, matmul

CONFIG = ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=8,
                     num_heads=8, num_kv_heads=8, head_dim=64)
LEARNING_RATE, WEIGHT_DECAY = 1e-3, 0.1
NS_STEPS = 5


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
  """Median seconds per jitted update of each optimizer."""
  runners = {}
  for name, tx in txs.items():
    update, state = jax.jit(tx.update), tx.init(params)
    runners[name] = lambda update=update, state=state: update(grads, state, params)
  return interleaved_medians(runners, reps)


def ns_flops(shape, dims, steps: int = NS_STEPS) -> int:
  """Newton-Schulz FLOPs of one leaf: per matrix and iteration 4 m^2 n + 2 m^3, m <= n."""
  fan_in, fan_out = fan_in_out(shape, dims)
  m, n = sorted((fan_in, fan_out))
  matrices = int(np.prod(shape)) // (fan_in * fan_out)
  return matrices * steps * (4 * m * m * n + 2 * m ** 3)


def muon_leaves(params) -> tuple[dict, dict]:
  """The Muon-routed leaves of `params` (a flat {name: array}) and their routing."""
  routing = leaf_routing(params, route_by_path)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  leaves = {jax.tree_util.keystr(p): x for p, x in flat if routing[p] is not None}
  dims = {jax.tree_util.keystr(p): routing[p] for p, _ in flat if routing[p] is not None}
  return leaves, dims


def measure(reps: int = 5) -> dict:
  """muon_ns_vs_matmul plus our update time against optax's Muon and AdamW."""
  params = init_params(CONFIG, jax.random.key(0))
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype), params)
  leaves, dims = muon_leaves(grads)
  routing = {(jax.tree_util.DictKey(k),): d for k, d in dims.items()}
  ns = jax.jit(lambda tree: orthogonalize_tree(tree, routing, NS_STEPS, DEFAULT_NS_COEFFS))
  flops = sum(ns_flops(x.shape, dims[k]) for k, x in leaves.items())
  dot, dot_flops = matmul(2048, jnp.float32)
  timed = interleaved_medians({"ns": lambda: ns(leaves), "dot": dot}, reps)
  ns_s, peak = timed["ns"], dot_flops / timed["dot"]
  medians = time_updates(optimizers(params), params, grads, max(1, reps - 2))
  return {"muon_ns_vs_matmul": flops / ns_s / peak,
          "muon": dict(params=sum(p.size for p in jax.tree.leaves(params)),
                       muon_matrices=len(leaves), ns_steps=NS_STEPS, ns_gflop=flops / 1e9,
                       ns_ms=ns_s * 1e3, ns_gflops_per_s=flops / ns_s / 1e9,
                       matmul_gflops_per_s=peak / 1e9,
                       update_ms={k: v * 1e3 for k, v in medians.items()},
                       ours_vs_optax_muon=medians["ours"] / medians["optax.contrib.muon"],
                       reference="Newton-Schulz of every Muon matrix (orthogonalize_tree, "
                                 "jitted) vs a 2048x2048 float32 jnp.dot timed in turns; update "
                                 "times vs "
                                 "optax.contrib.muon on the same tree")}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args()
  result = measure(args.reps)
  r = result["muon"]
  print(f"{r['params'] / 1e6:.1f}M parameters ({r['muon_matrices']} Muon leaves), backend "
        f"{jax.default_backend()}, {args.reps} reps")
  print(f"Newton-Schulz: {r['ns_gflop']:.1f} GFLOP in {r['ns_ms']:.0f} ms = "
        f"{r['ns_gflops_per_s']:.1f} GFLOP/s; jnp.dot {r['matmul_gflops_per_s']:.1f} GFLOP/s; "
        f"ratio {result['muon_ns_vs_matmul']:.2f}")
  for name, ms in r["update_ms"].items():
    print(f"{name:>20}: {ms:9.1f} ms")
  print(f"ours / optax.contrib.muon = {r['ours_vs_optax_muon']:.3f}x")


if __name__ == "__main__":
  main()
