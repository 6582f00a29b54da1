"""Long-context activation at tiny scale: the paper's 4k -> 32k -> 128k stages with RoPE theta
raised to 1e6, here 64 -> 256 -> 1024 tokens on a corpus of synthetic worksheets whose second
half repeats the first (predictable only from a whole sheet back).

Run the stages in order, each starting from the previous one's HF export:
  python -m launch.train_sft --config=experiments/long_context_arith.py:stage1 --workdir=runs/lc1
  python -m launch.train_sft --config=experiments/long_context_arith.py:stage2 --workdir=runs/lc2
  python -m launch.train_sft --config=experiments/long_context_arith.py:stage3 --workdir=runs/lc3
Each writes <workdir>/sft_summary.json with the held-out loss per position bucket
(heldout/loss_pos0-64, .../loss_pos64-256, .../loss_pos256-1024): the long-range buckets fall
stage by stage. Add ",smoke" to a stage (e.g. `stage2,smoke`) for the seconds-long test size.
"""
import ml_collections

from experiments import rl_arith, variants

# stage -> (sequence length, RoPE theta, the stage it starts from, steps, batch size)
STAGES = {
    "stage1": (64, 1e4, None, 600, 32),
    "stage2": (256, 1e6, "stage1", 300, 8),
    "stage3": (1024, 1e6, "stage2", 100, 2),
}


def _stage(name: str):
  seq_len, theta, previous, steps, batch_size = STAGES[name]

  def apply(c):
    c.corpus.update(source="worksheets", min_problems=2, max_problems=18)
    c.model.update(rope_theta=theta, attention="blockwise", attention_block_size=64)
    c.sft.update(steps=steps, batch_size=batch_size, seq_len=seq_len)
    c.sft.optimizer.update(learning_rate=3e-3, warmup_steps=steps // 10)
    if previous:
      c.init.checkpoint = f"runs/lc{previous[-1]}/hf"
      c.init.changed_fields = ("rope_theta",)
      c.sft.optimizer.learning_rate = 1e-3
  return apply


def _smoke(c):  # after a stage: the seconds-long test size
  c.corpus.update(num_documents=64, heldout_documents=8, max_problems=6)
  c.sft.update(steps=4, batch_size=2)
  c.sft.optimizer.warmup_steps = 1
  c.task.update(num_train=64, num_heldout=8)


VARIANTS = {**{name: _stage(name) for name in STAGES}, "smoke": _smoke}


def get_config(arg: str = "stage1") -> ml_collections.ConfigDict:
  """rl_arith's tiny config with the variants of `arg` applied in order ("stage2,smoke")."""
  if not any(name in STAGES for name in variants.parse(arg, VARIANTS)):
    raise ValueError(f"config variant {arg!r} names no stage: one of {list(STAGES)}")
  c = rl_arith.get_config("tiny")
  c.unlock()
  return variants.apply(c, arg, VARIANTS)
