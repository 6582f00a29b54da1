"""Prompt curation as a stage: pass rates from the policy, easy-to-hack filters, difficulty.

  python -m launch.curate --config=experiments/math_rl.py:qwen2_5_1_5b \
      --config.init.checkpoint=/ckpt/Qwen2.5-1.5B-Instruct --input=raw.jsonl --output=curated.jsonl

Reads `--input` with the config's `data.schema` (code rows without tests but with a CYaRon
`generator` and `solutions` get generated tests first), samples the checkpoint on the configured
rollout backend, writes the kept rows with `difficulty` (failed samples out of
`curation.num_samples`) to `--output`, and `<output>.report.json` (what was removed and why).
The curriculum and prioritized samplers read `difficulty`.
"""
from absl import app, flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:variant]",
                                         lock_config=True)
INPUT = flags.DEFINE_string("input", None, "prompt file to curate (.jsonl or .parquet)")
OUTPUT = flags.DEFINE_string("output", None, "curated .jsonl to write")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for flag in (CONFIG, INPUT, OUTPUT):
    if flag.value is None:
      raise app.UsageError(f"--{flag.name} is required")
  from kimi_jax.training.curation import curate_file
  report = curate_file(CONFIG.value, INPUT.value, OUTPUT.value)
  print(f"kept {len(report.kept)}, removed {len(report.removed)} {report.counts()}")


if __name__ == "__main__":
  app.run(main)
