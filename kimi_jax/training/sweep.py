"""Ablation sweeps over one RL config field, sharing a single SFT warm-up.

The warm-up runs once (an RL run with zero iterations leaves checkpoint 0 behind); each swept
value then starts from a copy of that directory, so the runs differ only in the swept field.
"""
import os
import shutil

from kimi_jax.metrics.writers import read_jsonl
from kimi_jax.training import rl


def _with(config, key: str, value):
  config = config.copy_and_resolve_references()
  node = config
  *parents, leaf = key.split(".")
  for part in parents:
    node = node[part]
  if leaf not in node:
    raise KeyError(f"sweep key {key!r}: no field {leaf!r} in the config")
  with config.unlocked():
    node[leaf] = value
  return config


def run_sweep(config, workdir: str, key: str, values) -> dict:
  """Run `config` once per value of the dotted `key`; returns {value: metrics records}."""
  warmup = os.path.join(workdir, "warmup")
  if not os.path.exists(os.path.join(warmup, "checkpoints", "0")):
    rl.run(_with(config, "rl.iterations", 0), warmup)
  results = {}
  for value in values:
    run_dir = os.path.join(workdir, f"{key}={value}")
    if not os.path.exists(run_dir):
      shutil.copytree(warmup, run_dir)
    rl.run(_with(config, key, value), run_dir)
    results[value] = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
  return results
