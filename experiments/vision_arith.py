"""k1.5 RL on vision tasks: arithmetic rendered as pictures and bar-chart reading, on a tiny
Qwen2-VL-shaped model (SFT warm-up on image-text pairs, then RL through the text loop, with the
same losses and rewards).

Run (the README's vision demo, CPU; `make demo-vision`):
  python -m launch.train_rl --config=experiments/vision_arith.py:tiny --workdir=runs/vision
Variants: `tiny` (CPU: rendered arithmetic), `mixed` (text arithmetic beside rendered arithmetic
and charts: the paper's joint text + vision RL, metrics per domain), `smoke` (seconds; tests),
`pod` (a pod slice: larger LM and tower, bigger images, sharded over fsdp); variants combine
in order (`:mixed,smoke`).
Override any field: --config.task.domains='("chart",)' --config.images.max_pixels=50176
"""
import ml_collections

from experiments import rl_arith, variants


def base_config() -> ml_collections.ConfigDict:
  c = rl_arith.base_config()
  c.task = ml_collections.ConfigDict(dict(
      name="vision", reward="arith", domains=("arith_image",), levels=(1, 2, 3),
      max_operand=9, chart_levels=(1, 2), num_bars=4, chart_max_value=9, chart_unit=5,
      num_train=2000, num_heldout=128, direct_answer_fraction=0.5))
  # The LM of rl_arith plus M-RoPE and a 2-block native-resolution ViT whose 2x2 merger feeds
  # the LM's width. M-RoPE gives (temporal, height, width) the rotary frequencies in that order,
  # highest first; with 8 frequencies and theta 1e4 the width section would rotate < 0.01 rad
  # per image column and the LM could not tell one character's token from the next. Theta 100
  # with sections (1, 1, 6) gives the width 0.32 down to 0.02 rad per column.
  c.model.update(rope_theta=100.0, mrope_section=(1, 1, 6))
  c.model.vision = ml_collections.ConfigDict(dict(
      architecture="qwen2_vl", depth=2, hidden_size=64, num_heads=4, intermediate_size=128,
      out_hidden_size=c.model.hidden_size, hidden_act="quick_gelu"))
  # Image preprocessing (Qwen2-VL's): the tasks' pictures (28 x 224 strips, 84 x 112 charts)
  # pass unresized.
  c.images = ml_collections.ConfigDict(dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64))
  # Prompt: <bos> <|vision_start|> 8 or 12 image tokens <|vision_end|> then the text question.
  c.sft.seq_len = 80
  # Partial rollouts: at most 24 new tokens per trajectory per iteration (the policy never
  # samples an image pad, so a resumed prompt holds only its own images).
  c.rl.update(max_response_tokens=40, segment_tokens=24)
  c.rollout.max_seq_len = 96
  c.eval.max_new_tokens = 40
  return c


def _mixed(c):
  c.task.domains = ("arith", "arith_image", "chart")


def _smoke(c):
  c.task.num_train, c.task.num_heldout = 60, 8
  c.sft.steps, c.sft.batch_size, c.sft.optimizer.warmup_steps = 10, 8, 2
  c.rl.iterations, c.rl.prompts_per_iteration, c.rl.k = 2, 4, 4
  c.rl.groups_per_minibatch = 2
  c.rl.length_penalty.warmup_iterations = 1
  c.eval.every = 2
  c.checkpoint.every = 1
  c.metrics.tensorboard = False


def _pod(c):
  c.model.update(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                 num_kv_heads=4, head_dim=64, dtype="bfloat16", rope_theta=10000.0,
                 mrope_section=(8, 12, 12))
  c.model.vision.update(depth=8, hidden_size=256, num_heads=4, intermediate_size=1024,
                        out_hidden_size=512)
  c.task.update(domains=("arith", "arith_image", "chart"), levels=(1, 2, 3, 4, 5, 6),
                max_operand=99, num_train=20000, num_heldout=512)
  c.images.max_pixels = 28 * 28 * 256
  c.sft.update(seq_len=192, batch_size=128, steps=2000)
  c.rl.update(iterations=200, prompts_per_iteration=128, k=16, max_response_tokens=160,
              segment_tokens=96)
  c.rollout.update(max_batch=512, max_seq_len=256)
  c.eval.max_new_tokens = 160
  c.mesh.fsdp = 8
  c.optimizer.update(name="muon", learning_rate=1e-4, weight_decay=0.1)  # untested at scale


VARIANTS = {"tiny": lambda c: None, "mixed": _mixed, "smoke": _smoke, "pod": _pod}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  """The base config with the variants of `arg` applied in order (e.g. "mixed,smoke")."""
  return variants.apply(base_config(), arg, VARIANTS)
