"""The SFT stage on its own: warm-up / vanilla SFT, held-out eval, HF export.

Writes `workdir/hf` (config.json + safetensors + tokenizer), loadable by transformers, SGLang
and `launch.serve`, and `workdir/sft_summary.json` with the held-out evaluation.
"""
import json
import os

from kimi_jax.checkpointing.hf import save_hf
from kimi_jax.eval.evaluate import evaluate_with_config
from kimi_jax.training import rl
from kimi_jax.training.rollout_backends import EngineBackend


def run(config, workdir: str) -> dict:
  task, tokenizer, model_config, mesh = rl.build_basics(config, workdir)
  params = rl.sft_warmup(config, task, tokenizer, model_config, mesh, workdir)
  export = os.path.join(workdir, "hf")
  save_hf(export, model_config, params, tokenizer=tokenizer)
  backend = EngineBackend(model_config, params, config.rollout, config.rl, tokenizer.eos_id, "sft")
  summary = evaluate_with_config(backend, tokenizer, task, task.heldout,
                                 config.eval).as_dict("sft")
  with open(os.path.join(workdir, "sft_summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print("held-out: " + ", ".join(f"{k}={v:.3f}" for k, v in summary.items()))
  return summary
