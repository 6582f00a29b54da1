"""k1.5 RL on the synthetic multi-step arithmetic task (long-CoT SFT warm-up, then RL).

Run (the README's main job, CPU, < 15 minutes on 2 cores):
  python -m launch.train_rl --config=experiments/rl_arith.py:tiny --workdir=runs/demo
Variants: `tiny` (CPU demo), `tiny_nolp` (same, length penalty off: for the length ablation),
`long_cot` (responses that verify themselves, no length penalty: the long model of
experiments/long2short_arith.py), `smoke` (seconds; used by tests), `small` (a single accelerator).
Variants combine, applied in order: `:small,smoke` is the small model at smoke-test length.
Override any field: --config.rl.tau=0.05 --config.rl.length_penalty.weight=0.0
"""
import ml_collections

from experiments import variants


def optimizer(name: str, learning_rate: float, weight_decay: float = 0.0, b2: float = 0.99,
              grad_clip: float = 0.0, qk_clip_tau: float = 0.0, warmup_steps: int = 0,
              decay_to: float = 1.0) -> ml_collections.ConfigDict:
  """An `optimizer` block (the fields `kimi_jax.training.optim` reads, for every stage)."""
  return ml_collections.ConfigDict(dict(
      name=name, learning_rate=learning_rate, weight_decay=weight_decay, b1=0.9, b2=b2,
      momentum=0.0, grad_clip=grad_clip, qk_clip_tau=qk_clip_tau, warmup_steps=warmup_steps,
      decay_to=decay_to))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.task = ml_collections.ConfigDict(dict(
      name="arith", reward="arith", levels=(1, 2, 3, 4), max_operand=9, num_train=4000,
      num_heldout=256, direct_answer_fraction=0.5, verify_fraction=0.0))

  # Char-level tokenizer; vocab padded to a multiple of 8 so it shards over `tensor`.
  c.model = ml_collections.ConfigDict(dict(
      architecture="qwen2", hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=16, rope_theta=10000.0, qkv_bias=True, vocab_multiple=8,
      dtype="float32", attention="dot_product", remat=False))

  # An HF checkpoint directory (e.g. another run's `hf/`) to start from instead of the SFT
  # warm-up (RL) or a fresh init (SFT stage); its model config must equal `model` (with this
  # task's tokenizer) except in `changed_fields`.
  c.init = ml_collections.ConfigDict(dict(checkpoint="", changed_fields=()))

  # LM stages (launch.train_sft) train on a corpus instead of the task's SFT references when
  # `source` is set: "worksheets" (synthetic long documents) or a .jsonl/.txt file.
  c.corpus = ml_collections.ConfigDict(dict(
      source="", num_documents=2000, heldout_documents=64, min_problems=2, max_problems=16,
      position_edges=(0, 64, 256, 1024)))

  # sequence > 1 splits every sequence over that many devices (ring attention; context
  # parallelism for long CoT); the sequence length must divide by it.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, sequence=1))

  # The warm-up: AdamW, linear warm-up then cosine decay to a tenth.
  c.sft = ml_collections.ConfigDict(dict(
      steps=400, batch_size=64, seq_len=64,
      optimizer=optimizer("adamw", 3e-3, weight_decay=0.01, b2=0.999, warmup_steps=50,
                          decay_to=0.1)))

  # RL resets the optimizer every iteration (k1.5); on this tiny model Adam's first, sign-like
  # step after each reset is a large random move, so the demo uses plain SGD on clipped grads.
  c.optimizer = optimizer("sgd", 5e-3, grad_clip=1.0, qk_clip_tau=100.0)  # K2's tau; 0: off

  c.rl = ml_collections.ConfigDict(dict(
      iterations=20,
      prompts_per_iteration=32,
      k=8,  # samples per prompt
      temperature=1.0,
      loss="mirror_descent",  # mirror_descent (k1.5) | grpo | reinforce
      tau=0.05,
      baseline="mean",  # mean (paper) | log_mean_exp (exact tau log Z)
      length_normalize=False,
      groups_per_minibatch=8,
      # Prompts and batch rows split into this many slices; each process rolls out, scores and
      # trains on its own whole slices, and a minibatch takes groups_per_minibatch / slices groups
      # of each. 0: one slice per process. Runs with the same value train on the same minibatches
      # on any process count that divides it.
      batch_slices=0,
      epochs=1,  # passes over the iteration's data; steps/iteration = epochs * minibatches
      max_response_tokens=56,
      segment_tokens=32,  # per iteration; < max_response_tokens: partial rollouts on (k1.5)
      train_old_segments=False,  # k1.5: earlier segments of older policies get no gradient
      repetition_ngram=4, repetition_count=4, repetition_penalty=-0.5,
      length_penalty=ml_collections.ConfigDict(dict(weight=0.2, warmup_iterations=10)),
      clip_eps=0.2))  # grpo only

  # strategy: uniform | prioritized | switch_curriculum | gradual_curriculum.
  c.sampler = ml_collections.ConfigDict(dict(
      strategy="prioritized", epsilon=0.05, ema_rate=0.0, base="prioritized",
      switch_step=24, hard_level=4, start_level=1, steps_per_level=8))

  # colocate: hybrid deployment (k1.5's colocated train + rollout): the rollout backend frees its
  # device memory (KV cache, weights) while the trainer runs and takes it back for the next
  # iteration's weights. urls: SGLang servers or a router (backend "sglang").
  c.rollout = ml_collections.ConfigDict(dict(
      backend="engine", urls=(), max_batch=128, max_seq_len=72, colocate=False))

  # Held-out eval: `samples` responses per prompt at `temperature` (1 at 0.0 = greedy), pass@k.
  c.eval = ml_collections.ConfigDict(dict(every=5, max_new_tokens=56, samples=1, temperature=0.0,
                                          k=1, seed=0))
  # directory: where the orbax checkpoints go, any etils.epath path (gs://bucket/run/ckpt on a
  # pod); "" = <workdir>/checkpoints.
  c.checkpoint = ml_collections.ConfigDict(dict(every=5, keep=2, async_save=True, directory=""))
  c.metrics = ml_collections.ConfigDict(dict(tensorboard=True))
  return c


def _tiny_nolp(c):
  c.rl.length_penalty.weight = 0.0


def _long_cot(c):  # the long-CoT RL model that experiments/long2short_arith.py shortens
  c.task.update(direct_answer_fraction=0.3, verify_fraction=0.7)
  c.rl.length_penalty.weight = 0.0
  c.sft.seq_len = 96
  c.rl.update(max_response_tokens=80, segment_tokens=48)
  c.rollout.max_seq_len = 96
  c.eval.max_new_tokens = 80


def _smoke(c):
  c.task.num_train, c.task.num_heldout = 200, 32
  c.sft.steps, c.sft.batch_size, c.sft.optimizer.warmup_steps = 20, 16, 5
  c.rl.iterations, c.rl.prompts_per_iteration, c.rl.k = 3, 4, 4
  c.rl.groups_per_minibatch = 2
  c.rl.batch_slices = 2  # the same minibatches as 1 or 2 processes (tests compare the two)
  c.rl.segment_tokens = 24
  c.rl.length_penalty.warmup_iterations = 1
  c.eval.every = 2
  c.checkpoint.every = 1
  c.metrics.tensorboard = False


def _small(c):
  c.model.update(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                 num_kv_heads=4, head_dim=64, dtype="bfloat16")
  c.task.levels, c.task.max_operand = (1, 2, 3, 4, 5, 6), 99
  c.rl.update(iterations=200, prompts_per_iteration=128, k=16, max_response_tokens=160,
              segment_tokens=96)
  c.rollout.update(max_batch=512, max_seq_len=192)
  c.sft.seq_len = 192
  c.eval.max_new_tokens = 160
  c.optimizer.update(name="muon", learning_rate=1e-4, weight_decay=0.1)  # untested at scale


VARIANTS = {"tiny": lambda c: None, "tiny_nolp": _tiny_nolp, "long_cot": _long_cot,
            "smoke": _smoke, "small": _small}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  """The base config with the variants of `arg` applied in order (e.g. "small,smoke")."""
  return variants.apply(base_config(), arg, VARIANTS)
