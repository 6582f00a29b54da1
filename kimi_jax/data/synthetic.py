"""Synthetic verifiable task of the RL demo: multi-step integer addition/subtraction.

Question: L+1 operands joined by '+'/'-' and a trailing '=', evaluated left to right; L (1..) is
the difficulty level. Response: one step per operation with its running total, steps separated
by ',', then the answer marker '#' and the answer:

    question "7+5-3="  ->  response "7+5=12,12-3=9#9"

Running totals never go negative: a subtracted operand is drawn from 0..min(max_operand,
running total), so no sign character exists and every token of a response is one of CHARSET.
Grading takes the text after the last '#' and compares it with the answer as an exact string.
"""
import dataclasses
import re

import numpy as np

from kimi_jax.data.sources import Prompt

ANSWER_MARKER = "#"
STEP_SEPARATOR = ","
CHARSET = "0123456789+-=" + STEP_SEPARATOR + ANSWER_MARKER
DOMAIN = "arith"
_QUESTION = re.compile(r"\d+(?:[+-]\d+)+=")
_MAX_REDRAWS = 10_000


@dataclasses.dataclass(frozen=True)
class Problem:
  question: str
  answer: str
  cot: str
  difficulty: int


def solve(question: str) -> Problem:
  """Parse "a+b-c=" and work it out left to right, writing the chain of thought."""
  if not _QUESTION.fullmatch(question):
    raise ValueError(f"not an arithmetic question: {question!r}")
  tokens = re.findall(r"\d+|[+-]", question)
  total, steps = int(tokens[0]), []
  for op, operand in zip(tokens[1::2], map(int, tokens[2::2])):
    new_total = total + operand if op == "+" else total - operand
    steps.append(f"{total}{op}{operand}={new_total}")
    total = new_total
  return Problem(question, str(total), STEP_SEPARATOR.join(steps), difficulty=len(steps))


def make_problem(rng: np.random.Generator, level: int, max_operand: int = 9) -> Problem:
  """A random level-`level` problem (level operations, operands in 0..max_operand)."""
  if level < 1 or max_operand < 1:
    raise ValueError(f"need level >= 1 and max_operand >= 1, got {level}, {max_operand}")
  total = int(rng.integers(0, max_operand + 1))
  text = str(total)
  for _ in range(level):
    if rng.random() < 0.5:
      operand = int(rng.integers(0, max_operand + 1))
      total, text = total + operand, f"{text}+{operand}"
    else:
      operand = int(rng.integers(0, min(max_operand, total) + 1))
      total, text = total - operand, f"{text}-{operand}"
  return solve(text + "=")


def verification(problem: Problem) -> str:
  """The steps undone from the answer back to the first operand: "7+5=12,12-3=9" is checked
  by "9+3=12,12-5=7". A reflection pass that re-derives nothing new (long2short removes it)."""
  undone = []
  for step in reversed(problem.cot.split(STEP_SEPARATOR)):
    left, result = step.split("=")
    first, op, operand = re.fullmatch(r"(\d+)([+-])(\d+)", left).groups()
    undone.append(f"{result}{'-' if op == '+' else '+'}{operand}={first}")
  return STEP_SEPARATOR.join(undone)


def target_response(problem: Problem, verify: bool = False) -> str:
  """The worked steps, optionally followed by their verification, then '#' and the answer."""
  steps = problem.cot + (STEP_SEPARATOR + verification(problem) if verify else "")
  return f"{steps}{ANSWER_MARKER}{problem.answer}"


def worksheet(rng: np.random.Generator, num_problems: int, levels, max_operand: int = 9,
              repeat: bool = True) -> str:
  """A long document for LM stages: `num_problems` worked problems written end to end
  ("7+5-3=7+5=12,12-3=9#9..."), then, with `repeat`, the same sheet again. The second copy is
  predictable only from the first, a whole sheet back: a long-range dependency."""
  problems = [make_problem(rng, int(rng.choice(levels)), max_operand) for _ in range(num_problems)]
  sheet = "".join(p.question + target_response(p) for p in problems)
  return sheet + sheet if repeat else sheet


def extract_answer(response: str) -> str | None:
  """Text after the last answer marker (stripped); None if there is no marker."""
  _, marker, answer = response.rpartition(ANSWER_MARKER)
  return answer.strip() if marker else None


def is_correct(response: str, answer: str) -> bool:
  """Exact string match of the extracted answer ("09" is not "9")."""
  return extract_answer(response) == answer


def make_dataset(n: int, levels, seed, max_operand: int = 9, exclude=frozenset(),
                 distinct: bool = False, id_prefix: str = DOMAIN) -> list[Prompt]:
  """`n` prompts cycling through `levels`; ids "<id_prefix>-<i>".

  Questions in `exclude` are redrawn; with `distinct` no question repeats within the set.
  Raises if a level runs out of new questions. `seed`: int or np.random.SeedSequence.
  """
  if not levels:
    raise ValueError("levels is empty")
  rng = np.random.default_rng(seed)
  taken = set(exclude)
  prompts = []
  for i in range(n):
    level = levels[i % len(levels)]
    for _ in range(_MAX_REDRAWS):
      problem = make_problem(rng, level, max_operand)
      if problem.question not in taken:
        break
    else:
      raise ValueError(f"level {level} (max_operand {max_operand}): no new question after "
                       f"{_MAX_REDRAWS} draws; ask for fewer prompts or raise max_operand")
    if distinct:
      taken.add(problem.question)
    prompts.append(Prompt(question=problem.question, answer=problem.answer, id=f"{id_prefix}-{i}",
                          difficulty=level, domain=DOMAIN))
  return prompts


def train_heldout_split(num_train: int, num_heldout: int, levels, seed: int,
                        max_operand: int = 9) -> tuple[list[Prompt], list[Prompt]]:
  """Held-out prompts with distinct questions, and training prompts that share none of them."""
  heldout_seed, train_seed = np.random.SeedSequence(seed).spawn(2)
  heldout = make_dataset(num_heldout, levels, heldout_seed, max_operand, distinct=True,
                         id_prefix=f"{DOMAIN}-heldout")
  train = make_dataset(num_train, levels, train_seed, max_operand,
                       exclude={p.question for p in heldout}, id_prefix=f"{DOMAIN}-train")
  return train, heldout
