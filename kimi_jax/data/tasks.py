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

The "vision" task draws its prompts from `domains`: "arith_image" (the arithmetic question only
in a picture), "chart" (bar-chart reading) and "arith" (the text task, for a mixed text + vision
run); `num_train` / `num_heldout` prompts per domain, the same direct-answer mix in each.
"""
import dataclasses
import zlib
from typing import Callable

import numpy as np

from kimi_jax.data import rendered, synthetic
from kimi_jax.data.packing import ChatTemplate, encode_prompt
from kimi_jax.data.sources import Prompt

TASKS = ("arith", "vision")
VISION_DOMAINS = (synthetic.DOMAIN, rendered.ARITH_IMAGE_DOMAIN, rendered.CHART_DOMAIN)
TEMPLATE = ChatTemplate(add_bos=True)  # <bos> question | response <eos>


def encode_task_prompt(tokenizer, question: str) -> list[int]:
  """Prompt ids exactly as the SFT warm-up saw them (every stage uses this template)."""
  return encode_prompt(tokenizer, TEMPLATE, question)


@dataclasses.dataclass(frozen=True)
class Task:
  charset: str
  train: list[Prompt]
  heldout: list[Prompt]
  reference_response: Callable[[Prompt], str]  # SFT warm-up target
  reward_by_domain: dict[str, str]  # prompt domain -> registered reward name

  @property
  def has_images(self) -> bool:
    return any(p.images for p in self.train + self.heldout)


def _prompt_fraction(prompt: Prompt, salt: str) -> float:
  """A fixed pseudo-random number in [0, 1) per prompt id and salt."""
  return zlib.crc32(f"{prompt.id}{salt}".encode()) % 10_000 / 10_000


def _is_direct(prompt: Prompt, direct_answer_fraction: float) -> bool:
  """Whether the prompt's warm-up reference is the bare answer."""
  return _prompt_fraction(prompt, "") < direct_answer_fraction


def arith_reference(prompt: Prompt, direct_answer_fraction: float, verify_fraction: float) -> str:
  problem = synthetic.solve(prompt.question)
  if _is_direct(prompt, direct_answer_fraction):
    return f"{synthetic.ANSWER_MARKER}{problem.answer}"
  verify = _prompt_fraction(prompt, ":verify") < verify_fraction
  return synthetic.target_response(problem, verify)


def _check_fractions(task_config, fields) -> None:
  for field in fields:
    if not 0.0 <= task_config[field] <= 1.0:
      raise ValueError(f"task.{field}={task_config[field]}: must be in [0, 1]")


def _domain_split(task_config, domain: str, seed: int):
  """(train, held-out, {prompt id: worked response}) of one vision-task domain."""
  c = task_config
  if domain == synthetic.DOMAIN:
    train, heldout = synthetic.train_heldout_split(c.num_train, c.num_heldout, tuple(c.levels),
                                                   seed, c.max_operand)
    return train, heldout, {p.id: synthetic.target_response(synthetic.solve(p.question))
                            for p in train + heldout}
  if domain == rendered.ARITH_IMAGE_DOMAIN:
    train, heldout = rendered.arith_image_split(c.num_train, c.num_heldout, tuple(c.levels), seed,
                                                c.max_operand)
    worked = {p.id: synthetic.target_response(problem) for p, problem in train + heldout}
  else:
    layout = rendered.ChartLayout(max_value=c.chart_max_value, unit=c.chart_unit)
    train, heldout = rendered.chart_split(c.num_train, c.num_heldout, tuple(c.chart_levels), seed,
                                          c.num_bars, layout)
    worked = {p.id: chart.response() for p, chart in train + heldout}
  return [p for p, _ in train], [p for p, _ in heldout], worked


def build_vision_task(task_config, seed: int) -> Task:
  """Prompts of every domain in `task_config.domains` (see the module docstring)."""
  _check_fractions(task_config, ("direct_answer_fraction",))
  domains = tuple(task_config.domains)
  unknown = [d for d in domains if d not in VISION_DOMAINS]
  if not domains or unknown or len(set(domains)) != len(domains):
    raise ValueError(f"task.domains={domains}: expected distinct names from {VISION_DOMAINS}")
  train, heldout, worked = [], [], {}
  for i, domain in enumerate(domains):
    domain_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
    domain_train, domain_heldout, domain_worked = _domain_split(task_config, domain, domain_seed)
    train += domain_train
    heldout += domain_heldout
    worked.update(domain_worked)
  direct = task_config.direct_answer_fraction
  return Task(charset=rendered.charset(), train=train, heldout=heldout,
              reference_response=lambda p: (f"{synthetic.ANSWER_MARKER}{p.answer}"
                                            if _is_direct(p, direct) else worked[p.id]),
              reward_by_domain={d: task_config.reward for d in domains})


def build_task(task_config, seed: int) -> Task:
  if task_config.name not in TASKS:
    raise ValueError(f"task.name={task_config.name!r}: expected one of {TASKS}")
  if task_config.name == "vision":
    return build_vision_task(task_config, seed)
  _check_fractions(task_config, ("direct_answer_fraction", "verify_fraction"))
  train, heldout = synthetic.train_heldout_split(task_config.num_train, task_config.num_heldout,
                                                 tuple(task_config.levels), seed,
                                                 task_config.max_operand)
  return Task(charset=synthetic.CHARSET, train=train, heldout=heldout,
              reference_response=lambda p: arith_reference(p, task_config.direct_answer_fraction,
                                                            task_config.verify_fraction),
              reward_by_domain={synthetic.DOMAIN: task_config.reward})
