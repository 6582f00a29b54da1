"""Prompt curation (k1.5 section 2.1): easy-to-hack filters and difficulty.

Order: text filters (multiple-choice, true/false, proof; free), then the guess filter (the model
answers without chain of thought, `guess_tries` samples; a prompt is dropped if any is correct),
then difficulty from the pass rate over `num_samples` samples at `temperature`. Kept prompts get
difficulty = number of failed samples (0 = solved every time, num_samples = never solved), and
prompts whose pass rate falls outside [min_pass_rate, max_pass_rate] are dropped.

The model is reached through two injected callables:
  generate(prompts, n, temperature, max_new_tokens) -> n completions per prompt
  reward(response, answer) -> float, > 0 meaning correct
"""
import dataclasses
import json
import re
from typing import Callable, Sequence

from kimi_jax.data.sources import Prompt

Generate = Callable[[list[str], int, float, int], list[list[str]]]
Reward = Callable[[str, str], float]

MULTIPLE_CHOICE, TRUE_FALSE, PROOF = "multiple_choice", "true_false", "proof"
GUESSABLE, TOO_EASY, TOO_HARD = "guessable", "too_easy", "too_hard"

# Option labels: "A." / "(b)" / "C)" / "D:" starting a line, or "(A) " inside a line.
_LINE_OPTION = re.compile(r"^\s*\(?([A-Ea-e])[.):]\s", re.MULTILINE)
_INLINE_OPTION = re.compile(r"\(([A-E])\)\s")
_CHOICE_WORDING = re.compile(r"which of the following|answer choices|\boptions?:|\bchoices?:",
                             re.IGNORECASE)
_TRUE_FALSE_WORDING = re.compile(r"true or false|true/false|\(t/f\)|\bT/F\b", re.IGNORECASE)
_TRUE_FALSE_ANSWER = re.compile(r"\s*(true|false|yes|no|t|f)\s*\.?\s*", re.IGNORECASE)
_PROOF_WORDING = re.compile(r"\bprove\b|\bproof\b|\bshow that\b|\bdemonstrate that\b",
                            re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class CurationConfig:
  num_samples: int = 10
  temperature: float = 1.0
  max_new_tokens: int = 1024
  guess_tries: int = 8
  guess_max_new_tokens: int = 32
  guess_template: str = "{question}\nGive only the final answer, without reasoning."
  min_pass_rate: float = 0.0
  max_pass_rate: float = 1.0


@dataclasses.dataclass(frozen=True)
class Removal:
  id: str
  reason: str  # one of MULTIPLE_CHOICE, TRUE_FALSE, PROOF, GUESSABLE, TOO_EASY, TOO_HARD
  detail: str


@dataclasses.dataclass
class CurationReport:
  kept: list[str]
  removed: list[Removal]
  pass_rates: dict[str, float]  # every prompt that reached difficulty estimation

  def counts(self) -> dict[str, int]:
    counts = {}
    for removal in self.removed:
      counts[removal.reason] = counts.get(removal.reason, 0) + 1
    return counts

  def to_json(self) -> dict:
    return {"num_kept": len(self.kept), "num_removed": len(self.removed),
            "removed_by_reason": self.counts(), **dataclasses.asdict(self)}

  def write(self, path: str) -> None:
    with open(path, "w") as f:
      json.dump(self.to_json(), f, indent=2)


def hack_category(prompt: Prompt) -> tuple[str, str] | None:
  """(reason, detail) if the question's form makes it easy to hack, else None."""
  options = {label.upper() for label in _LINE_OPTION.findall(prompt.question)}
  options |= set(_INLINE_OPTION.findall(prompt.question))
  if len(options) >= 2:
    return MULTIPLE_CHOICE, f"option labels {sorted(options)} in the question"
  if wording := _CHOICE_WORDING.search(prompt.question):
    return MULTIPLE_CHOICE, f"question says {wording.group(0)!r}"
  if wording := _TRUE_FALSE_WORDING.search(prompt.question):
    return TRUE_FALSE, f"question says {wording.group(0)!r}"
  if _TRUE_FALSE_ANSWER.fullmatch(prompt.answer):
    return TRUE_FALSE, f"answer is {prompt.answer!r}"
  if wording := _PROOF_WORDING.search(prompt.question):
    return PROOF, f"question says {wording.group(0)!r}"
  return None


def count_correct(prompts: Sequence[Prompt], generate: Generate, reward: Reward, n: int,
                  temperature: float, max_new_tokens: int,
                  template: str = "{question}") -> list[int]:
  """Correct completions out of `n` per prompt, the prompt text being `template` filled in."""
  texts = [template.format(question=p.question) for p in prompts]
  completions = generate(texts, n, temperature, max_new_tokens) if texts else []
  if len(completions) != len(texts) or any(len(c) != n for c in completions):
    raise RuntimeError(f"generate must return {n} completions for each of {len(texts)} prompts, "
                       f"got {[len(c) for c in completions]}")
  return [sum(reward(response, p.answer) > 0 for response in responses)
          for p, responses in zip(prompts, completions)]


def curate(prompts: Sequence[Prompt], generate: Generate, reward: Reward,
           config: CurationConfig = CurationConfig()) -> tuple[list[Prompt], CurationReport]:
  """Filter `prompts` and label the kept ones with a difficulty; returns (kept, report)."""
  removed, candidates = [], []
  for prompt in prompts:
    category = hack_category(prompt)
    if category:
      removed.append(Removal(prompt.id, *category))
    else:
      candidates.append(prompt)

  guessed = count_correct(candidates, generate, reward, config.guess_tries, config.temperature,
                          config.guess_max_new_tokens, config.guess_template)
  unguessed = []
  for prompt, correct in zip(candidates, guessed):
    if correct:
      removed.append(Removal(prompt.id, GUESSABLE, f"{correct} of {config.guess_tries} answers "
                             "without chain of thought were correct"))
    else:
      unguessed.append(prompt)

  passed = count_correct(unguessed, generate, reward, config.num_samples, config.temperature,
                         config.max_new_tokens)
  kept, rates = [], {}
  for prompt, correct in zip(unguessed, passed):
    rate = rates[prompt.id] = correct / config.num_samples
    if rate > config.max_pass_rate:
      removed.append(Removal(prompt.id, TOO_EASY, f"pass rate {rate:.2f} > {config.max_pass_rate}"))
    elif rate < config.min_pass_rate:
      removed.append(Removal(prompt.id, TOO_HARD, f"pass rate {rate:.2f} < {config.min_pass_rate}"))
    else:
      kept.append(dataclasses.replace(prompt, difficulty=config.num_samples - correct))
  return kept, CurationReport([p.id for p in kept], removed, rates)
