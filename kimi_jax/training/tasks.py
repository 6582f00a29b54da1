"""RL tasks: the prompt sets, the reference responses for the SFT warm-up, and the reward name
(looked up in `kimi_jax.rewards.registry.REGISTRY` per prompt domain)."""
import dataclasses
from typing import Callable

from kimi_jax.data import synthetic
from kimi_jax.data.sources import Prompt

TASKS = ("arith",)


@dataclasses.dataclass(frozen=True)
class Task:
  charset: str
  train: list[Prompt]
  heldout: list[Prompt]
  reference_response: Callable[[Prompt], str]  # long-CoT target for the SFT warm-up
  reward_by_domain: dict[str, str]  # prompt domain -> registered reward name


def build_task(task_config, seed: int) -> Task:
  if task_config.name != "arith":
    raise ValueError(f"task.name={task_config.name!r}: expected one of {TASKS}")
  train, heldout = synthetic.train_heldout_split(task_config.num_train, task_config.num_heldout,
                                                 tuple(task_config.levels), seed,
                                                 task_config.max_operand)
  return Task(charset=synthetic.CHARSET, train=train, heldout=heldout,
              reference_response=lambda p: synthetic.target_response(synthetic.solve(p.question)),
              reward_by_domain={synthetic.DOMAIN: task_config.reward})
