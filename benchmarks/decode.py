"""Decode throughput of RolloutEngine vs transformers `generate` and vs the machine's roofline,
and continuous vs static batching.

Both samplers run the same random Qwen2 weights (ours exported with save_hf, read back by
transformers), the same prompts, batch and lengths, in one process, so the ratio is robust to
machine noise. Two sizes: an 86k-parameter model (dispatch-bound: per-token overhead decides)
and a ~19M-parameter one (compute-bound), whose tokens/s is also compared with the roofline
`matmul FLOP/s / (2 x matmul parameters)` of an in-run `jnp.dot`.
Run: .venv/bin/python benchmarks/decode.py
     .venv/bin/python benchmarks/decode.py --profile_dir=runs/profile/decode  (trace + op table)
"""
import dataclasses
import os
import tempfile

from absl import app, flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# torch's OpenMP workers otherwise spin while waiting: on a loaded 2-core machine that made
# `generate` up to 200x slower (measured), which would flatter the engine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from kimi_jax.checkpointing.hf import save_hf  # noqa: E402
from kimi_jax.model import ModelConfig, init_params  # noqa: E402
from kimi_jax.rollout.engine import RolloutEngine, SamplingParams  # noqa: E402
import xla_profile  # noqa: E402
from train_step import (CONFIG_20M, interleaved_medians, matmul, matmul_params,  # noqa: E402
                        median_seconds)

REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per sampler (median reported)")
MIX_REQUESTS = flags.DEFINE_integer("mix_requests", 128, "requests in the heavy-tailed mix")
MIX_BATCH = flags.DEFINE_integer("mix_batch", 16, "rows for the heavy-tailed mix")
PROFILE_DIR = flags.DEFINE_string("profile_dir", None, "instead of the benchmark: a jax.profiler "
                                  "trace of one 20M generate (greedy) in this directory, and the "
                                  "top ops of its decode and prefill programs")

TINY = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, eos_token_id=2)
QWEN2_20M = dataclasses.replace(CONFIG_20M, qkv_bias=True, eos_token_id=2)
# (config, batch, prompt tokens, new tokens) of each comparison.
SIZES = {"tiny": (TINY, 32, 16, 64), "20m": (QWEN2_20M, 64, 128, 128)}


def random_model(config: ModelConfig):
  """Our params and the same weights in transformers (lm_head x10: non-flat distributions)."""
  params = init_params(config, jax.random.key(0))
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 10.0
  with tempfile.TemporaryDirectory() as path:
    save_hf(path, config, params)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
  hf_model.generation_config.eos_token_id = None  # like ignore_eos (min_new_tokens would mask eos)
  return params, hf_model


def throughput(engine, hf_model, prompts_BxT, new_tokens: int, repeats: int, sample: bool,
               extra=None):
  """Tokens/s of both samplers, exactly `new_tokens` per row (eos ignored), and the median
  seconds of the zero-argument runners in `extra` (a dict), timed in turns with them.

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
  runners = {"ours": lambda: engine.generate(prompts_BxT.tolist(), sampling), "hf": hf_generate}
  medians = interleaved_medians(runners | (extra or {}), repeats)
  return (tokens / medians["ours"], tokens / medians["hf"], agree,
          {name: medians[name] for name in extra or {}})


def compare(size: str, repeats: int, samplings=(False, True), dot=None) -> dict:
  """Engine vs transformers tokens/s at one size, greedy and/or sampling. With `dot`, the
  seconds of `dot` and of a greedy generate of one token per row (prefill + one step), timed
  in turns with the greedy runs, under "dot_s" and "first_token_s"."""
  config, batch, prompt_len, new_tokens = SIZES[size]
  params, hf_model = random_model(config)
  engine = RolloutEngine(config, params, max_batch=batch, max_seq_len=prompt_len + new_tokens,
                         eos_token_ids=(2,))
  prompts_BxT = np.random.default_rng(0).integers(3, config.vocab_size, (batch, prompt_len))
  result = dict(params=config.num_params, batch=batch, prompt_tokens=prompt_len,
                new_tokens=new_tokens, torch_threads=torch.get_num_threads())
  first_token = SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True)
  extra = dict(dot=dot, first_token=lambda: engine.generate(prompts_BxT.tolist(), first_token))
  for sample in samplings:
    ours, hf, agree, seconds = throughput(engine, hf_model, prompts_BxT, new_tokens, repeats,
                                          sample, None if sample or dot is None else extra)
    mode = "sampling" if sample else "greedy"
    result[mode] = dict(engine_tokens_per_s=ours, hf_tokens_per_s=hf, ratio=ours / hf)
    result |= {f"{name}_s": s for name, s in seconds.items()}
    if agree is not None:
      result[mode]["identical_rows"] = agree
  return result


def measure(repeats: int = 3) -> dict:
  """decode_vs_hf_tiny, decode_vs_hf_20m, decode_vs_roofline (greedy, 20M model, prefill time
  included) and decode_step_vs_roofline (its decode steps alone)."""
  tiny = compare("tiny", repeats)
  dot, dot_flops = matmul(2048, jnp.float32)
  big = compare("20m", max(1, repeats - 1), samplings=(False,), dot=dot)
  peak = dot_flops / big.pop("dot_s")
  flops_per_token = 2 * matmul_params(QWEN2_20M)
  roofline = peak / flops_per_token
  # Decode steps alone: the time past the first token of every row (prefill + one step).
  full_s = big["batch"] * big["new_tokens"] / big["greedy"]["engine_tokens_per_s"]
  big["decode_step_ms"] = (full_s - big["first_token_s"]) / (big["new_tokens"] - 1) * 1e3
  return {
      "decode_vs_hf_tiny": tiny["greedy"]["ratio"],
      "decode_vs_hf_20m": big["greedy"]["ratio"],
      "decode_vs_roofline": big["greedy"]["engine_tokens_per_s"] / roofline,
      "decode_step_vs_roofline": big["batch"] / (big["decode_step_ms"] / 1e3) / roofline,
      "decode": dict(tiny=tiny, qwen2_20m=big, matmul_gflops_per_s=peak / 1e9,
                     roofline_tokens_per_s=roofline, flops_per_token=flops_per_token,
                     reference="transformers generate on the same weights and prompts (hf); "
                               "2 x matmul parameters per token at the FLOP/s of a 2048x2048 "
                               "float32 jnp.dot timed in turns with the 20M runs (roofline)")}


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


def profile(profile_dir: str) -> None:
  """Trace one greedy generate at the 20M size and print where its programs spend their time."""
  xla_profile.dump_hlo(profile_dir, "jit_(decode|prefill)")
  config, batch, prompt_len, new_tokens = SIZES["20m"]
  engine = RolloutEngine(config, init_params(config, jax.random.key(0)), max_batch=batch,
                         max_seq_len=prompt_len + new_tokens)
  prompts = np.random.default_rng(0).integers(3, config.vocab_size, (batch, prompt_len)).tolist()
  sampling = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
  engine.generate(prompts, sampling)  # compile
  steps, programs = engine.num_decode_steps, engine.prefill_counts["programs"]
  with xla_profile.trace(profile_dir):
    engine.generate(prompts, sampling)
  steps, programs = engine.num_decode_steps - steps, engine.prefill_counts["programs"] - programs
  print(f"trace in {profile_dir} (TensorBoard: the .xplane.pb; Perfetto: perfetto_trace.json.gz)")
  xla_profile.print_table(f"decode, per step of batch {batch}",
                          xla_profile.op_table(profile_dir, "jit_decode", per=steps))
  xla_profile.print_table(f"prefill, per program ({prompt_len}-token bucket)",
                          xla_profile.op_table(profile_dir, "jit_prefill", per=programs))


def main(argv):
  del argv
  if PROFILE_DIR.value:
    profile(PROFILE_DIR.value)
    return
  result = measure(REPEATS.value)
  for size, r in (("tiny", result["decode"]["tiny"]), ("20m", result["decode"]["qwen2_20m"])):
    print(f"model: {r['params']:,} params; batch {r['batch']}, prompt {r['prompt_tokens']}, "
          f"{r['new_tokens']} new tokens; torch threads {r['torch_threads']}")
    for mode in ("greedy", "sampling"):
      if mode in r:
        m = r[mode]
        print(f"  {mode:9s} RolloutEngine {m['engine_tokens_per_s']:10,.0f} tokens/s, "
              f"transformers {m['hf_tokens_per_s']:10,.0f} tokens/s, ratio {m['ratio']:5.1f}x"
              + (f" (outputs identical for {m['identical_rows']:.0%} of rows)"
                 if "identical_rows" in m else ""))
  d = result["decode"]
  print(f"roofline at {d['matmul_gflops_per_s']:.0f} GFLOP/s (jnp.dot): "
        f"{d['roofline_tokens_per_s']:,.0f} tokens/s; engine / roofline "
        f"{result['decode_vs_roofline']:.2f} (decode steps alone: "
        f"{d['qwen2_20m']['decode_step_ms']:.1f} ms each, "
        f"{result['decode_step_vs_roofline']:.2f} of the roofline)")

  rng = np.random.default_rng(0)
  params = init_params(TINY, jax.random.key(0))
  lengths = heavy_tailed_lengths(MIX_REQUESTS.value, rng)
  prompts = [rng.integers(3, TINY.vocab_size, rng.integers(4, 17)).tolist() for _ in lengths]
  mix_engine = RolloutEngine(TINY, params, max_batch=MIX_BATCH.value,
                             max_seq_len=16 + max(lengths), eos_token_ids=(2,))
  continuous_s, static_s = batching_walltimes(mix_engine, prompts, lengths, MIX_BATCH.value)
  print(f"heavy-tailed mix: {len(lengths)} requests, {sum(lengths):,} tokens, lengths "
        f"median {int(np.median(lengths))} max {max(lengths)}, batch {MIX_BATCH.value}")
  print(f"  continuous batching    {continuous_s:8.2f} s")
  print(f"  static batching        {static_s:8.2f} s")
  print(f"  speed-up               {static_s / continuous_s:8.2f}x")


if __name__ == "__main__":
  app.run(main)
