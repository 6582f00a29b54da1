"""Chain-of-thought reward model and the example type every reward model
grades.

`JUDGE_PROMPT_TEMPLATE` asks a judge LM, through any `generate(prompts, max_new_tokens) ->
texts` callable (e.g. over a rollout backend), to reason and end with a JSON verdict
{"correct": true|false}, parsed strictly by `kimi_jax.rewards.verdict`. A reply without a valid
verdict scores 0 and is counted per reason in `errors`. `judge_reward` makes a judge the
registry's "cot_rm" reward (the run builds it: the judge model is served at run time).
"""
import collections
import dataclasses
from typing import Callable, Sequence

import numpy as np

from kimi_jax.rewards.verdict import VerdictError, parse_verdict

JUDGE_PROMPT_TEMPLATE = (
    "You are grading a response to a problem against the reference answer.\n\n"
    "Problem:\n{question}\n\n"
    "Reference answer:\n{reference}\n\n"
    "Response:\n{response}\n\n"
    "Reason step by step about whether the final answer of the response is equivalent to the "
    "reference answer. Then end your reply with a JSON object and nothing after it: "
    '{{"correct": true}} if it is equivalent, {{"correct": false}} if it is not.')


@dataclasses.dataclass(frozen=True)
class RMExample:
  question: str
  reference: str
  response: str


GenerateFn = Callable[[list[str], int], list[str]]


@dataclasses.dataclass(frozen=True)
class Judgement:
  """One judge reply and what its verdict said."""

  text: str  # the judge's whole reply
  correct: bool | None  # None when the reply has no valid verdict
  error: str | None  # a VERDICT_ERRORS reason, or None


class ChainOfThoughtRewardModel:
  """Scores 1.0 / 0.0 from the judge's strict JSON verdict; invalid replies score 0.0.

  `errors` counts invalid replies per `kimi_jax.rewards.verdict.VERDICT_ERRORS` reason over
  the model's lifetime. `generate` receives the filled JUDGE_PROMPT_TEMPLATE strings as they
  are (any chat template is the callable's business).
  """

  def __init__(self, generate: GenerateFn, max_new_tokens: int):
    if max_new_tokens <= 0:
      raise ValueError(f"max_new_tokens={max_new_tokens}: must be positive")
    self.generate, self.max_new_tokens = generate, max_new_tokens
    self.errors: collections.Counter[str] = collections.Counter()

  def judge(self, examples: Sequence[RMExample]) -> list[Judgement]:
    """One generate call for all examples; parse each reply, counting invalid ones."""
    prompts = [JUDGE_PROMPT_TEMPLATE.format(**dataclasses.asdict(e)) for e in examples]
    texts = self.generate(prompts, self.max_new_tokens)
    if len(texts) != len(prompts):
      raise ValueError(f"generate returned {len(texts)} texts for {len(prompts)} prompts")
    judgements = []
    for text in texts:
      try:
        judgements.append(Judgement(text, parse_verdict(text), None))
      except VerdictError as err:
        self.errors[err.reason] += 1
        judgements.append(Judgement(text, None, err.reason))
    return judgements

  def score(self, examples: Sequence[RMExample]) -> np.ndarray:
    """1.0 for a true verdict, 0.0 for a false or invalid one, float32 [len(examples)]."""
    return np.array([1.0 if j.correct else 0.0 for j in self.judge(examples)], np.float32)


def judge_reward(model: ChainOfThoughtRewardModel):
  """The registry reward (questions, responses, answers) -> float64 [B] of a judge: each answer
  is the reference, one `model.score` call per batch (register with `needs_questions=True`)."""
  def batch(questions, responses, answers) -> np.ndarray:
    examples = [RMExample(q, a, r) for q, r, a in zip(questions, responses, answers)]
    return model.score(examples).astype(np.float64)
  return batch
