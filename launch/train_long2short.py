"""Long2short: shorten a long-CoT model (rl | shortest | dpo | merge). Example:
  python -m launch.train_long2short --config=experiments/long2short_arith.py:rl \
      --workdir=runs/long2short_rl --config.init.checkpoint=runs/long_cot/hf
"""
from launch import common

main = common.stage_main("kimi_jax.training.long2short_run")


if __name__ == "__main__":
  common.run(main)
