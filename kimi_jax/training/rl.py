"""The k1.5 synchronous RL loop, read top-down.

`run` sets a run up and loops over steps; each step is one `rl_iteration`: prompts -> k samples
per prompt on the rollout backend -> rewards (+ length penalty) -> `PolicyTrainer.train`
(S_ref, optimizer reset, M minibatch steps of `steps.rl_grads` + `apply_grads` on the policy
loss of `losses/`) -> weight sync -> sampler feedback; then metrics, eval and checkpoints every N
steps and at the end. An iteration whose groups all wait in the partial-rollout buffer trains
nothing and still writes a full metrics row (NaN where there is nothing to measure).
Everything configurable arrives in `config` (experiments/rl_*.py).
"""
import contextlib
import gc
import json
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from kimi_jax.checkpointing.manager import RunCheckpointer
from kimi_jax.data.images import run_image_processing
from kimi_jax.data.samplers import PromptSampler, make_strategy, mix_domains
from kimi_jax.eval.evaluate import evaluate_with_config
from kimi_jax.losses.mirror_descent import BASELINES
from kimi_jax.metrics.plots import plot_metrics
from kimi_jax.metrics.writers import read_jsonl
from kimi_jax.rewards.registry import REGISTRY, RewardRegistry
from kimi_jax.rollout.backends import BACKENDS, build_backend
from kimi_jax.rollout.partial import PartialRolloutBuffer, RolloutLimits, collect_groups, new_groups
from kimi_jax.rollout.types import SamplingParams
from kimi_jax.training import multihost, rl_data, rl_layout
from kimi_jax.training.optim import build_optimizer, build_post_update, optimizer_checks
from kimi_jax.training.rl_losses import LOSSES, make_policy_loss
from kimi_jax.training.run_rewards import build_run_rewards
from kimi_jax.training.scoring import (GroupScores, RowFacts, rollout_metrics, sample_rows,
                                       score_groups, write_samples)
from kimi_jax.training.setup import (BASIC_SECTIONS, build_basics, build_writer, check,
                                     eval_checks, every_or_final, is_int, is_number,
                                     load_initial_checkpoint)
from kimi_jax.training.sft import sft_warmup
from kimi_jax.training.state import (TrainState, reset_opt_state, train_state_from_params,
                                     train_state_shardings)
from kimi_jax.training.steps import (batch_sharding, batch_shards, jit_eval, jit_rl_programs,
                                     masked_rl_token_logprobs)
from kimi_jax.training.workdir import CHECKPOINTS, RunDirectory


def run(config, workdir: str) -> dict:
  """Train with k1.5 RL per `config`; resumes from the newest readable checkpoint in
  `config.checkpoint.directory` (default `workdir`/checkpoints). Both may be remote
  (`etils.epath` URIs such as gs://...; `training.workdir`).

  The whole config is checked before any work; pending checkpoint saves are waited for, and a
  remote workdir synced, on every exit, errors included."""
  validate_config(config)
  with RunDirectory(workdir) as run_dir:
    return run_in(config, run_dir)


def run_in(config, run_dir: RunDirectory) -> dict:
  """`run` in an open run directory (a stage that also writes other files there: long2short)."""
  checkpoints = config.checkpoint.directory or run_dir.path / CHECKPOINTS
  with RunCheckpointer(checkpoints, config.checkpoint.keep,
                       config.checkpoint.async_save) as checkpointer:
    return _run(config, run_dir, checkpointer)


def _run(config, run_dir: RunDirectory, checkpointer: RunCheckpointer) -> dict:
  rl = config.rl
  workdir = run_dir.local
  task, tokenizer, model_config, mesh = build_basics(config, workdir)
  rewards = build_run_rewards(config, task.reward_by_domain.values(), workdir)
  tx = build_optimizer(config.optimizer)
  abstract, shardings = train_state_shardings(model_config, tx, mesh)
  strategy = mix_domains(make_strategy(config.sampler), task.train, task.weight_by_domain)
  sampler = iter(PromptSampler(task.train, strategy, rl.prompts_per_iteration,
                               config.seed, ema_rate=config.sampler.ema_rate))
  resumed = checkpointer.restore_latest(_saved_tree(abstract), _saved_tree(shardings), tqdm.write)
  latest = None if resumed is None else resumed[0]
  writer = build_writer(config, workdir, truncate_after=latest)

  if resumed is None:
    params = initial_params(config, task, tokenizer, model_config, mesh, workdir)
    state, _ = train_state_from_params(model_config, tx, mesh, params)
    buffer, step = PartialRolloutBuffer(), 0
  else:
    _, restored, extra = resumed
    state = TrainState(tx=tx, **restored)
    sampler.set_state(extra["sampler"])
    buffer, step = process_buffer(extra["buffers"]), extra["iteration"]
    tqdm.write(f"resumed from checkpoint {latest} (step {step})")
  backend = build_backend(config, model_config, tokenizer, multihost.addressable(state.params),
                          str(step), workdir)
  if latest is None:  # the starting policy (SFT or init checkpoint), compared in summary.json
    writer.write(0, evaluate_with_config(backend, tokenizer, task, task.heldout, config.eval,
                                         rewards.registry).as_dict("start"))
    checkpointer.save(0, _saved_tree(state), _extra_state(0, sampler, buffer))

  row_images = (None if model_config.vision is None else rl_data.RowImages.for_prompts(
      task.train, model_config.vision, run_image_processing(config)))
  trainer = PolicyTrainer(mesh, shardings, model_config, rl, build_post_update(config.optimizer),
                          row_images)
  sampling = SamplingParams(temperature=rl.temperature, stop_token_ids=tuple(tokenizer.eos_ids))
  with frozen_setup_objects(), tqdm(desc="rl", initial=step, total=rl.iterations) as bar:
    while step < rl.iterations:
      state, metrics = rl_iteration(state, step, trainer, backend, sampling, sampler, buffer,
                                    task, tokenizer, config, workdir, rewards.registry)
      step += 1  # the policy now has version `step`
      t0 = time.perf_counter()
      if config.rollout.colocate:
        backend.resume()
      backend.sync(multihost.addressable(state.params), str(step))
      metrics["time/sync"] = time.perf_counter() - t0
      if every_or_final(step, config.eval.every, rl.iterations):
        metrics.update(evaluate_with_config(backend, tokenizer, task, task.heldout, config.eval,
                                            rewards.registry).as_dict("eval"))
      writer.write(step, metrics)
      run_dir.sync()
      print_row(step, metrics, header=bar.n == bar.initial)
      if every_or_final(step, config.checkpoint.every, rl.iterations):
        checkpointer.save(step, _saved_tree(state), _extra_state(step, sampler, buffer))
      bar.update()
  writer.close()
  backend.close()
  rewards.close()
  multihost.save_hf_from_main(os.path.join(workdir, "hf"), model_config, state.params,
                              tokenizer=tokenizer)
  return write_summary(workdir) if multihost.is_main_process() else {}


def rl_iteration(state, step: int, trainer, backend, sampling, sampler, buffer, task, tokenizer,
                 config, workdir: str, registry: RewardRegistry = REGISTRY):
  """One k1.5 iteration from prompts to updated params, sampled by policy version `step` and
  scored by the task rewards in `registry`. Returns (state, metrics).

  Each process rolls out, scores and trains on its own slices of the prompts (`rl_layout`):
  processes exchange only per-row facts (rewards, lengths, ids), never token ids or text."""
  rl = config.rl
  t0 = time.perf_counter()
  processing = run_image_processing(config)
  encode = lambda p: task.prompt_inputs(tokenizer, p, processing).ids
  # This process's slice of the iteration's prompts, with global group ids.
  groups = new_groups(next(sampler), encode, rl.k, step * rl.prompts_per_iteration
                      + multihost.process_offset(rl.prompts_per_iteration), step)
  limits = RolloutLimits(rl.max_response_tokens, rl.segment_tokens, rl.repetition_ngram,
                         rl.repetition_count)
  complete, new_tokens = collect_groups(backend, sampling, groups, buffer, limits, step,
                                        request_seed_base(config.seed, step))
  complete = sorted(complete, key=lambda g: g.group_id)
  metrics = {"memory/rollout_bytes": live_device_bytes()}
  if config.rollout.colocate:  # hybrid deployment: the trainer gets the rollout's memory
    backend.release()
  t1 = time.perf_counter()
  scores = (score_groups(complete, tokenizer.decode, task.reward_by_domain, rl, step, registry)
            if complete else GroupScores.empty())
  rows = rl_data.build_rl_batch(complete, scores.rewards, config.rollout.max_seq_len,
                                tokenizer.pad_id, rl.train_old_segments)
  local_facts = RowFacts.of(complete, scores, rl_data.counted_ends(rows["loss_mask"]))
  gathered = multihost.allgather_objects((local_facts, len(buffer), new_tokens))
  facts = RowFacts.merged([f for f, _, _ in gathered])
  metrics.update({"complete_groups": len(facts) // rl.k,
                  "buffer_groups": sum(b for _, b, _ in gathered),
                  "tokens_per_s": sum(n for *_, n in gathered) / max(t1 - t0, 1e-9),
                  "time/rollout": t1 - t0})
  if multihost.is_main_process():  # its own slices' groups (all of them with one process)
    write_samples(workdir, step, sample_rows(
        complete, scores, lambda ids: tokenizer.decode(ids, skip_special_tokens=False)))
  metrics.update(rollout_metrics(facts, task.reward_by_domain))
  if not len(facts):  # every group waits in the partial-rollout buffer
    metrics.update(trainer.nan_metrics(state, rl.groups_per_minibatch * rl.k))
    metrics.update({"time/reward": 0.0, "time/train": 0.0,
                    "memory/train_bytes": live_device_bytes()})
    return state, metrics
  t2 = time.perf_counter()
  minibatches = trainer.minibatches(rows, complete, facts.group_id, facts.counted_end,
                                    tokenizer.pad_id)
  state, train_metrics = trainer.train(state, minibatches)
  sampler.update(list(facts.prompt_id), facts.correct)
  metrics.update(train_metrics)
  metrics.update({"time/reward": t2 - t1, "time/train": time.perf_counter() - t2,
                  "memory/train_bytes": live_device_bytes()})
  return state, metrics


@contextlib.contextmanager
def frozen_setup_objects():
  """Within the block Python's cycle collector skips every object alive at its start (the
  run's set-up: compiled programs, data, model), so `live_device_bytes`' full collection scans
  only what the iterations create: ~0.4 s -> ~4 ms per call with ~500k set-up objects."""
  gc.collect()
  gc.freeze()
  try:
    yield
  finally:
    gc.unfreeze()


def live_device_bytes() -> int:
  """Bytes of all live JAX arrays (every device): what a phase holds at its end. Unreachable
  arrays still waiting for Python's cycle collector are collected first, so the number does
  not depend on when the collector last ran."""
  gc.collect()
  return sum(x.nbytes for x in jax.live_arrays())


class PolicyTrainer:
  """The jitted programs of one run (the policy-loss gradient, which also gives S_ref, the
  optimizer step, the log-probs forward for the KL metric) and the batch layout that turns this
  process's rows into its blocks of the minibatches."""

  def __init__(self, mesh, shardings, model_config, rl_config, post_update,
               row_images: rl_data.RowImages | None = None):
    self.row_images = row_images  # a vision-language model's batch rows take their images
    self.token_logprobs = jit_eval(masked_rl_token_logprobs, mesh, shardings,
                                   config=model_config)
    self.grads, self.apply = jit_rl_programs(mesh, shardings, model_config,
                                             make_policy_loss(rl_config), post_update)
    self.rl = rl_config
    self.batch_sharding = batch_sharding(mesh)
    self.layout = rl_layout.Layout(
        rl_config.k, rl_config.groups_per_minibatch, rl_config.prompts_per_iteration,
        rl_config.batch_slices or jax.process_count(), batch_shards(mesh),
        pack=row_images is None)
    self.slices = self.layout.owned_slices(jax.process_index(), jax.process_count())

  def minibatches(self, rows: dict[str, np.ndarray], complete: list, group_id_B: np.ndarray,
                  end_B: np.ndarray, pad_id: int) -> list[dict]:
    """The iteration's minibatches (`rl_layout`) of the rows `group_id_B` (k per group, group-id
    order) that end their counted tokens at `end_B`, each field a global array of which this
    process builds only its block, from `rows` (`build_rl_batch` of its `complete` groups)."""
    images = self.row_images.row_inputs(complete) if self.row_images is not None else (None,) * 2
    local = rl_layout.LocalRows.of(rows, [g.group_id for g in complete], group_id_B, self.rl.k,
                                   *images)
    plans = rl_layout.plan_minibatches(self.layout, self.layout.slice_of(group_id_B[::self.rl.k]),
                                       end_B, rows["loss_mask"].shape[1])
    return [multihost.global_from_rows(rl_layout.process_block(
        plan, self.layout, local, self.slices, pad_id, self.row_images), self.batch_sharding)
            for plan in plans]

  def train(self, state, minibatches: list[dict]):
    """S_ref once before any update, reset, then M minibatch steps. Returns (state, metrics).

    The reference log-probs come from the gradient program itself, run at pi_theta_i (a
    gradient pass per minibatch, the price of the first update's loss seeing exactly
    S - S_ref = 0). The first minibatch's update runs at pi_theta_i, so it is its own
    reference pass; minibatches run longest groups first, so that pass saved is the costliest."""
    # Each process keeps the reference log-probs of its own rows only (`local_rows`): no host
    # holds the whole batch's.
    global_rows = lambda mb, logp: multihost.global_rows(
        multihost.local_rows(logp), self.batch_sharding, mb["loss_mask"].shape[0])
    for mb in minibatches[1:]:
      mb["ref_logp"] = global_rows(mb, self.grads(state, mb)[1]["logp_BxT"])
    state = reset_opt_state(state)
    step_metrics = []
    for epoch in range(self.rl.epochs):
      for i, mb in enumerate(minibatches):
        first = epoch == 0 and i == 0
        grads, metrics = self.grads(state, {**mb, "ref_is_own": np.full(len(mb["rewards"]),
                                                                          first)})
        if first:
          mb["ref_logp"] = global_rows(mb, metrics["logp_BxT"])
        state, metrics = self.apply(state, grads, metrics)
        step_metrics.append(metrics)
    new_logp = [multihost.local_rows(self.token_logprobs(state, mb)) for mb in minibatches]
    step_metrics = jax.device_get(step_metrics)  # one transfer for every minibatch's metrics
    metrics = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}
    masks = [multihost.local_rows(mb["loss_mask"]) for mb in minibatches]
    old_logp = [multihost.local_rows(mb["ref_logp"]) for mb in minibatches]  # pi_theta_i's
    metrics["kl_prev"] = k3_kl(*(np.concatenate([lp[mask > 0] for lp, mask in zip(logp, masks)])
                                 for logp in (old_logp, new_logp)))
    metrics["updates"] = len(step_metrics)
    return state, metrics

  def nan_metrics(self, state, rows: int) -> dict:
    """`train`'s metric names with NaN values: the row of an iteration with nothing to train."""
    tokens = np.zeros((rows, 2), np.int32)
    dummy = {"tokens": tokens, "targets": tokens, "loss_mask": np.zeros((rows, 2), np.float32),
             "ref_logp": np.zeros((rows, 2), np.float32), "ref_is_own": np.zeros(rows, bool),
             "unpack_index": np.arange(rows * 2, dtype=np.int32).reshape(rows, 2),
             "rewards": np.zeros(rows, np.float32),
             "group_ids": np.zeros(rows, np.int32)}
    if self.row_images is not None:  # rows without images, shaped like the real ones
      dummy.update(self.row_images.fields([None] * rows, [0] * rows, tokens))
    grads = jax.eval_shape(self.grads.jitted, state, dummy)  # shapes only: no global batch
    _, step_metrics = jax.eval_shape(self.apply, state, *grads)
    return {k: float("nan") for k in [*step_metrics, "kl_prev", "updates"]}


def k3_kl(old_logp_N, new_logp_N) -> float:
  """KL(pi_old || pi_new) per token on pi_old's own samples (the N counted tokens; each
  process passes its own rows' and the mean is over every process's), with the non-negative
  estimator k3 = (r - 1) - log r, r = pi_new / pi_old (Schulman 2020)."""
  log_r = (np.asarray(new_logp_N, np.float64) - np.asarray(old_logp_N, np.float64))
  sums = multihost.allgather_objects((np.sum(np.expm1(log_r) - log_r), log_r.size))
  count = sum(n for _, n in sums)
  return float(sum(s for s, _ in sums) / count) if count else float("nan")


def initial_params(config, task, tokenizer, model_config, mesh, workdir: str):
  """Where a fresh run starts: `config.init.checkpoint` (an HF directory), or else the SFT
  warm-up, whose result is exported to `workdir/hf_sft`."""
  if config.init.checkpoint:
    return load_initial_checkpoint(config.init.checkpoint, model_config,
                                   config.init.changed_fields)
  params = sft_warmup(config, task, tokenizer, model_config, mesh, workdir)
  multihost.save_hf_from_main(os.path.join(workdir, "hf_sft"), model_config, params,
                              tokenizer=tokenizer)
  return params


def request_seed_base(seed: int, step: int) -> int:
  return int(np.random.SeedSequence([seed, step]).generate_state(1)[0]) % (1 << 30)


def _saved_tree(state) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _extra_state(step, sampler, buffer) -> dict:
  """The JSON a checkpoint keeps besides the train state (a collective: every process calls
  it): the sampler (the same on every process) and each process's partial-rollout buffer."""
  return {"iteration": step, "sampler": sampler.get_state(),
          "buffers": multihost.allgather_objects(buffer.to_json())}


def process_buffer(buffers: list) -> PartialRolloutBuffer:
  """This process's partial-rollout buffer from a checkpoint's per-process buffers."""
  if len(buffers) != jax.process_count():
    raise ValueError(f"the checkpoint holds the partial-rollout buffers of {len(buffers)} "
                     f"processes; resume it with that many processes, not {jax.process_count()}")
  return PartialRolloutBuffer.from_json(buffers[jax.process_index()])


def print_row(step: int, metrics: dict, header: bool) -> None:
  cols = [("iter", "{:>4d}", step), ("reward", "{:>7.3f}", metrics["reward"]),
          ("acc", "{:>6.3f}", metrics["accuracy"]), ("len", "{:>6.1f}", metrics["length_mean"]),
          ("kl_prev", "{:>9.2e}", metrics["kl_prev"]), ("tok/s", "{:>8.0f}", metrics["tokens_per_s"]),
          ("buffer", "{:>6d}", metrics["buffer_groups"]),
          ("heldout", "{:>8s}", f"{metrics['eval/pass@1']:.3f}" if "eval/pass@1" in metrics else "")]
  if header:
    tqdm.write(" ".join(f"{name:>{len(fmt.format(value))}}" for name, fmt, value in cols))
  tqdm.write(" ".join(fmt.format(value) for _, fmt, value in cols))


PLOT_KEYS = ["reward", "accuracy", "eval/pass@1", "length_mean", "kl_prev", "entropy",
             "grad_norm", "tokens_per_s", "buffer_groups"]


def curve_records(records: list[dict]) -> list[dict]:
  """The metrics rows the RL curves plot: every iteration's, with the starting policy's eval
  ("start/..." at step 0) renamed "eval/..." so held-out curves begin at the SFT policy."""
  start = lambda r: {"step": r["step"], **{"eval/" + k.removeprefix("start/"): v
                                           for k, v in r.items() if k.startswith("start/")}}
  return [start(r) if "start/pass@1" in r else r for r in records
          if "reward" in r or "eval/pass@1" in r or "start/pass@1" in r]


def write_summary(workdir: str) -> dict:
  """summary.json (starting policy vs final held-out eval) and the RL curves plot, both from
  metrics.jsonl."""
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  summary = {}
  for record in records:  # later records win: the last eval after RL
    summary.update({k: v for k, v in record.items() if k.startswith(("start/", "eval/"))})
  rl_records = curve_records(records)
  if rl_records:
    plot_metrics(rl_records, PLOT_KEYS, os.path.join(workdir, "rl_curves.png"), title="k1.5 RL",
                 x_key="step")
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  tqdm.write("summary: " + ", ".join(f"{k}={v:.3f}" for k, v in summary.items()
                                     if k.endswith("pass@1") or k.endswith("mean_tokens")))
  return summary


# The tau term (tau/2)(S - S_ref)^2 has curvature tau |grad S|^2 along the step, so plain SGD
# overshoots once learning_rate * tau is large: the per-iteration KL then grows with tau.
# Measured on the arithmetic task (one iteration's batch, 4 epochs, clip 1.0): monotone up to
# lr * tau = 3.5e-3 on one SFT model and 1.5e-3 on another, non-monotone from 5e-3 on both.
SGD_MAX_LR_TAU = 2e-3


SECTIONS = BASIC_SECTIONS + ("init", "sft", "optimizer", "rl", "sampler", "rollout", "eval",
                             "checkpoint")


def validate_config(config) -> None:
  """Fail at start naming the offending dotted key rather than deep inside the loop."""
  check(config, _checks(config))


def _checks(config):
  """(dotted key, ok, why) in order, each evaluated only once the ones before it passed."""
  rl = config.rl
  yield ("rl.tau", is_number(rl.tau) and rl.tau > 0, "must be a number > 0")
  yield ("rl.k", is_int(rl.k) and rl.k >= 2,
         "must be an int >= 2 (samples per prompt, for a group baseline)")
  yield ("rl.iterations", is_int(rl.iterations) and rl.iterations >= 0,
         "must be an int >= 0 (0: SFT warm-up only)")
  yield ("rl.max_response_tokens", is_int(rl.max_response_tokens) and rl.max_response_tokens >= 1,
         "must be an int >= 1")
  yield ("rl.segment_tokens", is_int(rl.segment_tokens)
         and 0 < rl.segment_tokens <= rl.max_response_tokens,
         "must be an int in (0, rl.max_response_tokens]")
  yield ("rl.groups_per_minibatch",
         is_int(rl.groups_per_minibatch) and rl.groups_per_minibatch >= 1, "must be an int >= 1")
  yield ("rl.batch_slices", is_int(rl.batch_slices) and rl.batch_slices >= 0,
         "must be an int >= 0 (0: one slice per process)")
  processes = jax.process_count()
  slices = rl.batch_slices or processes
  yield ("rl.batch_slices", slices % processes == 0,
         f"must be a multiple of the {processes} processes (each owns whole slices)")
  for name in ("prompts_per_iteration", "groups_per_minibatch"):
    yield (f"rl.{name}", is_int(rl[name]) and rl[name] % slices == 0,
           f"must split into {slices} equal batch slices (rl.batch_slices; 0: one per process)")
  yield ("rl.temperature", is_number(rl.temperature) and rl.temperature > 0,
         "must be > 0 for on-policy sampling")
  yield ("rl.loss", rl.loss in LOSSES, f"expected one of {LOSSES}")
  yield ("rl.baseline", rl.baseline in BASELINES, f"expected one of {BASELINES}")
  yield from optimizer_checks(config.optimizer, "optimizer")
  yield from optimizer_checks(config.sft.optimizer, "sft.optimizer")
  yield ("rl.tau", not (rl.loss == "mirror_descent" and config.optimizer.name == "sgd")
         or rl.tau * config.optimizer.learning_rate <= SGD_MAX_LR_TAU,
         f"with SGD, optimizer.learning_rate * rl.tau = "
         f"{config.optimizer.learning_rate * rl.tau:.3g} must be <= {SGD_MAX_LR_TAU}: above it "
         "the tau term overshoots S_ref and larger tau moves the policy more, not less")
  yield ("rollout.max_seq_len", is_int(config.rollout.max_seq_len)
         and config.rollout.max_seq_len >= rl.max_response_tokens + 1,
         "must exceed rl.max_response_tokens (prompt + response must fit)")
  yield ("rollout.backend", config.rollout.backend in BACKENDS, f"expected one of {BACKENDS}")
  yield ("rollout.urls", config.rollout.backend != "sglang" or bool(config.rollout.urls),
         "the sglang backend needs server URLs")
  yield ("checkpoint.every", is_int(config.checkpoint.every) and config.checkpoint.every >= 1,
         "must be an int >= 1")
  yield ("checkpoint.keep", is_int(config.checkpoint.keep) and config.checkpoint.keep >= 1,
         "must be an int >= 1")
  yield from eval_checks(config)
