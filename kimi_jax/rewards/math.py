"""Math reward: final-answer extraction, then math-verify equivalence under hard timeouts.

The final answer of a response is, by priority: the last \\boxed{...} (or \\fbox; braces nest),
else the text after the last "####" (its first line), else the text after the last "Answer:"
(its first line, case-insensitive), without a final "." or enclosing "$". No answer scores 0.
The answer must be the answer itself ("42 apples", not "The total is 42 apples"). Gold and
answer are both parsed as LaTeX by math-verify and compared with `verify(gold, answer)` (not
symmetric: the gold decides how units and equations are read). A gold ending in a percent sign
is also read without it, so gold "50%" accepts "50" as well as "0.5".

Unless the gold is itself a relation (an equation, inequality or disjunction), the answer must be
a value: `x = 42` counts as its right side, but `41 = 42`, `x + 1 = 42`, `x = 41 \\lor x = 42`
and hedges such as `41 or 42` score 0 (math-verify alone reads some of them as 42).

sympy can hang on some inputs (e.g. 9^{9^{9^{9}}}), so every comparison runs in a
`TimeoutPool` worker with a hard per-call timeout; a call that overruns scores 0 and its worker
is replaced. `math_reward`/`math_rewards` use one shared pool per process, created on first use.
"""
import atexit
import logging
import re
import threading
from typing import Sequence

import numpy as np
from math_verify import parse, verify

from kimi_jax.data.sources import boxed_answer
from kimi_jax.rewards._timeout_pool import TimeoutPool

# Timeouts are ours (hard kills); math-verify warns on every parse/verify without its own.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_PERCENT_SIGN = re.compile(r"\s*\\?%\s*$")
# Relations and connectives: text holding one states a claim or several answers, not a value.
_RELATION = re.compile(r"[=<>]|\\(?:lor|vee|land|wedge|approx|neq?|leq?|geq?|lt|gt|sim|equiv|"
                       r"implies|iff|[Rr]ightarrow|[Ll]eftrightarrow)(?![a-zA-Z])"
                       r"|\b(?:or|and)\b")
# `x = value`, `a_1 = value`: a single variable named on the left.
_ASSIGNMENT = re.compile(r"\s*[A-Za-z](?:_\{?\w+\}?)?\s*=(.*)", re.DOTALL)
_ANSWER_MARKERS = (re.compile(r"####"), re.compile(r"answer\s*:", re.IGNORECASE))


def _after_last(marker: re.Pattern, response: str) -> str | None:
  """First line of the text after the last `marker`; None without one."""
  matches = list(marker.finditer(response))
  return response[matches[-1].end():].strip().split("\n", 1)[0] if matches else None


def extract_final_answer(response: str) -> str | None:
  """The response's final answer (see module docstring), cleaned; None if it has none."""
  answer = boxed_answer(response)
  for marker in _ANSWER_MARKERS:
    if answer is None:
      answer = _after_last(marker, response)
  answer = answer and answer.strip().rstrip(".").strip("$").strip()
  return answer or None


def _parse(answer: str) -> list:
  return parse(f"${answer}$", parsing_timeout=None)


def answer_value(gold: str, answer: str) -> str | None:
  """What of `answer` is compared with `gold`: None where it is a relation the gold is not."""
  if _RELATION.search(gold):
    return answer
  assignment = _ASSIGNMENT.fullmatch(answer)
  value = assignment.group(1) if assignment else answer
  return None if _RELATION.search(value) else value


def is_equivalent(gold: str, answer: str) -> bool:
  """math-verify equivalence of two answer strings, in-process and WITHOUT a timeout.

  A gold ending in a percent sign is also read without it; `answer_value` decides what of the
  answer counts. Only for pool workers (or trusted inputs): a pathological answer can hang it.
  """
  value = answer_value(gold, answer)
  if value is None:
    return False
  answer_parsed = _parse(value)
  golds = [gold, _PERCENT_SIGN.sub("", gold)] if _PERCENT_SIGN.search(gold) else [gold]
  return bool(answer_parsed) and any(
      verify(gold_parsed, answer_parsed, timeout_seconds=None)
      for gold_parsed in map(_parse, golds) if gold_parsed)


class MathVerifier:
  """Batch math rewards through a pool of `num_workers` processes.

  `timeout_s` bounds each comparison (it then scores 0); `memory_mb` caps each worker's address
  space. `timeouts`/`errors` count calls that scored 0 for those reasons.
  """

  def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, memory_mb: int = 4096):
    self._pool = TimeoutPool(f"{__name__}:is_equivalent", num_workers, timeout_s, memory_mb)

  @property
  def timeouts(self) -> int:
    return self._pool.timeouts

  @property
  def errors(self) -> int:
    return self._pool.errors

  def rewards(self, responses: Sequence[str], golds: Sequence[str]) -> np.ndarray:
    """1.0 where the response's final answer equals its gold, else 0.0; float64 [B]."""
    if len(responses) != len(golds):
      raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
    answers = [extract_final_answer(r) for r in responses]
    calls = [(g, a) for g, a in zip(golds, answers) if a is not None]
    verdicts = iter(self._pool.map(calls, default=False))
    return np.array([a is not None and next(verdicts) for a in answers], np.float64)

  def close(self) -> None:
    self._pool.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


_shared: MathVerifier | None = None
_shared_lock = threading.Lock()


def shared_verifier() -> MathVerifier:
  """The process-wide verifier behind `math_reward(s)` (default settings, closed at exit)."""
  global _shared
  with _shared_lock:
    if _shared is None:
      _shared = MathVerifier()
      atexit.register(_shared.close)
    return _shared


def math_rewards(responses: Sequence[str], golds: Sequence[str]) -> np.ndarray:
  """Rewards of a whole rollout, float64 [B] in {0, 1}."""
  return shared_verifier().rewards(responses, golds)


def math_reward(response: str, gold: str) -> float:
  """1.0 if the response's final answer is equivalent to `gold`, else 0.0."""
  return float(math_rewards([response], [gold])[0])
