"""k1.5 RL training. Example:
  python -m launch.train_rl --config=experiments/rl_arith.py:tiny --workdir=runs/demo \
      --config.rl.tau=0.05
"""
from launch import common

main = common.stage_main("kimi_jax.training.rl")


if __name__ == "__main__":
  common.run(main)
