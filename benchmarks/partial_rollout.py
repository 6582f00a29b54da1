"""Whole RL iteration wall time with and without partial rollouts (k1.5 2.6.2).

Each timed iteration is the real `rl.rl_iteration` (prompts from the sampler, rollouts through
`collect_groups`, scoring by the reward registry, S_ref, optimizer reset and the minibatch
steps of `PolicyTrainer`) followed by the weight sync, on the tiny arithmetic config. Response
lengths are planted from a heavy-tailed mix (lognormal: `--median`, `--sigma`, capped at
`--max_response`): the backend samples with the real engine and stops each trajectory at its
planted length, exactly (end-of-sequence does not stop it). The default regime is long CoT's
shape at toy scale: most responses short (median 16 tokens), a heavy tail (sigma 1.3: 1 in 20
beyond 140 tokens; the longest of an iteration's 64 ~320 in the median) up to a cap 31x the
median, and a segment of 32 tokens per iteration (1/16 of the cap). Without partial rollouts
every iteration waits for its longest response; with them each trajectory gets at most
`--segment` tokens per iteration and unfinished groups resume from the buffer (re-prefilled
with the new weights). Both modes start from the same weights, see the same prompt stream
(uniform sampling) and the same planted lengths, and train every trajectory once with the same
trainer; the engine and the trainer (one program per minibatch length bucket and packed row
count) are compiled before timing. Untimed first iterations: 1 (full), and for partial the
pipeline fill, max_response / segment iterations, during which fewer and shorter groups
complete than in the steady state. Prints per mode the mean iteration time and its rollout /
scoring / training / sync parts, the groups trained, decode steps and prefilled prompt tokens
per iteration, then the ratio of mean times (goal <= 0.6) and the ratio per trained group.
Run: .venv/bin/python benchmarks/partial_rollout.py   (`measure()` for `make bench`)
"""
import dataclasses
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.rl_arith import get_config  # noqa: E402
from kimi_jax.data.samplers import PromptSampler, make_strategy  # noqa: E402
from kimi_jax.model import init_params  # noqa: E402
from kimi_jax.rollout.backends import EngineBackend  # noqa: E402
from kimi_jax.rollout.engine import RolloutEngine  # noqa: E402
from kimi_jax.rollout.partial import PartialRolloutBuffer  # noqa: E402
from kimi_jax.rollout.types import SamplingParams, stop_reason  # noqa: E402
from kimi_jax.training import rl  # noqa: E402
from kimi_jax.training.optim import build_optimizer, build_post_update  # noqa: E402
from kimi_jax.training.setup import build_basics  # noqa: E402
from kimi_jax.training.state import train_state_from_params  # noqa: E402

ITERATIONS = flags.DEFINE_integer("iterations", 10, "timed RL iterations per mode")
PROMPTS = flags.DEFINE_integer("prompts", 16, "new prompts per iteration")
K = flags.DEFINE_integer("k", 4, "samples per prompt")
MAX_RESPONSE = flags.DEFINE_integer("max_response", 496, "response cap over all segments")
SEGMENT = flags.DEFINE_integer("segment", 32, "tokens per trajectory per iteration (partial)")
MEDIAN = flags.DEFINE_float("median", 16.0, "median planted response length (tokens)")
SIGMA = flags.DEFINE_float("sigma", 1.3, "lognormal sigma of the planted lengths (tail weight)")


class PlantedLengths(EngineBackend):
  """The engine's samples, each trajectory stopped at a length drawn for it when it starts
  (lognormal, seeded per iteration); a resumed request is recognised by its tokens so far."""

  def __init__(self, engine, max_response: int, median: float, sigma: float):
    self.engine, self.max_response = engine, max_response
    self.median, self.sigma = median, sigma
    self.remaining_of: dict[tuple, int] = {}  # tokens so far -> tokens still to generate
    self.iteration = 0

  def generate(self, requests, sampling, images=None):
    del images  # text-only prompts
    rng = np.random.default_rng(self.iteration)
    remaining = [self.remaining_of.pop(tuple(request), None) for request in requests]
    remaining = [int(np.clip(rng.lognormal(np.log(self.median), self.sigma), 4,
                             self.max_response))
                 if r is None else r for r in remaining]
    sampling = [dataclasses.replace(s, max_new_tokens=min(s.max_new_tokens, r), ignore_eos=True,
                                    stop_token_ids=()) for s, r in zip(sampling, remaining)]
    completions = self.engine.generate(requests, sampling)
    for request, completion, left in zip(requests, completions, remaining):
      left -= len(completion.output_ids)
      if left == 0:
        completion.finish_reason = stop_reason("planted")
      else:
        self.remaining_of[tuple(request) + tuple(completion.output_ids)] = left
    return completions


def bench_config(max_response: int, segment: int, prompts: int, k: int):
  """The tiny arithmetic config (its engine batch of 128 rows), uniform prompt sampling so both
  modes see one prompt stream, no repetition stop or length penalty (lengths are planted)."""
  config = get_config("tiny")
  with config.unlocked():
    config.rl.update(max_response_tokens=max_response, segment_tokens=segment,
                     prompts_per_iteration=prompts, k=k, groups_per_minibatch=4,
                     repetition_ngram=0, repetition_count=0, length_penalty={"weight": 0.0})
    config.sampler.strategy = "uniform"
    config.rollout.max_seq_len = max_response + 16
  return config


def run_mode(config, params, tx, trainer, backend, workdir, warmup: int,
             iterations: int) -> dict[str, float]:
  """Means per timed iteration (after `warmup` untimed ones): seconds (all of it) and its
  rollout / reward / train / sync parts, groups trained, decode steps and prefilled tokens."""
  task, tokenizer, model_config, mesh = build_basics(config, workdir)
  state, _ = train_state_from_params(model_config, tx, mesh, params)
  backend.sync(state.params, "0")
  backend.remaining_of.clear()
  sampler = iter(PromptSampler(task.train, make_strategy(config.sampler),
                               config.rl.prompts_per_iteration, config.seed))
  buffer = PartialRolloutBuffer()
  sampling = SamplingParams(temperature=1.0, stop_token_ids=(tokenizer.eos_id,))
  engine = backend.engine
  rows = []
  for step in range(warmup + iterations):
    backend.iteration = step
    decode_steps, prefilled = engine.num_decode_steps, engine.prefill_counts["prompt_tokens"]
    start = time.perf_counter()
    state, metrics = rl.rl_iteration(state, step, trainer, backend, sampling, sampler, buffer,
                                     task, tokenizer, config, workdir)
    synced = time.perf_counter()
    backend.sync(state.params, str(step + 1))
    end = time.perf_counter()
    rows.append((end - start, metrics["time/rollout"], metrics["time/reward"],
                 metrics["time/train"], end - synced, metrics["complete_groups"],
                 engine.num_decode_steps - decode_steps,
                 engine.prefill_counts["prompt_tokens"] - prefilled))
  keys = ("seconds", "rollout", "reward", "train", "sync", "groups", "decode_steps",
          "prefill_tokens")
  return dict(zip(keys, np.mean(rows[warmup:], axis=0).tolist()))


def warm_up_trainer(trainer, config, model_config, tx, mesh, params) -> None:
  """Compile the trainer's programs for every minibatch length bucket and packed row count
  (B/4, B/2, B: as many rows as trajectories of the full length) before timing."""
  rows, seq_len = config.rl.groups_per_minibatch * config.rl.k, config.rollout.max_seq_len
  for length in sorted({min(seq_len, 1 << b) for b in range(5, seq_len.bit_length() + 1)}):
    for packed_rows in (rows // 4, rows // 2, rows):
      mask = np.zeros((rows, seq_len), np.float32)
      mask[:packed_rows, length - 1] = 1.0
      batch = {"tokens": np.ones((rows, seq_len), np.int32),
               "targets": np.ones((rows, seq_len), np.int32), "loss_mask": mask,
               "rewards": np.arange(rows, dtype=np.float32) % 2,
               "group_ids": np.repeat(np.arange(config.rl.groups_per_minibatch), config.rl.k)}
      trainer.train(train_state_from_params(model_config, tx, mesh, params)[0], batch)


def measure(iterations: int = 10, num_prompts: int = 16, k: int = 4, max_response: int = 496,
            segment: int = 32, median: float = 16.0, sigma: float = 1.3) -> dict:
  """partial_vs_full_rl_iteration: mean whole-iteration time with partial rollouts / without."""
  full_config = bench_config(max_response, max_response, num_prompts, k)
  partial_config = bench_config(max_response, segment, num_prompts, k)
  # Untimed first iterations: compilation (full), and filling the pipeline (partial): until a
  # trajectory started in the first iteration can have reached the cap, fewer (and shorter)
  # groups complete per iteration than in the steady state.
  warmup = {"full": 1, "partial": -(-max_response // segment)}
  with tempfile.TemporaryDirectory() as workdir:
    task, tokenizer, model_config, mesh = build_basics(full_config, workdir)
    params = init_params(model_config, jax.random.key(0))
    tx = build_optimizer(full_config.optimizer)
    state, shardings = train_state_from_params(model_config, tx, mesh, params)
    trainer = rl.PolicyTrainer(mesh, shardings, model_config, full_config.rl,
                               build_post_update(full_config.optimizer))
    engine = RolloutEngine(model_config, state.params, max_batch=full_config.rollout.max_batch,
                           max_seq_len=full_config.rollout.max_seq_len,
                           eos_token_ids=(tokenizer.eos_id,))
    engine.warm_up()
    backend = PlantedLengths(engine, max_response, median, sigma)
    warm_up_trainer(trainer, full_config, model_config, tx, mesh, params)
    modes = {name: run_mode(config, params, tx, trainer, backend, workdir, warmup[name],
                            iterations)
             for name, config in (("full", full_config), ("partial", partial_config))}
  per_group = {name: m["seconds"] / max(m["groups"], 1e-9) for name, m in modes.items()}
  return {"partial_vs_full_rl_iteration": modes["partial"]["seconds"] / modes["full"]["seconds"],
          "partial_rollout": dict(
              modes=modes, iterations=iterations, warmup=warmup, prompts=num_prompts, k=k,
              max_response=max_response, segment=segment, median=median, sigma=sigma,
              engine_rows=full_config.rollout.max_batch,
              per_trained_group_ratio=per_group["partial"] / per_group["full"],
              scope="whole RL iteration: rollout + scoring + training (rl_iteration) + sync",
              reference="the same prompt stream and planted lengths without partial rollouts")}


def main(argv):
  del argv
  result = measure(ITERATIONS.value, PROMPTS.value, K.value, MAX_RESPONSE.value, SEGMENT.value,
                   MEDIAN.value, SIGMA.value)
  r = result["partial_rollout"]
  print(f"{r['prompts']} prompts x {r['k']} per iteration, planted lengths lognormal(median "
        f"{r['median']:g}, sigma {r['sigma']:g}) capped at {r['max_response']}, engine "
        f"{r['engine_rows']} rows; means over {r['iterations']} iterations after "
        f"{r['warmup']['full']} (full) / {r['warmup']['partial']} (partial) untimed ones:")
  for name, m in r["modes"].items():
    label = f"{name}" + (f" (segment {r['segment']})" if name == "partial" else "")
    print(f"  {label:20s} {m['seconds']:6.3f} s/iter = rollout {m['rollout']:6.3f} + reward "
          f"{m['reward']:5.3f} + train {m['train']:6.3f} + sync {m['sync']:5.3f} | "
          f"{m['groups']:4.1f} groups trained, {m['decode_steps']:5.0f} decode steps, "
          f"{m['prefill_tokens']:6.0f} prefilled tokens per iteration")
  print(f"ratio partial / full (whole iteration): {result['partial_vs_full_rl_iteration']:.2f} "
        f"(goal <= 0.6); per trained group: {r['per_trained_group_ratio']:.2f}")


if __name__ == "__main__":
  app.run(main)
