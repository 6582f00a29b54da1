"""Curation with a scripted model: hackable and known-easy prompts removed, reasons reported."""
import dataclasses
import json

import pytest

from kimi_jax.data.curation import (GUESSABLE, MULTIPLE_CHOICE, PROOF, TOO_EASY, TOO_HARD,
                                    TRUE_FALSE, CurationConfig, curate, hack_category)
from kimi_jax.data.sources import Prompt

CONFIG = CurationConfig(num_samples=10, temperature=1.2, max_new_tokens=64, guess_tries=8,
                        guess_max_new_tokens=4, guess_template="{question} Answer only:")


def prompt(pid, question, answer="5"):
  return Prompt(question=question, answer=answer, id=pid)


class ScriptedModel:
  """Deterministic stand-in for the rollout client.

  With chain of thought, question q is answered correctly by the first `solved[q]` of the n
  samples; asked for the answer alone (the guess template), only `guessable` questions are.
  """

  def __init__(self, prompts, solved, guessable):
    self.answers = {p.question: p.answer for p in prompts}
    self.solved, self.guessable = solved, guessable
    self.calls = []

  def __call__(self, texts, n, temperature, max_new_tokens):
    self.calls.append((n, temperature, max_new_tokens, list(texts)))
    out = []
    for text in texts:
      if text.endswith(" Answer only:"):
        question = text.removesuffix(" Answer only:")
        correct = n if question in self.guessable else 0
      else:
        question, correct = text, self.solved.get(text, 0)
      out.append([self.answers[question] if i < correct else "wrong" for i in range(n)])
    return out


def exact_reward(response, answer):
  return float(response == answer)


PROMPTS = [
    prompt("mc", "Which value is prime?\nA. 4\nB. 5\nC. 6", "B"),
    prompt("tf", "True or false: 2 is even.", "True"),
    prompt("tf_answer", "Is 2 even?", "yes"),
    prompt("proof", "Prove that there are infinitely many primes.", "QED"),
    prompt("easy", "2+3="),        # answered even without chain of thought: guessable
    prompt("always", "9-4="),      # solved 10/10 with chain of thought only
    prompt("medium", "1+4="),      # 3/10
    prompt("hard", "8-3="),        # 0/10
]
SOLVED = {"2+3=": 10, "9-4=": 10, "1+4=": 3}


def test_known_easy_and_hackable_prompts_removed_with_reasons(tmp_path):
  model = ScriptedModel(PROMPTS, SOLVED, guessable={"2+3="})
  kept, report = curate(PROMPTS, model, exact_reward, CONFIG)

  assert [(p.id, p.difficulty) for p in kept] == [("always", 0), ("medium", 7), ("hard", 10)]
  reasons = {r.id: (r.reason, r.detail) for r in report.removed}
  assert reasons == {
      "mc": (MULTIPLE_CHOICE, "option labels ['A', 'B', 'C'] in the question"),
      "tf": (TRUE_FALSE, "question says 'True or false'"),
      "tf_answer": (TRUE_FALSE, "answer is 'yes'"),
      "proof": (PROOF, "question says 'Prove'"),
      "easy": (GUESSABLE, "8 of 8 answers without chain of thought were correct"),
  }
  assert report.pass_rates == {"always": 1.0, "medium": 0.3, "hard": 0.0}

  # Text filters cost no generation; the guess stage asks 8 short answers, the pass-rate
  # stage 10 full samples at the configured temperature.
  (guess_n, guess_t, guess_len, guess_texts), (n, t, length, texts) = model.calls
  assert (guess_n, guess_t, guess_len) == (8, 1.2, 4)
  assert guess_texts == [f"{q} Answer only:" for q in ("2+3=", "9-4=", "1+4=", "8-3=")]
  assert (n, t, length, texts) == (10, 1.2, 64, ["9-4=", "1+4=", "8-3="])

  report.write(str(tmp_path / "report.json"))
  written = json.loads((tmp_path / "report.json").read_text())
  assert written["num_kept"] == 3 and written["num_removed"] == 5
  assert written["removed_by_reason"] == {MULTIPLE_CHOICE: 1, TRUE_FALSE: 2, PROOF: 1, GUESSABLE: 1}
  assert {"id": "easy", "reason": GUESSABLE,
          "detail": "8 of 8 answers without chain of thought were correct"} in written["removed"]


def test_pass_rate_window():
  model = ScriptedModel(PROMPTS, SOLVED, guessable=set())
  config = dataclasses.replace(CONFIG, min_pass_rate=0.1, max_pass_rate=0.9)
  kept, report = curate(PROMPTS[4:], model, exact_reward, config)
  assert [p.id for p in kept] == ["medium"]
  assert {(r.id, r.reason, r.detail) for r in report.removed} == {
      ("easy", TOO_EASY, "pass rate 1.00 > 0.9"), ("always", TOO_EASY, "pass rate 1.00 > 0.9"),
      ("hard", TOO_HARD, "pass rate 0.00 < 0.1")}


@pytest.mark.parametrize("question, answer, category", [
    ("Pick one: (A) 3 (B) 4", "A", MULTIPLE_CHOICE),
    ("Which of the following numbers is even? 3, 4", "4", MULTIPLE_CHOICE),
    ("Options:\n1) x\n2) y", "1", MULTIPLE_CHOICE),
    ("Is it true/false that 1 > 2?", "F", TRUE_FALSE),
    ("Show that x^2 >= 0 for real x.", "", PROOF),
    ("Janet has 3 apples and buys 2 more (a) dozen times. How many?", "27", None),
    ("Compute the proportion of even numbers below 10.", "0.5", None),
    ("A. Smith walks 3 km. How far?", "3", None),  # one label-like line is not a choice list
])
def test_hack_categories(question, answer, category):
  found = hack_category(prompt("x", question, answer))
  assert (found and found[0]) == category


def test_generate_contract_is_checked():
  short = lambda texts, n, temperature, max_new_tokens: [["5"] * (n - 1) for _ in texts]
  with pytest.raises(RuntimeError, match="must return 8 completions for each of 1 prompts"):
    curate([prompt("a", "2+3=")], short, exact_reward, CONFIG)
