"""k1.5 RL on math problems (GSM8K `#### N` or MATH `\\boxed{}` rows) from an HF checkpoint.

The policy, its tokenizer and its chat template all come from `init.checkpoint` (any
Qwen2 / Llama / Qwen3 causal-LM directory); rewards come from the math verifier. Run:
  python -m launch.train_rl --config=experiments/math_rl.py:qwen2_5_1_5b \
    --config.init.checkpoint=/ckpt/Qwen2.5-1.5B-Instruct \
    --config.data.train=/data/gsm8k/train.jsonl --config.data.eval=/data/gsm8k/test.jsonl \
    --workdir=runs/math
MATH rows: add --config.data.schema=math. Graded by a chain-of-thought judge model instead of
the verifier: --config.data.reward=cot_rm --config.rewards.cot_rm.checkpoint=/ckpt/judge (plus
--config.rewards.cot_rm.urls='("http://judge:30000",)' when SGLang serves it).
Variants: `smoke` (CPU tests: a tiny random checkpoint, a handful of rows), `qwen2_5_1_5b` (one
GPU/TPU host), `pod` (a slice: data x fsdp x tensor mesh).
Every sampled response lands in <workdir>/samples/iter_NNNNN.jsonl.
"""
import ml_collections

from experiments import rl_arith

MATH_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."


def prompt_rl_config(domain: str, schema: str, reward: str,
                     template: str) -> ml_collections.ConfigDict:
  """RL from `init.checkpoint` on prompt files of one domain (the task registry's "prompts")."""
  c = rl_arith.base_config()
  c.task = ml_collections.ConfigDict(dict(name="prompts"))
  c.data = ml_collections.ConfigDict(dict(
      train="", eval="", schema=schema, reward=reward, template=template, domain=domain,
      weight=1.0, chat_template_kwargs={}, mix={}))
  # The architecture comes from the checkpoint; this section only says how to run it.
  c.model = ml_collections.ConfigDict(dict(dtype="bfloat16", attention="dot_product", remat=True))
  c.optimizer.update(name="adamw", learning_rate=1e-6, weight_decay=0.0, b1=0.9, b2=0.999)
  c.rl.update(iterations=200, prompts_per_iteration=64, k=8, temperature=1.0, tau=0.01,
              groups_per_minibatch=8, max_response_tokens=4096, segment_tokens=1024,
              train_old_segments=False)
  c.rl.length_penalty.update(weight=0.1, warmup_iterations=20)
  c.rollout.update(max_batch=256, max_seq_len=5120)
  c.eval.update(every=10, max_new_tokens=4096)
  c.checkpoint.every = 10
  # The chain-of-thought judge of `data.reward=cot_rm`, a separate model: SGLang servers at
  # `urls` serving `checkpoint`, or (no urls) an in-process engine on `checkpoint`'s weights.
  c.rewards = ml_collections.ConfigDict(dict(cot_rm=dict(
      checkpoint="", urls=(), max_new_tokens=1024, temperature=0.0, max_batch=256,
      max_seq_len=6144, repetition_ngram=0, repetition_count=0)))
  # launch.curate: pass rate over num_samples at temperature (difficulty = failed samples), the
  # no-CoT guess filter, and CYaRon test generation for code rows without tests.
  c.curation = ml_collections.ConfigDict(dict(
      num_samples=10, temperature=1.0, max_new_tokens=4096, guess_tries=8,
      guess_max_new_tokens=32,
      guess_template="{question}\nGive only the final answer, without reasoning.",
      min_pass_rate=0.0, max_pass_rate=1.0,
      testgen=dict(num_cases=50, min_agreeing=7, min_passing=9, timeout_s=2.0, memory_mb=256,
                   max_workers=8)))
  return c


def apply_size(c: ml_collections.ConfigDict, size: str) -> None:
  if size == "smoke":  # a tiny random checkpoint on CPU: seconds per iteration
    c.model.update(dtype="float32", remat=False)
    c.optimizer.update(learning_rate=1e-3)
    c.rl.update(iterations=2, prompts_per_iteration=4, k=4, groups_per_minibatch=2,
                max_response_tokens=16, segment_tokens=8)
    c.rl.length_penalty.warmup_iterations = 1
    c.rollout.update(max_batch=32, max_seq_len=384)
    c.eval.update(every=1, max_new_tokens=8)
    c.checkpoint.every = 1
    c.metrics.tensorboard = False
    c.rewards.cot_rm.update(max_new_tokens=16, max_batch=32, max_seq_len=512)
    c.curation.update(num_samples=4, max_new_tokens=8, guess_tries=2, guess_max_new_tokens=4)
    c.curation.testgen.update(num_cases=4, min_agreeing=2, min_passing=2, max_workers=2)
  elif size == "qwen2_5_1_5b":
    pass
  elif size == "pod":
    c.mesh.update(data=-1, fsdp=8, tensor=1)
    c.rl.update(prompts_per_iteration=512, k=16, groups_per_minibatch=64)
    c.rollout.update(backend="sglang", max_batch=1024)
  else:
    raise ValueError(f"unknown config variant {size!r}: smoke, qwen2_5_1_5b, pod")


def get_config(arg: str = "qwen2_5_1_5b") -> ml_collections.ConfigDict:
  c = prompt_rl_config("math", "gsm8k", "math", MATH_TEMPLATE)
  apply_size(c, arg)
  c.lock()
  return c
