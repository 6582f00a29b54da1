"""Long2short on the synthetic arithmetic task: shorten the long-CoT RL model.

First train the long model (responses that verify themselves, no length penalty):
  python -m launch.train_rl --config=experiments/rl_arith.py:long_cot --workdir=runs/long_cot
Then shorten it with one method (rl | shortest | dpo | rpo | merge):
  python -m launch.train_long2short --config=experiments/long2short_arith.py:shortest \
      --workdir=runs/l2s_shortest
(merge averages the long model with runs/l2s_shortest/hf by default; set
--config.long2short.short_checkpoint to use another short model.)
Each run ends with a long-vs-short table and plot in <workdir>/eval/. Compare any checkpoints:
  python -m launch.eval --config=experiments/long2short_arith.py:rl --workdir=runs/l2s_eval \
      --checkpoints=long=runs/long_cot/hf,rl=runs/l2s_rl/hf,shortest=runs/l2s_shortest/hf
Variant argument: "<method>" or "<method>,smoke" (seconds; tests); variants apply in order.
"""
import ml_collections

from experiments import rl_arith, variants

METHODS = ("rl", "shortest", "dpo", "merge")


def _method(name: str, chosen_nll_weight: float = 0.0):
  def apply(c):
    c.long2short.method = name
    c.long2short.dpo.chosen_nll_weight = chosen_nll_weight
  return apply


def _smoke(c):
  c.long2short.update(num_prompts=16, num_samples=4)
  c.long2short.sft.update(steps=10, batch_size=8, seq_len=72)
  c.long2short.dpo.update(steps=10, batch_size=4, seq_len=72)
  c.long2short.sft.optimizer.warmup_steps = c.long2short.dpo.optimizer.warmup_steps = 2
  c.rl.update(iterations=2, max_response_tokens=24, segment_tokens=16)


# rpo = the dpo method plus the chosen-response NLL term (RPO, Pang et al. 2024).
VARIANTS = {**{m: _method(m) for m in METHODS}, "rpo": _method("dpo", chosen_nll_weight=1.0),
            "smoke": _smoke}


def get_config(arg: str = "rl") -> ml_collections.ConfigDict:
  """The long model's config, shortened per the variants of `arg` ("dpo,smoke"); "smoke" also
  starts from rl_arith's smoke size instead of long_cot."""
  names = variants.parse(arg, VARIANTS)
  c = rl_arith.get_config("smoke" if "smoke" in names else "long_cot")
  c.unlock()
  c.init.checkpoint = "runs/long_cot/hf"  # the long model (an RL run's HF export)
  c.long2short = ml_collections.ConfigDict(dict(
      method="rl",
      # shortest / dpo: num_samples per prompt of the long model on the first num_prompts
      # training prompts, at temperature, up to eval.max_new_tokens (the long model's length).
      num_prompts=2000, num_samples=8, temperature=1.0,
      length_ratio=1.5,  # dpo: a correct response this much longer than the shortest is rejected
      sft=dict(steps=150, batch_size=64, seq_len=96,
               optimizer=rl_arith.optimizer("adamw", 1e-3, b2=0.999, warmup_steps=15,
                                            decay_to=0.1)),
      # chosen_nll_weight: + weight x NLL of the chosen responses (RPO); 0 is plain DPO (paper).
      dpo=dict(steps=150, batch_size=32, seq_len=96, beta=0.1, chosen_nll_weight=0.0,
               optimizer=rl_arith.optimizer("adamw", 3e-4, b2=0.999, warmup_steps=15,
                                            decay_to=0.1)),
      short_checkpoint="runs/l2s_shortest/hf",  # merge: a short-CoT partner of the same model
      merge_weight=0.5))
  # long2short RL: the penalty on from iteration 0 and 60% of the long model's max length.
  c.rl.update(iterations=10, max_response_tokens=48, segment_tokens=32)
  c.rl.length_penalty.update(weight=0.3, warmup_iterations=0)
  c.sampler.strategy = "uniform"
  return variants.apply(c, arg, VARIANTS)
