"""One prepared accelerator check: train-step MFU and decode throughput on the local devices.

Times the sharded `lm_step` (AdamW, bf16 activations) of a ~1B-parameter Qwen2-shaped model
and greedy decoding with `RolloutEngine`, and reports model FLOP utilisation against the
device's dense bf16 peak (a table by device kind) and against a large `jnp.dot` measured in the
same run. Writes the numbers as JSON to $OUT/gpu_check.json when $OUT is set.
Run: .venv/bin/python benchmarks/gpu_check.py            (accelerator, ~3-5 min with compiles)
     .venv/bin/python benchmarks/gpu_check.py --size=tiny  (CPU, seconds: checks the script)
"""
import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from kimi_jax.model import ModelConfig, init_params
from kimi_jax.rollout.engine import RolloutEngine
from kimi_jax.rollout.types import SamplingParams
from train_step import matmul_flops_per_s, median_seconds, step_flops, train_step_seconds

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets (no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
             "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
             "TPU v6 lite": 918e12}

SIZES = {
    # ~1.1B parameters: hidden 2048, 16 layers, GQA 16/8 heads of 128, SwiGLU 5632, vocab 32k.
    "1b": dict(model=ModelConfig(vocab_size=32768, hidden_size=2048, intermediate_size=5632,
                                 num_layers=16, num_heads=16, num_kv_heads=8, head_dim=128,
                                 dtype="bfloat16", attention="blockwise",
                                 attention_block_size=512, remat=True),
               batch=16, length=2048, decode_batch=64, prompt_len=128, new_tokens=256),
    "tiny": dict(model=ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                   dtype="bfloat16"),
                 batch=4, length=64, decode_batch=4, prompt_len=8, new_tokens=16),
}


def device_peak(kind: str) -> float | None:
  for name, peak in PEAK_BF16.items():
    if name.lower() in kind.lower():
      return peak
  return None


def time_decode(config: ModelConfig, batch: int, prompt_len: int, new_tokens: int) -> float:
  engine = RolloutEngine(config, init_params(config, jax.random.key(1)), max_batch=batch,
                         max_seq_len=prompt_len + new_tokens)
  prompts = np.random.default_rng(1).integers(0, config.vocab_size, (batch, prompt_len)).tolist()
  greedy = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
  return median_seconds(lambda: engine.generate(prompts, greedy), reps=3)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", choices=sorted(SIZES), default="1b")
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args()
  size = SIZES[args.size]
  config = size["model"]
  kind = jax.devices()[0].device_kind
  peak = device_peak(kind)
  print(f"devices: {jax.device_count()} x {kind}; model {config.num_params / 1e6:,.1f}M params")

  step_s = train_step_seconds(config, size["batch"], size["length"], args.reps)
  flops = step_flops(config, size["batch"], size["length"])
  achieved = flops / step_s
  dot = matmul_flops_per_s(8192 if args.size == "1b" else 512, jnp.bfloat16)
  report = {"device_kind": kind, "devices": jax.device_count(), "params": config.num_params,
            "train_step_s": step_s,
            "train_tokens_per_s": size["batch"] * size["length"] / step_s,
            "train_tflops_per_s": achieved / 1e12, "matmul_tflops_per_s": dot / 1e12,
            "train_vs_matmul": achieved / dot}
  if peak:
    report["train_mfu"] = achieved / (peak * jax.device_count())
  print(f"train step {step_s * 1e3:.1f} ms, {report['train_tokens_per_s']:,.0f} tokens/s, "
        f"{achieved / 1e12:.1f} TFLOP/s = {report['train_vs_matmul']:.2f} x jnp.dot"
        + (f", MFU {report['train_mfu']:.1%}" if peak else ", MFU n/a (unknown device peak)"))

  decode_s = time_decode(dataclasses.replace(config, remat=False), size["decode_batch"],
                         size["prompt_len"], size["new_tokens"])
  decode_tokens = size["decode_batch"] * size["new_tokens"]
  report.update(decode_s=decode_s, decode_tokens_per_s=decode_tokens / decode_s)
  # Decode is bandwidth-bound: 2 N FLOPs per token, the weights read once per step.
  if peak:
    report["decode_mfu"] = 2 * config.num_params * decode_tokens / decode_s / peak
  print(f"decode {size['decode_batch']} x {size['new_tokens']} tokens in {decode_s:.2f} s, "
        f"{report['decode_tokens_per_s']:,.0f} tokens/s"
        + (f", MFU {report['decode_mfu']:.2%}" if peak else ""))
  if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
