"""Decode throughput of RolloutEngine vs transformers `generate`, and continuous vs static batching.

Both samplers run the same tiny random Qwen2 weights (ours exported with save_hf, read back by
transformers), the same prompts, batch and lengths, in one process, so the ratio is robust to
machine noise. Run: .venv/bin/python benchmarks/decode.py
"""
import os
import tempfile

from absl import app, flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from kimi_jax.checkpointing.hf import save_hf  # noqa: E402
from kimi_jax.model import ModelConfig, init_params  # noqa: E402
from kimi_jax.rollout.engine import RolloutEngine, SamplingParams  # noqa: E402
from train_step import median_seconds  # noqa: E402

BATCH = flags.DEFINE_integer("batch", 32, "sequences decoded together")
PROMPT_LEN = flags.DEFINE_integer("prompt_len", 16, "prompt tokens")
NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "tokens generated per sequence")
REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per sampler (median reported)")
MIX_REQUESTS = flags.DEFINE_integer("mix_requests", 128, "requests in the heavy-tailed mix")
MIX_BATCH = flags.DEFINE_integer("mix_batch", 16, "rows for the heavy-tailed mix")

CONFIG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, eos_token_id=2)


def throughput(engine, hf_model, prompts_BxT, new_tokens: int, repeats: int, sample: bool):
  """Tokens/s of both samplers, exactly `new_tokens` per row (eos ignored).

  Greedy (sample=False) also reports how many rows agree token for token; sampling uses
  temperature 1 with top-p 0.9 on both sides.
  """
  sampling = SamplingParams(temperature=1.0 if sample else 0.0, top_p=0.9 if sample else 1.0,
                            max_new_tokens=new_tokens, ignore_eos=True)
  ours = engine.generate(prompts_BxT.tolist(), sampling)
  inputs = torch.as_tensor(prompts_BxT)
  hf_sampling = dict(do_sample=True, temperature=1.0, top_p=0.9, top_k=0) if sample else dict(
      do_sample=False)

  def hf_generate():
    with torch.no_grad():
      return hf_model.generate(inputs, attention_mask=torch.ones_like(inputs),
                               max_new_tokens=new_tokens, pad_token_id=0, **hf_sampling)

  reference = hf_generate()[:, prompts_BxT.shape[1]:].numpy()
  agree = None if sample else np.mean([c.output_ids == r.tolist() for c, r in zip(ours, reference)])
  tokens = prompts_BxT.shape[0] * new_tokens
  ours_s = median_seconds(lambda: engine.generate(prompts_BxT.tolist(), sampling), repeats)
  hf_s = median_seconds(hf_generate, repeats)
  return tokens / ours_s, tokens / hf_s, agree


def heavy_tailed_lengths(count: int, rng) -> list[int]:
  """Pareto-like response lengths: most short, a few up to 40x longer."""
  return np.clip((8 * (1 + rng.pareto(1.2, count))).astype(int), 8, 320).tolist()


def batching_walltimes(engine, prompts, lengths, batch: int):
  sampling = [SamplingParams(temperature=1.0, max_new_tokens=n, ignore_eos=True, seed=i)
              for i, n in enumerate(lengths)]
  continuous = lambda: engine.generate(prompts, sampling)

  def static():  # one batch at a time: each waits for its longest member
    for start in range(0, len(prompts), batch):
      engine.generate(prompts[start:start + batch], sampling[start:start + batch])

  return median_seconds(continuous, 1), median_seconds(static, 1)


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  params = init_params(CONFIG, jax.random.key(0))
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 10.0  # non-flat distributions
  with tempfile.TemporaryDirectory() as path:
    save_hf(path, CONFIG, params)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
  hf_model.generation_config.eos_token_id = None  # like ignore_eos (min_new_tokens would mask eos)
  max_seq_len = PROMPT_LEN.value + NEW_TOKENS.value
  engine = RolloutEngine(CONFIG, params, max_batch=BATCH.value, max_seq_len=max_seq_len,
                         eos_token_ids=(2,))
  prompts_BxT = rng.integers(3, CONFIG.vocab_size, (BATCH.value, PROMPT_LEN.value))
  print(f"model: {CONFIG.num_params:,} params; batch {BATCH.value}, prompt {PROMPT_LEN.value}, "
        f"{NEW_TOKENS.value} new tokens; torch threads {torch.get_num_threads()}")
  for sample in (False, True):
    ours_tps, hf_tps, agree = throughput(engine, hf_model, prompts_BxT, NEW_TOKENS.value,
                                         REPEATS.value, sample)
    print(f"{'sampling T=1 top-p 0.9' if sample else 'greedy'}:")
    print(f"  RolloutEngine          {ours_tps:12,.0f} tokens/s")
    print(f"  transformers generate  {hf_tps:12,.0f} tokens/s")
    print(f"  ratio                  {ours_tps / hf_tps:12.1f}x" +
          ("" if agree is None else f"   (outputs identical for {agree:.0%} of rows)"))

  lengths = heavy_tailed_lengths(MIX_REQUESTS.value, rng)
  prompts = [rng.integers(3, CONFIG.vocab_size, rng.integers(4, 17)).tolist() for _ in lengths]
  mix_engine = RolloutEngine(CONFIG, params, max_batch=MIX_BATCH.value,
                             max_seq_len=16 + max(lengths), eos_token_ids=(2,))
  continuous_s, static_s = batching_walltimes(mix_engine, prompts, lengths, MIX_BATCH.value)
  print(f"heavy-tailed mix: {len(lengths)} requests, {sum(lengths):,} tokens, lengths "
        f"median {int(np.median(lengths))} max {max(lengths)}, batch {MIX_BATCH.value}")
  print(f"  continuous batching    {continuous_s:8.2f} s")
  print(f"  static batching        {static_s:8.2f} s")
  print(f"  speed-up               {static_s / continuous_s:8.2f}x")


if __name__ == "__main__":
  app.run(main)
