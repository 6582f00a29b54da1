"""Prefill work saved per RL iteration by prefix sharing: the k samples of a prompt are
prefilled once and copy its KV cache.

One iteration's rollout at rl_arith's default shape (32 prompts x k = 8 on its 2-layer model,
prompts of 16-48 tokens, 32 response tokens) runs through `collect_groups` on two engines,
with and without sharing, taking turns. Reported: prompt tokens run through the model, tokens
whose KV cache was copied instead, the prefill FLOPs that saves (2 x matmul parameters per
token, the attention scores left out) and the rollout time with / without sharing.
Run: .venv/bin/python benchmarks/prefix_sharing.py
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from kimi_jax.model import ModelConfig, init_params  # noqa: E402
from kimi_jax.rollout.engine import RolloutEngine, SamplingParams  # noqa: E402
from kimi_jax.rollout.partial import PartialRolloutBuffer, RolloutLimits, collect_groups  # noqa: E402
from kimi_jax.rollout.partial import new_groups  # noqa: E402
from train_step import interleaved_medians, matmul_params  # noqa: E402

CONFIG = ModelConfig(vocab_size=104, hidden_size=64, intermediate_size=192, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True)
RESPONSE_TOKENS = 32


class _Prompt:
  def __init__(self, i, rng):
    self.id, self.answer, self.domain, self.images = f"p{i}", "", "", ()
    self.question = rng.integers(3, CONFIG.vocab_size, rng.integers(16, 49)).tolist()


def _engine(params, share: bool) -> RolloutEngine:
  engine = RolloutEngine(CONFIG, params, max_batch=256, max_seq_len=48 + RESPONSE_TOKENS,
                         share_prefixes=share)
  engine.warm_up()
  return engine


def measure(num_prompts: int = 32, k: int = 8, reps: int = 3) -> dict:
  """prefill_tokens_shared_fraction and the FLOPs and time behind it."""
  rng = np.random.default_rng(0)
  params = init_params(CONFIG, jax.random.key(0))
  prompts = [_Prompt(i, rng) for i in range(num_prompts)]
  sampling = SamplingParams(temperature=1.0, ignore_eos=True)
  limits = RolloutLimits(RESPONSE_TOKENS, RESPONSE_TOKENS)
  engines = {"shared": _engine(params, True), "unshared": _engine(params, False)}

  def iteration(engine):  # the engine is the RL loop's in-process rollout backend
    groups = new_groups(prompts, lambda prompt: prompt.question, k, 0, 0)
    return collect_groups(engine, sampling, groups, PartialRolloutBuffer(), limits, 0, 0)

  before = {name: e.prefill_counts for name, e in engines.items()}
  seconds = interleaved_medians({name: (lambda e=e: iteration(e)) for name, e in engines.items()},
                                reps)
  counts = {name: {key: (e.prefill_counts[key] - before[name][key]) // (reps + 1)
                   for key in before[name]} for name, e in engines.items()}
  shared = counts["shared"]
  total = shared["prompt_tokens"] + shared["shared_tokens"]
  flops_saved = 2 * matmul_params(CONFIG) * shared["shared_tokens"]
  return {"prefill_tokens_shared_fraction": shared["shared_tokens"] / total,
          "prefix_sharing": dict(
              prompts=num_prompts, k=k, params=CONFIG.num_params, prefill_counts=counts,
              prefill_flops_saved_per_iteration=flops_saved,
              prefill_flops_unshared_per_iteration=2 * matmul_params(CONFIG) * total,
              rollout_s=seconds, rollout_shared_vs_unshared=seconds["shared"] / seconds["unshared"],
              reference="the same iteration (prompts, seeds) on an engine without sharing")}


def main():
  result = measure()
  r = result["prefix_sharing"]
  for name, c in r["prefill_counts"].items():
    print(f"{name:>9}: {c['programs']} prefill programs, {c['prompt_tokens']} prompt tokens run, "
          f"{c['shared_tokens']} copied; rollout {r['rollout_s'][name]:.3f} s")
  print(f"{r['prompts']} prompts x k={r['k']}: prefill FLOPs saved per iteration "
        f"{r['prefill_flops_saved_per_iteration'] / 1e6:.1f} MFLOP of "
        f"{r['prefill_flops_unshared_per_iteration'] / 1e6:.1f} "
        f"({result['prefill_tokens_shared_fraction']:.0%}); rollout time shared / unshared "
        f"{r['rollout_shared_vs_unshared']:.2f}")


if __name__ == "__main__":
  main()
