"""k1.5 RL training. Example:
  python -m launch.train_rl --config=experiments/rl_arith.py:tiny --workdir=runs/demo \
      --config.rl.tau=0.05
"""
from absl import app

from launch import common


def main(argv):
  config, workdir = common.start(argv)
  from kimi_jax.training import rl
  rl.run(config, workdir)


if __name__ == "__main__":
  app.run(main)
