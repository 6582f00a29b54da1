"""RL tasks: the prompt sets, the reference responses for the SFT warm-up, and the reward name
(looked up in `kimi_jax.rewards.registry.REGISTRY` per prompt domain).

The arithmetic warm-up mixes two kinds of reference response, like real SFT data that mixes
long-CoT and short answers: a fraction `direct_answer_fraction` of prompts (fixed per prompt)
is answered with the final answer alone ("#12"), the rest with the worked chain of thought.
The warmed-up policy therefore chooses between reasoning and guessing on every prompt, and RL
must discover from the verifier alone when the chain of thought pays.

A fraction `verify_fraction` of the worked responses then checks itself: the steps are undone
back to the first operand before the answer (`synthetic.verification`). That reflection makes
the chain of thought long without making it more accurate: the redundancy long2short removes.
"""
import dataclasses
import zlib
from typing import Callable

from kimi_jax.data import synthetic
from kimi_jax.data.sft import ChatTemplate
from kimi_jax.data.sft import encode_prompt as template_encode_prompt
from kimi_jax.data.sources import Prompt

TASKS = ("arith",)
TEMPLATE = ChatTemplate(add_bos=True)  # <bos> question | response <eos>


def encode_prompt(tokenizer, question: str) -> list[int]:
  """Prompt ids exactly as the SFT warm-up saw them (every stage uses this template)."""
  return template_encode_prompt(tokenizer, TEMPLATE, question)


@dataclasses.dataclass(frozen=True)
class Task:
  charset: str
  train: list[Prompt]
  heldout: list[Prompt]
  reference_response: Callable[[Prompt], str]  # SFT warm-up target
  reward_by_domain: dict[str, str]  # prompt domain -> registered reward name


def _prompt_fraction(prompt: Prompt, salt: str) -> float:
  """A fixed pseudo-random number in [0, 1) per prompt id and salt."""
  return zlib.crc32(f"{prompt.id}{salt}".encode()) % 10_000 / 10_000


def arith_reference(prompt: Prompt, direct_answer_fraction: float, verify_fraction: float) -> str:
  problem = synthetic.solve(prompt.question)
  if _prompt_fraction(prompt, "") < direct_answer_fraction:
    return f"{synthetic.ANSWER_MARKER}{problem.answer}"
  verify = _prompt_fraction(prompt, ":verify") < verify_fraction
  return synthetic.target_response(problem, verify)


def build_task(task_config, seed: int) -> Task:
  if task_config.name != "arith":
    raise ValueError(f"task.name={task_config.name!r}: expected one of {TASKS}")
  for field in ("direct_answer_fraction", "verify_fraction"):
    if not 0.0 <= task_config[field] <= 1.0:
      raise ValueError(f"task.{field}={task_config[field]}: must be in [0, 1]")
  train, heldout = synthetic.train_heldout_split(task_config.num_train, task_config.num_heldout,
                                                 tuple(task_config.levels), seed,
                                                 task_config.max_operand)
  return Task(charset=synthetic.CHARSET, train=train, heldout=heldout,
              reference_response=lambda p: arith_reference(p, task_config.direct_answer_fraction,
                                                            task_config.verify_fraction),
              reward_by_domain={synthetic.DOMAIN: task_config.reward})
