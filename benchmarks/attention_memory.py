"""Peak memory of a forward+backward pass vs sequence length, per attention path, and per
device under context parallelism (ring attention over the mesh's `sequence` axis).

Uses XLA's compiled memory analysis (deterministic, no need to run 16k-token attention on a
2-core CPU). Goals: for the blockwise path a 16k/2k ratio near 8x (linear in length); with
sequence=4 a per-device peak <= 0.3x of the same pass on one device.
Run: XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  .venv/bin/python benchmarks/attention_memory.py
"""
import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from kimi_jax.model import ModelConfig, apply_lm, init_params
from kimi_jax.sharding.rules import activation_mesh, logical_to_spec, make_mesh

BASE = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=32, remat=True)
LENGTHS = (2048, 8192, 16384)
IMPLS = ("blockwise", "dot_product")
RING = 4


def memory_stats(config: ModelConfig, length: int, sequence: int = 1):
  """Compiled memory analysis of grad(mean logits) on a (sequence,)-device mesh, per device."""
  mesh = make_mesh(1, 1, 1, sequence=sequence, devices=jax.devices()[:sequence])
  params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32,
                                sharding=NamedSharding(mesh, logical_to_spec(("batch", "length"))))

  def loss(p, t):
    with activation_mesh(mesh):
      return apply_lm(config, p, t).mean()

  return jax.jit(jax.grad(loss)).lower(params, tokens).compile().memory_analysis()


def device_peak_bytes(stats) -> int:
  """Everything live on one device: arguments, outputs and temporaries."""
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
          + stats.temp_size_in_bytes)


def measure(impls=IMPLS) -> dict:
  """attention_memory_16k_vs_2k (blockwise) and the temp bytes of each path and length."""
  peaks = {}
  for impl in impls:
    config = dataclasses.replace(BASE, attention=impl, attention_block_size=512)
    peaks[impl] = {n: memory_stats(config, n).temp_size_in_bytes for n in LENGTHS}
  return {"attention_memory_16k_vs_2k": peaks["blockwise"][16384] / peaks["blockwise"][2048],
          "attention_memory": dict(
              temp_mib={impl: {str(n): b / 2**20 for n, b in p.items()} for impl, p in peaks.items()},
              reference="XLA temp bytes of jit(grad(loss)) at 2048 tokens, same model and path")}


def main():
  print("temporary memory of one device, whole sequence on it")
  print(f"{'attention':<12}" + "".join(f"{n:>12}" for n in LENGTHS) + f"{'16k/2k':>10}")
  for impl, mib in measure()["attention_memory"]["temp_mib"].items():
    cells = "".join(f"{mib[str(n)]:>10.1f}MB" for n in LENGTHS)
    print(f"{impl:<12}{cells}{mib['16384'] / mib['2048']:>9.1f}x")

  print(f"\nper-device peak (arguments + outputs + temporaries), sequence={RING} (ring) vs 1")
  print(f"{'length':<12}{'sequence=1':>14}{f'sequence={RING}':>14}{'ratio':>8}")
  config = dataclasses.replace(BASE, attention="blockwise", attention_block_size=512)
  for n in LENGTHS:
    one, ring = (device_peak_bytes(memory_stats(config, n, s)) for s in (1, RING))
    print(f"{n:<12}{one / 2**20:>12.1f}MB{ring / 2**20:>12.1f}MB{ring / one:>7.2f}x")


if __name__ == "__main__":
  main()
