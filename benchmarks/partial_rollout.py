"""Whole RL iteration wall time with and without partial rollouts (k1.5 2.6.2).

Each timed iteration is the real `rl.rl_iteration` (prompts from the sampler, rollouts through
`collect_groups`, scoring by the reward registry, S_ref, optimizer reset and the minibatch
steps of `PolicyTrainer`) followed by the weight sync, on the tiny arithmetic config. Response
lengths are planted from a heavy-tailed mix (lognormal, median ~24 tokens, a tail up to the
384-token cap): the backend samples with the real engine and stops each trajectory at its
planted length. Without partial rollouts every iteration waits for its longest response; with
them each trajectory gets at most `segment` tokens per iteration and unfinished groups resume
from the buffer. Both modes start from the same weights, see the same prompt stream and the
same planted lengths; the engine and the trainer (one program per minibatch length bucket) are
compiled before timing and the first iteration of each mode is left out of its mean. Prints per mode the mean iteration time and its
rollout / scoring / training parts, then the ratio of mean times (goal <= 0.6).
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

ITERATIONS = flags.DEFINE_integer("iterations", 12, "RL iterations per mode")
PROMPTS = flags.DEFINE_integer("prompts", 16, "new prompts per iteration")
K = flags.DEFINE_integer("k", 4, "samples per prompt")
MAX_RESPONSE = flags.DEFINE_integer("max_response", 384, "response cap over all segments")
SEGMENT = flags.DEFINE_integer("segment", 48, "tokens per trajectory per iteration (partial)")


class PlantedLengths(EngineBackend):
  """The engine's samples, each trajectory stopped at a length drawn for it when it starts
  (lognormal, seeded per iteration); a resumed request is recognised by its tokens so far."""

  def __init__(self, engine, max_response: int):
    self.engine, self.max_response = engine, max_response
    self.remaining_of: dict[tuple, int] = {}  # tokens so far -> tokens still to generate
    self.iteration = 0

  def generate(self, requests, sampling, images=None):
    del images  # text-only prompts
    rng = np.random.default_rng(self.iteration)
    remaining = [self.remaining_of.pop(tuple(request), None) for request in requests]
    remaining = [int(np.clip(rng.lognormal(np.log(24), 1.0), 4, self.max_response))
                 if r is None else r for r in remaining]
    sampling = [dataclasses.replace(s, max_new_tokens=min(s.max_new_tokens, r), ignore_eos=True)
                for s, r in zip(sampling, remaining)]
    completions = self.engine.generate(requests, sampling)
    for request, completion, left in zip(requests, completions, remaining):
      left -= len(completion.output_ids)
      if left == 0:
        completion.finish_reason = stop_reason("planted")
      else:
        self.remaining_of[tuple(request) + tuple(completion.output_ids)] = left
    return completions


def bench_config(max_response: int, segment: int, prompts: int, k: int):
  config = get_config("tiny")
  with config.unlocked():
    config.rl.update(max_response_tokens=max_response, segment_tokens=segment,
                     prompts_per_iteration=prompts, k=k, groups_per_minibatch=4,
                     repetition_ngram=0, repetition_count=0, length_penalty={"weight": 0.0})
    config.rollout.update(max_batch=64, max_seq_len=max_response + 16)
  return config


def run_mode(config, params, tx, trainer, backend, workdir,
             iterations: int) -> dict[str, float]:
  """Mean seconds per iteration (all of it, and its rollout/reward/train parts), first out."""
  task, tokenizer, model_config, mesh = build_basics(config, workdir)
  state, _ = train_state_from_params(model_config, tx, mesh, params)
  backend.sync(state.params, "0")
  backend.remaining_of.clear()
  sampler = iter(PromptSampler(task.train, make_strategy(config.sampler),
                               config.rl.prompts_per_iteration, config.seed))
  buffer = PartialRolloutBuffer()
  sampling = SamplingParams(temperature=1.0, stop_token_ids=(tokenizer.eos_id,))
  rows = []
  for step in range(iterations):
    backend.iteration = step
    start = time.perf_counter()
    state, metrics = rl.rl_iteration(state, step, trainer, backend, sampling, sampler, buffer,
                                     task, tokenizer, config, workdir)
    backend.sync(state.params, str(step + 1))
    rows.append((time.perf_counter() - start, metrics["time/rollout"], metrics["time/reward"],
                 metrics["time/train"], metrics["complete_groups"]))
  seconds, rollout, reward, train, groups = np.mean(rows[1:], axis=0).tolist()
  return {"seconds": seconds, "rollout": rollout, "reward": reward, "train": train,
          "groups": groups}


def warm_up_trainer(trainer, config, model_config, tx, mesh, params) -> None:
  """Compile the trainer's programs for every minibatch length bucket before timing."""
  rows, seq_len = config.rl.groups_per_minibatch * config.rl.k, config.rollout.max_seq_len
  for length in sorted({min(seq_len, 1 << b) for b in range(5, seq_len.bit_length() + 1)}):
    mask = np.zeros((rows, seq_len), np.float32)
    mask[:, length - 1] = 1.0
    batch = {"tokens": np.ones((rows, seq_len), np.int32),
             "targets": np.ones((rows, seq_len), np.int32), "loss_mask": mask,
             "rewards": np.arange(rows, dtype=np.float32) % 2,
             "group_ids": np.repeat(np.arange(config.rl.groups_per_minibatch), config.rl.k)}
    trainer.train(train_state_from_params(model_config, tx, mesh, params)[0], batch)


def measure(iterations: int = 12, num_prompts: int = 16, k: int = 4, max_response: int = 384,
            segment: int = 48) -> dict:
  """partial_vs_full_rl_iteration: mean whole-iteration time with partial rollouts / without."""
  full_config = bench_config(max_response, max_response, num_prompts, k)
  partial_config = bench_config(max_response, segment, num_prompts, k)
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
    backend = PlantedLengths(engine, max_response)
    warm_up_trainer(trainer, full_config, model_config, tx, mesh, params)
    modes = {name: run_mode(config, params, tx, trainer, backend, workdir, iterations)
             for name, config in (("full", full_config), ("partial", partial_config))}
  return {"partial_vs_full_rl_iteration": modes["partial"]["seconds"] / modes["full"]["seconds"],
          "partial_rollout": dict(
              modes=modes, iterations=iterations, prompts=num_prompts, k=k,
              max_response=max_response, segment=segment,
              scope="whole RL iteration: rollout + scoring + training (rl_iteration) + sync",
              reference="the same prompt stream and planted lengths without partial rollouts")}


def main(argv):
  del argv
  result = measure(ITERATIONS.value, PROMPTS.value, K.value, MAX_RESPONSE.value, SEGMENT.value)
  r = result["partial_rollout"]
  print(f"{r['iterations']} RL iterations of {r['prompts']} prompts x {r['k']}, response cap "
        f"{r['max_response']}; means over iterations 2-{r['iterations']} (seconds):")
  for name, m in r["modes"].items():
    label = f"{name} rollouts" + (f" (segment {r['segment']})" if name == "partial" else "")
    print(f"  {label:32s} {m['seconds']:6.3f} s/iter = rollout {m['rollout']:6.3f} + reward "
          f"{m['reward']:5.3f} + train {m['train']:5.3f} (+ sync)   {m['groups']:4.1f} groups "
          "trained per iteration")
  print(f"ratio partial / full (whole iteration): {result['partial_vs_full_rl_iteration']:.2f} "
        "(goal <= 0.6)")


if __name__ == "__main__":
  app.run(main)
