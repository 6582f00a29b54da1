"""Evaluate HF checkpoints side by side on the config task's held-out prompts. Example:
  python -m launch.eval --config=experiments/rl_arith.py:tiny --workdir=runs/eval \
      --checkpoints=sft=runs/demo/hf_sft,long=runs/demo/hf,short=runs/long2short/hf
Sampled pass@k: --config.eval.samples=8 --config.eval.temperature=1.0 --config.eval.k=8
"""
from absl import app, flags

from launch import common

CHECKPOINTS = flags.DEFINE_string("checkpoints", None,
                                  "comma-separated name=path of HF checkpoint directories")


def main(argv):
  config, workdir = common.start(argv)
  if not CHECKPOINTS.value:
    raise app.UsageError("--checkpoints is required, e.g. --checkpoints=long=runs/demo/hf")
  from kimi_jax.eval import compare
  from kimi_jax.training.workdir import RunDirectory
  with RunDirectory(workdir) as run_dir:  # a remote workdir is written locally, then mirrored
    compare.run(config, run_dir.local, compare.parse_checkpoints(CHECKPOINTS.value))


if __name__ == "__main__":
  common.run(main)
