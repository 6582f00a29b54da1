"""Reward registry: a config names the reward of each task; scores combine with the length penalty.

A reward is a batch function (responses_B, answers_B) -> rewards_B with values in [0, 1], 1
meaning correct; one registered with `needs_questions=True` (a judge model grading against the
problem) is called (questions_B, responses_B, answers_B) instead. Built in: "math"
(`math.math_rewards`: answers are gold answers), "code" (`code.code_rewards`: answers are JSON
test cases) and "arith". Anything else registers by name, e.g. the RL demo's synthetic
arithmetic task: `REGISTRY.register("arith", per_response(fn))`; a reward that needs a model
served at run time (the chain-of-thought judge "cot_rm") goes into a run's `copy()` of REGISTRY.

A config maps task names (a prompt's `domain`) to reward names, e.g. {"gsm8k": "math",
"arith": "arith"}; `score_rollout` calls each reward once on the rows of its tasks, then adds the
k1.5 length penalty per prompt group (`length_penalty.grouped_length_reward`), keeping the parts.
"""
import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from kimi_jax.data import synthetic
from kimi_jax.rewards.code import code_rewards
from kimi_jax.rewards import length_penalty
from kimi_jax.rewards.math import math_rewards

BatchReward = Callable[[Sequence[str], Sequence[str]], np.ndarray]
QuestionReward = Callable[[Sequence[str], Sequence[str], Sequence[str]], np.ndarray]


def per_response(reward: Callable[[str, str], float]) -> BatchReward:
  """A batch reward from a (response, answer) -> reward function."""
  def batch(responses: Sequence[str], answers: Sequence[str]) -> np.ndarray:
    return np.array([reward(r, a) for r, a in zip(responses, answers)], np.float64)
  return batch


class RewardRegistry:
  """Rewards by name."""

  def __init__(self):
    self._rewards: dict[str, BatchReward | QuestionReward] = {}
    self._needs_questions: set[str] = set()

  def register(self, name: str, reward: BatchReward | QuestionReward,
               needs_questions: bool = False) -> None:
    """Add `reward` as `name`; with `needs_questions` it is called (questions, responses,
    answers)."""
    if name in self._rewards:
      raise ValueError(f"reward {name!r} is already registered")
    self._rewards[name] = reward
    if needs_questions:
      self._needs_questions.add(name)

  def copy(self) -> "RewardRegistry":
    """A registry with the same rewards, to which a run adds its own."""
    registry = RewardRegistry()
    registry._rewards, registry._needs_questions = dict(self._rewards), set(self._needs_questions)
    return registry

  def get(self, name: str) -> BatchReward | QuestionReward:
    if name not in self._rewards:
      raise ValueError(f"unknown reward {name!r}; registered: {sorted(self._rewards)}")
    return self._rewards[name]

  def task_rewards(self, reward_by_task: Mapping[str, str], tasks_B: Sequence[str],
                   responses_B: Sequence[str], answers_B: Sequence[str],
                   questions_B: Sequence[str] | None = None) -> np.ndarray:
    """Reward of every row from its task's reward, one batched call per task; float64 [B].
    `questions_B` (each row's problem text) reaches only rewards that need questions."""
    if not len(tasks_B) == len(responses_B) == len(answers_B):
      raise ValueError(f"got {len(tasks_B)} tasks, {len(responses_B)} responses and "
                       f"{len(answers_B)} answers")
    if questions_B is not None and len(questions_B) != len(tasks_B):
      raise ValueError(f"got {len(questions_B)} questions for {len(tasks_B)} tasks")
    missing = sorted(set(tasks_B) - set(reward_by_task))
    if missing:
      raise ValueError(f"no reward configured for task(s) {missing}; "
                       f"configured: {sorted(reward_by_task)}")
    tasks_B = np.asarray(tasks_B, dtype=object)
    rewards_B = np.zeros(len(tasks_B))
    for task in dict.fromkeys(tasks_B):
      rows = np.flatnonzero(tasks_B == task)
      name = reward_by_task[task]
      inputs = [[responses_B[i] for i in rows], [answers_B[i] for i in rows]]
      if name in self._needs_questions:
        if questions_B is None:
          raise ValueError(f"reward {name!r} (task {task!r}) grades against the question: "
                           "pass questions_B")
        inputs.insert(0, [questions_B[i] for i in rows])
      values = np.asarray(self.get(name)(*inputs), np.float64)
      if values.shape != rows.shape or not np.all((values >= 0.0) & (values <= 1.0)):
        raise ValueError(f"reward {name!r} must return {len(rows)} values in [0, 1], got "
                         f"shape {values.shape}, range [{values.min(initial=0.0)}, "
                         f"{values.max(initial=0.0)}]")
      rewards_B[rows] = values
    return rewards_B


REGISTRY = RewardRegistry()
REGISTRY.register("math", math_rewards)
REGISTRY.register("code", code_rewards)
REGISTRY.register("arith", per_response(lambda r, a: float(synthetic.is_correct(r, a))))


@dataclasses.dataclass(frozen=True)
class RolloutScores:
  """Per-row reward parts, float64 [B]: rewards = task + length (the weighted length reward)."""
  task: np.ndarray
  length: np.ndarray
  correct: np.ndarray  # bool: task reward 1

  @property
  def rewards(self) -> np.ndarray:
    return self.task + self.length


def score_rollout(reward_by_task: Mapping[str, str], tasks_B: Sequence[str],
                  responses_B: Sequence[str], answers_B: Sequence[str], lengths_B, group_ids_B,
                  length_penalty_weight: float, length_penalty_warmup: int, iteration: int,
                  registry: RewardRegistry = REGISTRY,
                  questions_B: Sequence[str] | None = None) -> RolloutScores:
  """Task reward and w * per-group length reward of every row; correct = task reward 1.

  `lengths_B` are response lengths in tokens, `group_ids_B` the prompt group of each row; w is
  `length_penalty_weight` from iteration `length_penalty_warmup` on, 0 before.
  """
  task_B = registry.task_rewards(reward_by_task, tasks_B, responses_B, answers_B, questions_B)
  correct_B = task_B == 1.0
  w = length_penalty.length_penalty_weight(length_penalty_weight, iteration,
                                           length_penalty_warmup)
  return RolloutScores(task_B, w * length_penalty.grouped_length_reward(lengths_B, correct_B,
                                                                          group_ids_B), correct_B)
