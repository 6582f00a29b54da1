"""SFT / long-CoT warm-up stage alone, exported as an HF checkpoint. Example:
  python -m launch.train_sft --config=experiments/rl_arith.py:tiny --workdir=runs/sft \
      --config.sft.steps=800
"""
from launch import common

main = common.stage_main("kimi_jax.training.sft_run")


if __name__ == "__main__":
  common.run(main)
