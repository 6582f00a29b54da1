"""SFT / long-CoT warm-up stage alone, exported as an HF checkpoint. Example:
  python -m launch.train_sft --config=experiments/rl_arith.py:tiny --workdir=runs/sft \
      --config.sft.steps=800
"""
from absl import app

from launch import common


def main(argv):
  config, workdir = common.start(argv)
  from kimi_jax.training import sft_run
  sft_run.run(config, workdir)


if __name__ == "__main__":
  app.run(main)
