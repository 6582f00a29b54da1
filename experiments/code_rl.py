"""k1.5 RL on programming problems (rows with `tests: [{input, output}]`) from an HF checkpoint.

A response scores 1 only if the last fenced code block passes every test (the paper: no partial
credit); programs run in the bubblewrap sandbox, in parallel on the machine's cores, each test
under its own timeout. Rows without tests get them from CYaRon generators through
`launch.curate` first. Run:
  python -m launch.train_rl --config=experiments/code_rl.py:qwen2_5_1_5b \
    --config.init.checkpoint=/ckpt/Qwen2.5-Coder-1.5B-Instruct \
    --config.data.train=/data/code/train.jsonl --config.data.eval=/data/code/test.jsonl \
    --workdir=runs/code
Variants: `smoke` (CPU tests), `qwen2_5_1_5b` (one host), `pod` (a slice).
"""
import ml_collections

from experiments import math_rl

CODE_TEMPLATE = ("{question}\nWrite a Python 3 program that reads standard input and writes "
                 "standard output. Put the whole program in one ```python code block.")


def get_config(arg: str = "qwen2_5_1_5b") -> ml_collections.ConfigDict:
  c = math_rl.prompt_rl_config("code", "code", "code", CODE_TEMPLATE)
  math_rl.apply_size(c, arg)
  c.lock()
  return c
