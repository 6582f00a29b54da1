"""RL tasks: the prompt sets, the reference responses for the SFT warm-up, and the reward name
(looked up in `kimi_jax.rewards.registry.REGISTRY` per prompt domain).

The arithmetic warm-up mixes two kinds of reference response, like real SFT data that mixes
long-CoT and short answers: a fraction `direct_answer_fraction` of prompts (fixed per prompt)
is answered with the final answer alone ("#12"), the rest with the worked chain of thought.
The warmed-up policy therefore chooses between reasoning and guessing on every prompt, and RL
must discover from the verifier alone when the chain of thought pays.
"""
import dataclasses
import zlib
from typing import Callable

from kimi_jax.data import synthetic
from kimi_jax.data.sources import Prompt

TASKS = ("arith",)


@dataclasses.dataclass(frozen=True)
class Task:
  charset: str
  train: list[Prompt]
  heldout: list[Prompt]
  reference_response: Callable[[Prompt], str]  # SFT warm-up target
  reward_by_domain: dict[str, str]  # prompt domain -> registered reward name


def _answers_directly(prompt: Prompt, fraction: float) -> bool:
  """A fixed pseudo-random choice per prompt id."""
  return zlib.crc32(prompt.id.encode()) % 10_000 < fraction * 10_000


def arith_reference(prompt: Prompt, direct_answer_fraction: float) -> str:
  problem = synthetic.solve(prompt.question)
  if _answers_directly(prompt, direct_answer_fraction):
    return f"{synthetic.ANSWER_MARKER}{problem.answer}"
  return synthetic.target_response(problem)


def build_task(task_config, seed: int) -> Task:
  if task_config.name != "arith":
    raise ValueError(f"task.name={task_config.name!r}: expected one of {TASKS}")
  if not 0.0 <= task_config.direct_answer_fraction <= 1.0:
    raise ValueError(f"task.direct_answer_fraction={task_config.direct_answer_fraction}: "
                     "must be in [0, 1]")
  train, heldout = synthetic.train_heldout_split(task_config.num_train, task_config.num_heldout,
                                                 tuple(task_config.levels), seed,
                                                 task_config.max_operand)
  return Task(charset=synthetic.CHARSET, train=train, heldout=heldout,
              reference_response=lambda p: arith_reference(p, task_config.direct_answer_fraction),
              reward_by_domain={synthetic.DOMAIN: task_config.reward})
