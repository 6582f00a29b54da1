"""Peak temporary memory of a forward+backward pass vs sequence length, per attention path.

Uses XLA's compiled memory analysis (deterministic, no need to run 16k-token attention on a
2-core CPU). Goal for the blockwise path: 16k/2k ratio near 8x (linear in length).
Run: .venv/bin/python benchmarks/attention_memory.py
"""
import dataclasses

import jax
import jax.numpy as jnp

from kimi_jax.model import ModelConfig, apply_lm, init_params

BASE = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=32, remat=True)
LENGTHS = (2048, 8192, 16384)
IMPLS = ("blockwise", "dot_product")


def peak_bytes(config: ModelConfig, length: int) -> int:
  params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
  loss = lambda p, t: apply_lm(config, p, t).mean()
  compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def measure(impls=IMPLS) -> dict:
  """attention_memory_16k_vs_2k (blockwise) and the temp bytes of each path and length."""
  peaks = {}
  for impl in impls:
    config = dataclasses.replace(BASE, attention=impl, attention_block_size=512)
    peaks[impl] = {n: peak_bytes(config, n) for n in LENGTHS}
  return {"attention_memory_16k_vs_2k": peaks["blockwise"][16384] / peaks["blockwise"][2048],
          "attention_memory": dict(
              temp_mib={impl: {str(n): b / 2**20 for n, b in p.items()} for impl, p in peaks.items()},
              reference="XLA temp bytes of jit(grad(loss)) at 2048 tokens, same model and path")}


def main():
  temp = measure()["attention_memory"]["temp_mib"]
  print(f"{'attention':<12}" + "".join(f"{n:>12}" for n in LENGTHS) + f"{'16k/2k':>10}")
  for impl, mib in temp.items():
    cells = "".join(f"{mib[str(n)]:>10.1f}MB" for n in LENGTHS)
    print(f"{impl:<12}{cells}{mib['16384'] / mib['2048']:>9.1f}x")


if __name__ == "__main__":
  main()
