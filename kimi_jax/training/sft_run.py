"""The SFT / LM stage on its own: warm-up, vanilla SFT, or pretraining / cooldown / long-context
training on a corpus; then held-out eval and HF export.

Data: the task's reference responses (response-only loss) when `config.corpus.source` is empty,
otherwise a corpus (loss on every token): "worksheets" (synthetic long documents of the
arithmetic task, `synthetic.worksheet`) or a .jsonl / .txt file. Starts from
`config.init.checkpoint` when set (e.g. the previous stage, with a new `model.rope_theta`).
Writes `workdir/hf` (config.json + safetensors + tokenizer), loadable by transformers, SGLang
and `launch.serve`, and `workdir/sft_summary.json` with the held-out evaluation (task pass@1
and, on a corpus, the held-out loss per position bucket up to the last bucket edge, beyond the
stage's training length too).
"""
import json
import os

from kimi_jax.data.corpus import CorpusBatches, TokenStream, corpus_documents
from kimi_jax.data.images import run_image_processing
from kimi_jax.eval.evaluate import evaluate_with_config
from kimi_jax.eval.lm_loss import corpus_loss_by_position
from kimi_jax.rollout.backends import EngineBackend
from kimi_jax.training import multihost
from kimi_jax.training.optim import optimizer_checks
from kimi_jax.training.setup import (BASIC_SECTIONS, build_basics, check, eval_checks, is_int,
                                     load_initial_checkpoint, stage_config)
from kimi_jax.training.sft import fine_tune, sft_warmup
from kimi_jax.training.workdir import RunDirectory

# rl: the repetition stop the evaluation engine shares with RL sampling.
SECTIONS = BASIC_SECTIONS + ("init", "corpus", "sft", "rollout", "rl", "eval")


def validate_config(config) -> None:
  """Fail at start naming the offending dotted key."""
  check(config, _checks(config))


def _checks(config):
  """(dotted key, ok, why) in order, each evaluated only once the ones before it passed."""
  sft = config.sft
  yield ("sft.steps", is_int(sft.steps) and sft.steps >= 0, "must be an int >= 0")
  yield ("sft.batch_size", is_int(sft.batch_size) and sft.batch_size >= 1, "must be an int >= 1")
  yield ("sft.seq_len", is_int(sft.seq_len) and sft.seq_len >= 2, "must be an int >= 2")
  yield from optimizer_checks(sft.optimizer, "sft.optimizer")
  yield from eval_checks(config)


def run(config, workdir: str) -> dict:
  """The stage in `workdir`, local or remote (an `etils.epath` URI such as gs://...)."""
  config = stage_config(config, SECTIONS, "sft")
  validate_config(config)
  with RunDirectory(workdir) as run_dir:
    return _run(config, run_dir.local)


def _run(config, workdir: str) -> dict:
  task, tokenizer, model_config, mesh = build_basics(config, workdir)
  params = None
  if config.init.checkpoint:
    params = load_initial_checkpoint(config.init.checkpoint, model_config,
                                     config.init.changed_fields)
  metrics_path = os.path.join(workdir, "sft_metrics.jsonl")
  if config.corpus.source:
    train_docs, heldout_docs = corpus_documents(config.corpus, config.task, config.seed)
    stream = TokenStream([tokenizer.encode(d) for d in train_docs], tokenizer.eos_id)
    batches = iter(CorpusBatches(stream, config.sft.batch_size, config.sft.seq_len, config.seed))
    params = fine_tune(config.sft, config.seed, batches, model_config, mesh, metrics_path, params)
  else:
    params = sft_warmup(config, task, tokenizer, model_config, mesh, workdir, params)
  multihost.save_hf_from_main(os.path.join(workdir, "hf"), model_config, params,
                              tokenizer=tokenizer)
  params = multihost.addressable(params)  # evaluation runs on each process's own devices
  backend = EngineBackend(model_config, params, config.rollout, config.rl, tokenizer.eos_ids,
                          "sft", run_image_processing(config))
  summary = evaluate_with_config(backend, tokenizer, task, task.heldout,
                                 config.eval).as_dict("sft")
  if config.corpus.source:
    losses = corpus_loss_by_position(model_config, params, tokenizer, heldout_docs,
                                     tuple(config.corpus.position_edges))
    summary.update({f"heldout/{k}": v for k, v in losses.items()})
  if multihost.is_main_process():
    with open(os.path.join(workdir, "sft_summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  print("held-out: " + ", ".join(f"{k}={v:.3f}" for k, v in summary.items()))
  return summary
