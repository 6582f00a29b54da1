"""The long2short stage (k1.5 section 2.4): shorten a long-CoT model.

`config.init.checkpoint` is the long model (an HF directory, e.g. an RL run's `hf/`);
`config.long2short.method` picks how to shorten it:
  rl        the RL trainer itself with the length penalty on from the first iteration and a
            much smaller max length: only the config differs (experiments/long2short_arith.py);
  shortest  shortest rejection sampling: n samples per training prompt, SFT of the long model
            on the shortest correct response of each prompt;
  dpo       DPO of the long model on pairs from the same samples (shortest correct chosen;
            rejected: wrong ones longer than the chosen, correct ones >= length_ratio x longer);
  merge     weight averaging of the long model with `long2short.short_checkpoint`.
Every method leaves the short model in `workdir/hf`, then evaluates long against short on the
held-out prompts (`workdir/eval/`: table, JSON, plot).
"""
import dataclasses
import json
import os
import random
from typing import Callable

from kimi_jax.checkpointing.hf import save_hf
from kimi_jax.data.packing import PackedBatches, example_from_ids
from kimi_jax.data.tasks import encode_text
from kimi_jax.eval import compare
from kimi_jax.eval.evaluate import GradedSamples, sample_and_grade_share
from kimi_jax.metrics.writers import JsonlWriter
from kimi_jax.rollout.backends import build_backend
from kimi_jax.sharding.processes import this_job
from kimi_jax.training import multihost, rl
from kimi_jax.training.dpo import pair_batch, run_dpo
from kimi_jax.training.long2short import (Sample, build_dpo_pairs, merge_params,
                                          shortest_rejection_sampling)
from kimi_jax.training.setup import (build_basics, check, eval_checks, is_int,
                                     load_initial_checkpoint, stage_config)
from kimi_jax.training.optim import build_optimizer, build_post_update, optimizer_checks
from kimi_jax.training.sft import fine_tune
from kimi_jax.training.state import train_state_from_params
from kimi_jax.training.workdir import RunDirectory


def sample_long_model(config, task, tokenizer, model_config, params, workdir: str) -> list[Sample]:
  """`long2short.num_samples` graded samples of the long model for each of the first
  `long2short.num_prompts` distinct training questions, each process sampling its share."""
  l2s = config.long2short
  first_of_question = {}
  for prompt in task.train:
    first_of_question.setdefault(prompt.question, prompt)
  distinct = list(first_of_question.values())
  backend = build_backend(config, model_config, tokenizer, params, "long", workdir)
  processes = this_job()
  try:
    share = sample_and_grade_share(backend, tokenizer, task, distinct[:l2s.num_prompts],
                                   l2s.num_samples, l2s.temperature, config.eval.max_new_tokens,
                                   config.seed, processes)
    graded = GradedSamples.concatenate(processes.allgather(share))
  finally:
    backend.close()
  samples = [Sample(task.prompt_text(p), response, bool(correct), int(tokens)) for p, response, correct,
             tokens in zip(graded.prompts_R, graded.responses_R, graded.correct_R,
                           graded.num_tokens_R)]
  write_jsonl(os.path.join(workdir, "long_samples.jsonl"), map(dataclasses.asdict, samples))
  return samples


def write_jsonl(path: str, rows) -> None:
  """One JSON object per line (dicts, or NamedTuples written field by field), written by
  process 0 only."""
  if not multihost.is_main_process():
    return
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row if isinstance(row, dict) else row._asdict()) + "\n")


def shortest(config, task, tokenizer, model_config, mesh, params, workdir: str):
  """SFT of the long model on its own shortest correct responses."""
  samples = sample_long_model(config, task, tokenizer, model_config, params, workdir)
  examples = shortest_rejection_sampling(samples, config.long2short.num_samples)
  if not examples:
    raise ValueError("shortest rejection sampling: no prompt has a correct sample")
  write_jsonl(os.path.join(workdir, "shortest_sft.jsonl"), examples)
  sft = config.long2short.sft
  encoded = [example_from_ids(tokenizer, encode_text(tokenizer, e.prompt, task.chat_template_kwargs),
                              e.response) for e in examples]
  batches = iter(PackedBatches(encoded, sft.batch_size, sft.seq_len, tokenizer.pad_id,
                               config.seed))
  return fine_tune(sft, config.seed, batches, model_config, mesh,
                   os.path.join(workdir, "long2short_metrics.jsonl"), params=params,
                   desc="shortest_sft", key="long2short.sft.optimizer")


def dpo_batches(pairs, tokenizer, encode: Callable[[str], list[int]], batch_size: int,
                seq_len: int, seed: int) -> list[dict]:
  """Shuffled pair batches of exactly `batch_size` (the last one topped up from the start),
  this process's rows of each; `encode` gives a prompt text's ids."""
  triples = [(encode(p.prompt), tokenizer.encode(p.chosen) + [tokenizer.eos_id],
              tokenizer.encode(p.rejected) + [tokenizer.eos_id]) for p in pairs]
  random.Random(seed).shuffle(triples)
  triples += triples[:(-len(triples)) % batch_size]
  return [pair_batch(triples[i:i + batch_size], seq_len, tokenizer.pad_id)
          for i in range(0, len(triples), batch_size)]


def dpo(config, task, tokenizer, model_config, mesh, params, workdir: str):
  """DPO of the long model (also the frozen reference) on shortest-vs-long/wrong pairs."""
  l2s = config.long2short
  samples = sample_long_model(config, task, tokenizer, model_config, params, workdir)
  pairs = build_dpo_pairs(samples, l2s.num_samples, l2s.length_ratio)
  if not pairs:
    raise ValueError("DPO pairs: no prompt has both a shortest correct and a rejected sample")
  write_jsonl(os.path.join(workdir, "dpo_pairs.jsonl"), pairs)
  batches = dpo_batches(pairs, tokenizer,
                        lambda text: encode_text(tokenizer, text, task.chat_template_kwargs),
                        l2s.dpo.batch_size, l2s.dpo.seq_len, config.seed)
  tx = build_optimizer(l2s.dpo.optimizer, l2s.dpo.steps, "long2short.dpo.optimizer")
  state, shardings = train_state_from_params(model_config, tx, mesh, params)
  writer = JsonlWriter(os.path.join(workdir, "long2short_metrics.jsonl"))
  state, _ = run_dpo(state, shardings, mesh, model_config, batches, l2s.dpo.beta, l2s.dpo.steps,
                     writer, chosen_nll_weight=l2s.dpo.chosen_nll_weight,
                     post_update=build_post_update(l2s.dpo.optimizer))
  writer.close()
  return state.params


def merge(config, task, tokenizer, model_config, mesh, params, workdir: str):
  """long2short.merge_weight * long + (1 - merge_weight) * short."""
  short = load_initial_checkpoint(config.long2short.short_checkpoint, model_config,
                                  key="long2short.short_checkpoint")
  return merge_params(params, short, config.long2short.merge_weight)


DATA_METHODS = {"shortest": shortest, "dpo": dpo, "merge": merge}
METHODS = ("rl",) + tuple(DATA_METHODS)


SECTIONS = rl.SECTIONS + ("corpus", "long2short")


def validate_config(config) -> None:
  """Fail at start naming the offending dotted key (the rl method: RL's checks too)."""
  check(config, _checks(config))
  if config.long2short.method == "rl":
    rl.validate_config(config)


def _checks(config):
  """(dotted key, ok, why) in order, each evaluated only once the ones before it passed."""
  l2s = config.long2short
  yield ("long2short.method", l2s.method in METHODS, f"expected one of {METHODS}")
  yield ("init.checkpoint", bool(config.init.checkpoint),
         "is empty: long2short needs the long model's HF directory")
  yield ("long2short.num_samples", is_int(l2s.num_samples) and l2s.num_samples >= 1,
         "must be an int >= 1")
  yield ("long2short.merge_weight", 0 <= l2s.merge_weight <= 1, "must be in [0, 1]")
  yield from optimizer_checks(l2s.sft.optimizer, "long2short.sft.optimizer")
  yield from optimizer_checks(l2s.dpo.optimizer, "long2short.dpo.optimizer")
  yield from eval_checks(config)


def run(config, workdir: str) -> dict:
  """Shorten `config.init.checkpoint` with `config.long2short.method`; returns the eval table
  rows {"long": ..., "short": ...} as dicts. `workdir` may be remote (an `etils.epath` URI)."""
  config = stage_config(config, SECTIONS, "long2short")
  validate_config(config)
  with RunDirectory(workdir) as run_dir:
    return _run(config, run_dir)


def _run(config, run_dir: RunDirectory) -> dict:
  method, workdir = config.long2short.method, run_dir.local
  if method == "rl":
    rl.run_in(config, run_dir)
  else:
    task, tokenizer, model_config, mesh = build_basics(config, workdir)
    params = load_initial_checkpoint(config.init.checkpoint, model_config)
    short = DATA_METHODS[method](config, task, tokenizer, model_config, mesh, params, workdir)
    save_hf(os.path.join(workdir, "hf"), model_config, short, tokenizer=tokenizer)
  results = compare.run(config, os.path.join(workdir, "eval"),
                        {"long": config.init.checkpoint,
                         f"short ({method})": os.path.join(workdir, "hf")})
  return {name: r.as_dict("eval") for name, r in results.items()}
