"""Evaluate a policy on a prompt set through a rollout backend (engine or SGLang servers).

Every prompt gets `samples` responses at `temperature` (1 at 0.0 is greedy), graded by the
task's registered reward; `summarize` turns them into pass@1, pass@k, length and token
efficiency, overall and per difficulty level. In a job of several processes each samples and
grades its own contiguous share of the prompts; only each row's correctness and length travel
between them, and every process gets the same result as one process alone.
"""
import dataclasses

import numpy as np

from kimi_jax.eval.summary import EvalResult, summarize
from kimi_jax.rewards.registry import REGISTRY, RewardRegistry
from kimi_jax.rollout.types import SamplingParams
from kimi_jax.sharding.processes import Processes, this_job


@dataclasses.dataclass(frozen=True)
class GradedSamples:
  """R = P * samples rows, prompt-major: row r answers prompts[r // samples]."""
  prompts_R: list
  responses_R: list[str]
  correct_R: np.ndarray  # bool
  num_tokens_R: np.ndarray  # response tokens, eos included

  @classmethod
  def concatenate(cls, parts: list["GradedSamples"]) -> "GradedSamples":
    """The rows of `parts`, in order (processes' shares back into the whole set)."""
    return cls(sum((p.prompts_R for p in parts), []), sum((p.responses_R for p in parts), []),
               np.concatenate([p.correct_R for p in parts]),
               np.concatenate([p.num_tokens_R for p in parts]))


def sample_and_grade(backend, tokenizer, task, prompts, samples: int, temperature: float,
                     max_new_tokens: int, seed: int = 0,
                     registry: RewardRegistry = REGISTRY) -> GradedSamples:
  """`samples` responses per prompt (request r seeded with seed + r), graded by the task's
  rewards in `registry`."""
  rows = [p for p in prompts for _ in range(samples)]
  sampling = [SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + r,
                             stop_token_ids=tuple(tokenizer.eos_ids)) for r in range(len(rows))]
  completions = backend.generate([task.encode_prompt(tokenizer, p) for p in rows], sampling,
                                 images=[p.images for p in rows])
  responses = [tokenizer.decode(c.output_ids) for c in completions]
  rewards = registry.task_rewards(task.reward_by_domain, [p.domain for p in rows], responses,
                                  [p.answer for p in rows], [p.question for p in rows])
  return GradedSamples(rows, responses, rewards == 1.0,
                       np.array([len(c.output_ids) for c in completions], np.int64))


def sample_and_grade_share(backend, tokenizer, task, prompts, samples: int, temperature: float,
                           max_new_tokens: int, seed: int, processes: Processes,
                           registry: RewardRegistry = REGISTRY) -> GradedSamples:
  """`sample_and_grade` of this process's share of `prompts` (all `samples` of a prompt on one
  process), each request seeded by its row in the whole set, as if one process sampled all."""
  share = processes.share(len(prompts))
  return sample_and_grade(backend, tokenizer, task, prompts[share], samples, temperature,
                          max_new_tokens, seed + share.start * samples, registry)


def evaluate(backend, tokenizer, task, prompts, max_new_tokens: int, samples: int = 1,
             temperature: float = 0.0, k: int = 1, seed: int = 0,
             registry: RewardRegistry = REGISTRY, processes: Processes | None = None) -> EvalResult:
  """Grade `samples` responses per prompt of `prompts` under the backend's current weights,
  each of `processes` (default: the JAX job's) sampling its share; a collective."""
  if not 1 <= k <= samples:
    raise ValueError(f"eval k={k}: must be in [1, eval samples={samples}]")
  if samples > 1 and temperature == 0.0:
    raise ValueError(f"eval samples={samples} at temperature 0.0 would repeat one greedy answer")
  processes = processes or this_job()
  graded = sample_and_grade_share(backend, tokenizer, task, prompts, samples, temperature,
                                  max_new_tokens, seed, processes, registry)
  shares = processes.allgather((graded.correct_R, graded.num_tokens_R))
  correct_R, num_tokens_R = (np.concatenate(rows) for rows in zip(*shares))
  shape = (len(prompts), samples)
  return summarize(correct_R.reshape(shape), num_tokens_R.reshape(shape), k,
                   difficulty_P=np.array([p.difficulty for p in prompts]),
                   domain_P=[p.domain for p in prompts])


def evaluate_with_config(backend, tokenizer, task, prompts, eval_config,
                         registry: RewardRegistry = REGISTRY,
                         processes: Processes | None = None) -> EvalResult:
  """`evaluate` with the `eval` section of an experiment config."""
  return evaluate(backend, tokenizer, task, prompts, eval_config.max_new_tokens,
                  eval_config.samples, eval_config.temperature, eval_config.k, eval_config.seed,
                  registry, processes)
