"""One SFT (LM) step at 32k tokens with context parallelism (ring attention over the mesh's
`sequence` axis): the per-device peak of the compiled step at sequence=8 against the same step
with the whole sequence on one device (XLA's memory analysis), then the step really run on the
8 devices: loss, wall time and the process's peak resident memory (all 8 devices together).

Run: XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
  .venv/bin/python benchmarks/long_context_sft.py [--length=32768] [--sequence=8]
"""
import argparse
import resource
import time

import jax
import numpy as np
import optax

from attention_memory import device_peak_bytes
from kimi_jax.model import ModelConfig
from kimi_jax.sharding.rules import make_mesh
from kimi_jax.training.state import init_train_state
from kimi_jax.training.steps import jit_step, lm_step

# The shape of experiments/rl_arith.py's tiny model, with the long-context stages' attention.
CONFIG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=192, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True,
                     attention="blockwise", attention_block_size=512, remat=True)


def packed_batch(length: int, seed: int = 0) -> dict:
  """One row of documents (1k-8k tokens each) packed end to end, as the corpus stage builds."""
  rng = np.random.default_rng(seed)
  lengths = []
  while sum(lengths) < length:
    lengths.append(int(rng.integers(1024, 8192)))
  lengths[-1] -= sum(lengths) - length
  tokens = rng.integers(0, CONFIG.vocab_size, length)
  return {"tokens": tokens[None], "targets": np.roll(tokens, -1)[None],
          "positions": np.concatenate([np.arange(n) for n in lengths])[None],
          "segment_ids": np.repeat(np.arange(len(lengths)), lengths)[None],
          "loss_mask": np.ones((1, length), np.float32)}


def sft_step(sequence: int):
  mesh = make_mesh(1, 1, 1, sequence=sequence, devices=jax.devices()[:sequence])
  state, shardings = init_train_state(CONFIG, optax.adamw(1e-3), mesh, jax.random.key(0))
  return state, jit_step(lm_step, mesh, shardings, config=CONFIG)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--length", type=int, default=32768)
  parser.add_argument("--sequence", type=int, default=8)
  args = parser.parse_args()
  batch = packed_batch(args.length)
  peaks = {}
  for sequence in (1, args.sequence):
    state, step = sft_step(sequence)
    peaks[sequence] = device_peak_bytes(step.lower(state, batch).compile().memory_analysis())
  print(f"SFT step, {args.length} tokens, {CONFIG.num_params} params: per-device peak "
        f"sequence=1 {peaks[1] / 2**20:.1f}MB, sequence={args.sequence} "
        f"{peaks[args.sequence] / 2**20:.1f}MB ({peaks[args.sequence] / peaks[1]:.2f}x)")
  state, step = sft_step(args.sequence)
  start = time.perf_counter()
  state, metrics = step(state, batch)
  loss = float(metrics["loss"])
  seconds = time.perf_counter() - start
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
  print(f"ran on {args.sequence} devices: loss {loss:.4f} (uniform guess "
        f"{np.log(CONFIG.vocab_size):.4f}), {seconds:.1f}s with compile, "
        f"process peak RSS {rss:.0f}MB")


if __name__ == "__main__":
  main()
