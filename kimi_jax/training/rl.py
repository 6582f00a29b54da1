"""The k1.5 synchronous RL loop (DESIGN.md section 1).

prompts -> k samples per prompt -> rewards (+ length penalty) -> S_ref -> optimizer reset ->
M minibatch steps of the pure `rl_step` -> weight sync -> sampler feedback -> metrics ->
checkpoint. Everything configurable arrives in `config` (experiments/rl_*.py).
"""
import dataclasses
import json
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from kimi_jax.checkpointing.hf import CheckpointError, config_diff, load_hf, save_hf
from kimi_jax.checkpointing.manager import RunCheckpointer
from kimi_jax.data.samplers import PromptSampler, make_strategy
from kimi_jax.data.sft import PackedBatches, encode_example
from kimi_jax.data.tokenizer import char_tokenizer
from kimi_jax.eval.evaluate import evaluate_with_config
from kimi_jax.metrics.plots import plot_metrics
from kimi_jax.metrics.writers import JsonlWriter, MultiWriter, TensorBoardWriter, read_jsonl
from kimi_jax.model import ModelConfig
from kimi_jax.model.config import with_execution
from kimi_jax.rewards.registry import score_rollout
from kimi_jax.rollout.types import SamplingParams
from kimi_jax.rollout.replay_buffer import Group, PartialRolloutBuffer, Trajectory
from kimi_jax.sharding.rules import make_mesh
from kimi_jax.training import rl_data
from kimi_jax.training.optim import build_optimizer, build_post_update
from kimi_jax.training.rl_losses import make_policy_loss
from kimi_jax.training.rollout_backends import build_backend
from kimi_jax.training.sft import fine_tune
from kimi_jax.training.state import (TrainState, reset_opt_state, train_state_from_params,
                                     train_state_shardings)
from kimi_jax.training.steps import jit_eval, jit_step, masked_token_logprobs, rl_step
from kimi_jax.training.tasks import TEMPLATE, build_task, encode_prompt


def pad_groups(groups: list[Group], groups_per_minibatch: int, k: int) -> list[Group]:
  """Append empty finished groups so the count divides into equal minibatches."""
  missing = (-len(groups)) % groups_per_minibatch
  prompt_ids = groups[0].trajectories[0].prompt_ids
  empty = lambda: Group(-1, "", "", [Trajectory(prompt_ids, finished=True) for _ in range(k)])
  return groups + [empty() for _ in range(missing)]


class PolicyTrainer:
  """The jitted functions of one run: S_ref, rl_step, and the optimizer reset."""

  def __init__(self, mesh, shardings, model_config, rl_config, post_update):
    self.token_logprobs = jit_eval(masked_token_logprobs, mesh, shardings, config=model_config)
    self.step = jit_step(rl_step, mesh, shardings, config=model_config,
                         policy_loss=make_policy_loss(rl_config), post_update=post_update)
    self.rl = rl_config

  def train(self, state, batch: dict[str, np.ndarray]):
    """S_ref once before any update, reset, then M minibatch steps. Returns (state, metrics)."""
    batch["ref_logp"] = np.asarray(self.token_logprobs(state, batch))
    batch["ref_logp_sum"] = batch["ref_logp"].sum(axis=-1)
    state = reset_opt_state(state)
    num_minibatches = batch["tokens"].shape[0] // (self.rl.groups_per_minibatch * self.rl.k)
    minibatches = rl_data.split_minibatches(batch, self.rl.k, num_minibatches)
    step_metrics = []
    for _ in range(self.rl.epochs):
      for mb in minibatches:
        state, metrics = self.step(state, mb)
        step_metrics.append(metrics)
    new_sums = np.asarray(self.token_logprobs(state, batch)).sum(axis=-1)
    real = batch["loss_mask"].sum(-1) > 0
    metrics = {k: float(np.mean([jax.device_get(m[k]) for m in step_metrics]))
               for k in step_metrics[0]}
    # Monte-Carlo KL(pi_i || pi_new) on pi_i's own samples: E[S_ref - S_new].
    metrics["kl_prev"] = float(np.mean(batch["ref_logp_sum"][real] - new_sums[real]))
    metrics["updates"] = len(step_metrics)
    return state, metrics


def score_groups(groups: list[Group], decode, reward_by_domain, rl_config, iteration: int):
  """Rewards per trajectory (group order): registered task reward + per-group length penalty,
  plus the repetition penalty. Returns (rewards_B, correct_B, lengths_B)."""
  rows = [(g, t) for g in groups for t in g.trajectories]
  lengths_B = np.array([len(t.response_ids) for _, t in rows])
  rewards_B, correct_B = score_rollout(
      reward_by_domain, [g.domain for g, _ in rows],
      [decode(t.response_ids) for _, t in rows], [g.answer for g, _ in rows], lengths_B,
      np.array([g.group_id for g, _ in rows]), rl_config.length_penalty.weight,
      rl_config.length_penalty.warmup_iterations, iteration)
  repeated_B = np.array([t.repetition for _, t in rows])
  return rewards_B + rl_config.repetition_penalty * repeated_B, correct_B, lengths_B


def print_row(iteration: int, metrics: dict, header: bool) -> None:
  cols = [("iter", "{:>4d}", iteration), ("reward", "{:>7.3f}", metrics["reward"]),
          ("acc", "{:>6.3f}", metrics["accuracy"]), ("len", "{:>6.1f}", metrics["length_mean"]),
          ("kl_prev", "{:>9.2e}", metrics["kl_prev"]), ("tok/s", "{:>8.0f}", metrics["tokens_per_s"]),
          ("buffer", "{:>6d}", metrics["buffer_groups"]),
          ("heldout", "{:>8s}", f"{metrics['eval/pass@1']:.3f}" if "eval/pass@1" in metrics else "")]
  if header:
    tqdm.write(" ".join(f"{name:>{len(fmt.format(value))}}" for name, fmt, value in cols))
  tqdm.write(" ".join(fmt.format(value) for _, fmt, value in cols))


def build_model_config(model_cfg, tokenizer) -> ModelConfig:
  fields = {k: v for k, v in model_cfg.items() if k != "vocab_multiple"}
  vocab = -(-tokenizer.vocab_size // model_cfg.vocab_multiple) * model_cfg.vocab_multiple
  return ModelConfig(vocab_size=vocab, bos_token_id=tokenizer.bos_id,
                     eos_token_id=tokenizer.eos_id, **fields)


def backend_generate(backend, temperature: float, eos_id: int):
  """Adapt a rollout backend to collect_groups' `generate(inputs, budgets, seeds)`."""
  def generate(inputs, max_new_tokens, seeds):
    params = [SamplingParams(temperature=temperature, max_new_tokens=m, seed=s,
                             stop_token_ids=(eos_id,))
              for m, s in zip(max_new_tokens, seeds)]
    return backend.generate(inputs, params)
  return generate


def sft_warmup(config, task, tokenizer, model_config, mesh, workdir: str, params=None):
  """Long-CoT SFT warm-up on the task's reference responses, from `params` or a fresh init;
  returns trained params. Its metrics go to sft_metrics.jsonl (their own step axis)."""
  examples = [encode_example(tokenizer, TEMPLATE, p.question, task.reference_response(p))
              for p in task.train]
  batches = iter(PackedBatches(examples, config.sft.batch_size, config.sft.seq_len,
                               tokenizer.pad_id, config.seed))
  return fine_tune(config.sft, config.seed, batches, model_config, mesh,
                   os.path.join(workdir, "sft_metrics.jsonl"), params)


def load_initial_checkpoint(path: str, model_config: ModelConfig, changed_fields=(),
                            key: str = "init.checkpoint"):
  """Params of the HF checkpoint at `path` (the config field `key`), whose model config must
  equal the run's except in `changed_fields` (e.g. ("rope_theta",) when a long-context stage
  raises the RoPE base)."""
  loaded_config, params = load_hf(path)
  loaded_config = with_execution(loaded_config, dataclasses.asdict(model_config))
  unexpected = [f for f in config_diff(loaded_config, model_config) if f not in changed_fields]
  if unexpected:
    raise CheckpointError(f"config.{key}={path!r}: its model config differs from config.model "
                          f"in {unexpected} (allowed to differ: {tuple(changed_fields)})")
  return params


def initial_params(config, task, tokenizer, model_config, mesh, workdir: str):
  """Where a fresh run starts: `config.init.checkpoint` (an HF directory), or else the SFT
  warm-up, whose result is exported to `workdir/hf_sft`."""
  if config.init.checkpoint:
    return load_initial_checkpoint(config.init.checkpoint, model_config,
                                   config.init.changed_fields)
  params = sft_warmup(config, task, tokenizer, model_config, mesh, workdir)
  save_hf(os.path.join(workdir, "hf_sft"), model_config, params, tokenizer=tokenizer)
  return params


def _saved_tree(state) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _extra_state(iteration, sampler, buffer) -> dict:
  return {"iteration": iteration, "sampler": sampler.get_state(), "buffer": buffer.to_json()}


def build_basics(config, workdir: str):
  """(task, tokenizer, model config, mesh) of a run; the tokenizer is saved in `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  task = build_task(config.task, config.seed)
  tokenizer = char_tokenizer(task.charset)
  tokenizer.save(os.path.join(workdir, "tokenizer"))
  return task, tokenizer, build_model_config(config.model, tokenizer), make_mesh(**config.mesh)


def run(config, workdir: str) -> dict:
  """Train with k1.5 RL per `config`; resumes from `workdir`'s latest checkpoint."""
  validate_config(config)
  rl = config.rl
  task, tokenizer, model_config, mesh = build_basics(config, workdir)
  tx = build_optimizer(config.optimizer)
  abstract, shardings = train_state_shardings(model_config, tx, mesh)
  checkpointer = RunCheckpointer(os.path.join(workdir, "checkpoints"), config.checkpoint.keep,
                                 config.checkpoint.async_save)
  sampler = iter(PromptSampler(task.train, make_strategy(config.sampler), rl.prompts_per_iteration,
                               config.seed, ema_rate=config.sampler.ema_rate))
  latest = checkpointer.latest_step()
  writer = build_writer(config, workdir, truncate_after=latest)

  if latest is None:
    params = initial_params(config, task, tokenizer, model_config, mesh, workdir)
    state, _ = train_state_from_params(model_config, tx, mesh, params)
    buffer, start = PartialRolloutBuffer(), 0
  else:
    restored, extra = checkpointer.restore(latest, _saved_tree(abstract), _saved_tree(shardings))
    state = TrainState(tx=tx, **restored)
    sampler.set_state(extra["sampler"])
    buffer, start = PartialRolloutBuffer.from_json(extra["buffer"]), extra["iteration"]
    tqdm.write(f"resumed from checkpoint {latest} (iteration {start})")
  backend = build_backend(config, model_config, tokenizer, state.params, str(start), workdir)
  if latest is None:  # the starting policy (SFT or init checkpoint), compared in summary.json
    writer.write(0, evaluate_with_config(backend, tokenizer, task, task.heldout,
                                         config.eval).as_dict("start"))
    checkpointer.save(0, _saved_tree(state), _extra_state(0, sampler, buffer))

  trainer = PolicyTrainer(mesh, shardings, model_config, rl,
                          build_post_update(config.optimizer))
  generate = backend_generate(backend, rl.temperature, tokenizer.eos_id)
  limits = rl_data.RolloutLimits(rl.max_response_tokens, rl.segment_tokens,
                                rl.repetition_ngram, rl.repetition_count)
  seq_len = config.rollout.max_seq_len
  for iteration in tqdm(range(start, rl.iterations), desc="rl", initial=start, total=rl.iterations):
    metrics, state = rl_iteration(iteration, state, trainer, generate, sampler, buffer, task,
                                  tokenizer, limits, seq_len, config)
    t0 = time.perf_counter()
    backend.sync(state.params, str(iteration + 1))
    metrics["time/sync"] = time.perf_counter() - t0
    if (iteration + 1) % config.eval.every == 0 or iteration + 1 == rl.iterations:
      metrics.update(evaluate_with_config(backend, tokenizer, task, task.heldout,
                                          config.eval).as_dict("eval"))
    writer.write(iteration + 1, metrics)
    print_row(iteration + 1, metrics, header=iteration == start)
    if (iteration + 1) % config.checkpoint.every == 0 or iteration + 1 == rl.iterations:
      checkpointer.save(iteration + 1, _saved_tree(state),
                        _extra_state(iteration + 1, sampler, buffer))
  checkpointer.close()
  writer.close()
  backend.close()
  save_hf(os.path.join(workdir, "hf"), model_config, state.params, tokenizer=tokenizer)
  return write_summary(workdir)


def request_seed_base(seed: int, iteration: int) -> int:
  return int(np.random.SeedSequence([seed, iteration]).generate_state(1)[0]) % (1 << 30)


def rollout_metrics(groups: list[Group], rewards_B, correct_B, lengths_B) -> dict:
  trajectories = [t for g in groups for t in g.trajectories]
  logprobs = np.concatenate([np.asarray(t.logprobs) for t in trajectories]) if trajectories else np.zeros(1)
  return {
      "reward": float(np.mean(rewards_B)), "accuracy": float(np.mean(correct_B)),
      "length_mean": float(np.mean(lengths_B)), "length_p50": float(np.median(lengths_B)),
      "length_p90": float(np.percentile(lengths_B, 90)), "length_max": int(np.max(lengths_B)),
      "lengths": np.asarray(lengths_B),
      "repetition_frac": float(np.mean([t.repetition for t in trajectories])),
      "truncated_frac": float(np.mean([t.finish_reason["type"] == "length" for t in trajectories])),
      "multi_segment_frac": float(np.mean([t.num_segments > 1 for t in trajectories])),
      # Sampled-token negative log-prob: an entropy estimate (exact in expectation at T=1).
      "entropy": float(-np.mean(logprobs)),
  }


def rl_iteration(iteration, state, trainer, generate, sampler, buffer, task, tokenizer, limits,
                 seq_len, config):
  """One k1.5 iteration from prompts to updated params. Returns (metrics, state)."""
  rl = config.rl
  t0 = time.perf_counter()
  prompts = next(sampler)
  groups = rl_data.new_groups(prompts, lambda q: encode_prompt(tokenizer, q), rl.k,
                              iteration * rl.prompts_per_iteration, iteration)
  complete, new_tokens = rl_data.collect_groups(generate, groups, buffer, limits, iteration,
                                                request_seed_base(config.seed, iteration))
  t1 = time.perf_counter()
  metrics = {"complete_groups": len(complete), "buffer_groups": len(buffer),
             "tokens_per_s": new_tokens / max(t1 - t0, 1e-9), "time/rollout": t1 - t0}
  if not complete:
    return metrics, state
  rewards_B, correct_B, lengths_B = score_groups(complete, tokenizer.decode, task.reward_by_domain,
                                                 rl, iteration)
  t2 = time.perf_counter()
  padded = pad_groups(complete, rl.groups_per_minibatch, rl.k)
  pad_rows = (len(padded) - len(complete)) * rl.k
  batch = rl_data.build_rl_batch(padded, np.concatenate([rewards_B, np.zeros(pad_rows)]), seq_len,
                                 tokenizer.pad_id, rl.train_old_segments)
  state, train_metrics = trainer.train(state, batch)
  sampler.update([g.prompt_id for g in complete for _ in g.trajectories], correct_B)
  metrics.update(rollout_metrics(complete, rewards_B, correct_B, lengths_B))
  metrics.update(train_metrics)
  metrics.update({"time/reward": t2 - t1, "time/train": time.perf_counter() - t2})
  return metrics, state


def build_writer(config, workdir: str, truncate_after: int | None):
  writers = [JsonlWriter(os.path.join(workdir, "metrics.jsonl"), truncate_after=truncate_after)]
  if config.metrics.tensorboard:
    writers.append(TensorBoardWriter(os.path.join(workdir, "tensorboard")))
  return MultiWriter(writers)


PLOT_KEYS = ["reward", "accuracy", "eval/pass@1", "length_mean", "kl_prev", "entropy",
             "grad_norm", "tokens_per_s", "buffer_groups"]


def write_summary(workdir: str) -> dict:
  """summary.json (starting policy vs final held-out eval) and the RL curves plot, both from
  metrics.jsonl."""
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  summary = {}
  for record in records:  # later records win: the last eval after RL
    summary.update({k: v for k, v in record.items() if k.startswith(("start/", "eval/"))})
  rl_records = [r for r in records if "reward" in r or "eval/pass@1" in r]
  if rl_records:
    plot_metrics(rl_records, PLOT_KEYS, os.path.join(workdir, "rl_curves.png"), title="k1.5 RL",
                 x_key="step")
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  tqdm.write("summary: " + ", ".join(f"{k}={v:.3f}" for k, v in summary.items()
                                     if k.endswith("pass@1") or k.endswith("mean_tokens")))
  return summary


def validate_config(config) -> None:
  """Fail at start with the offending key rather than deep inside the loop."""
  rl = config.rl
  checks = [
      ("rl.tau", rl.tau > 0, "must be > 0"),
      ("rl.k", rl.k >= 2, "needs >= 2 samples per prompt for a group baseline"),
      ("rl.iterations", rl.iterations >= 0, "must be >= 0 (0: SFT warm-up only)"),
      ("rl.segment_tokens", 0 < rl.segment_tokens <= rl.max_response_tokens,
       "must be in (0, rl.max_response_tokens]"),
      ("rl.groups_per_minibatch", rl.groups_per_minibatch >= 1, "must be >= 1"),
      ("rl.temperature", rl.temperature > 0, "must be > 0 for on-policy sampling"),
      ("rollout.max_seq_len", config.rollout.max_seq_len >= rl.max_response_tokens + 1,
       "must exceed rl.max_response_tokens (prompt + response must fit)"),
      ("eval.k", 1 <= config.eval.k <= config.eval.samples, "must be in [1, eval.samples]"),
      ("eval.temperature", config.eval.samples == 1 or config.eval.temperature > 0,
       "must be > 0 when eval.samples > 1"),
  ]
  for key, ok, why in checks:
    if not ok:
      raise ValueError(f"config.{key}={_lookup(config, key)!r}: {why}")


def _lookup(config, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value
