"""Synthetic arithmetic task: worked solutions, grading, datasets and splits."""
import re

import numpy as np
import pytest

from kimi_jax.data.synthetic import (CHARSET, extract_answer, is_correct, make_dataset,
                                     make_problem, solve, target_response, train_heldout_split,
                                     verification, worksheet)
from kimi_jax.data.tokenizer import char_tokenizer


def left_to_right(question: str) -> int:
  # Independent reference: Python evaluates chains of + and - left to right.
  return eval(question.rstrip("="))  # pylint: disable=eval-used


def test_worked_example():
  problem = solve("7+5-3=")
  assert (problem.answer, problem.cot, problem.difficulty) == ("9", "7+5=12,12-3=9", 2)
  assert target_response(problem) == "7+5=12,12-3=9#9"


@pytest.mark.parametrize("level, max_operand", [(1, 9), (2, 9), (4, 9), (6, 99)])
def test_random_problems(level, max_operand):
  rng = np.random.default_rng(level)
  for _ in range(200):
    p = make_problem(rng, level, max_operand)
    assert p.difficulty == level and p.question.count("+") + p.question.count("-") == level
    operands = [int(x) for x in p.question.rstrip("=").replace("-", "+").split("+")]
    assert all(0 <= x <= max_operand for x in operands)
    assert int(p.answer) == left_to_right(p.question)
    steps = p.cot.split(",")
    assert len(steps) == level
    for step in steps:  # each step is true and its running total is non-negative
      lhs, rhs = step.split("=")
      assert left_to_right(lhs) == int(rhs) >= 0
    assert steps[-1].endswith("=" + p.answer)
    assert set(p.question + target_response(p)) <= set(CHARSET)
    assert is_correct(target_response(p), p.answer)


def test_charset_builds_a_lossless_char_tokenizer():
  tok = char_tokenizer(CHARSET)
  p = make_problem(np.random.default_rng(0), 4)
  text = p.question + target_response(p)
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.hf.token_to_id("<unk>") not in ids


@pytest.mark.parametrize("response, extracted, correct", [
    ("7+5=12,12-3=9#9", "9", True),
    ("#3#9", "9", True),  # the last marker counts
    ("#9#3", "3", False),
    ("7+5=12#09", "09", False),  # exact string: no normalisation
    ("#9,1", "9,1", False),
    ("9", None, False),
    ("#", "", False),
])
def test_grading(response, extracted, correct):
  assert extract_answer(response) == extracted
  assert is_correct(response, "9") is correct


def test_solve_rejects_non_questions():
  for bad in ("7+5", "7=", "7*2=", "-1+2=", "1++2="):
    with pytest.raises(ValueError, match="not an arithmetic question"):
      solve(bad)


def test_dataset_ids_levels_and_determinism():
  prompts = make_dataset(40, (1, 3), seed=5)
  assert len({p.id for p in prompts}) == 40
  assert [p.difficulty for p in prompts[:4]] == [1, 3, 1, 3]
  assert all(p.answer == solve(p.question).answer for p in prompts)
  assert make_dataset(40, (1, 3), seed=5) == prompts
  assert make_dataset(40, (1, 3), seed=6) != prompts


def test_split_is_disjoint_and_heldout_distinct():
  train, heldout = train_heldout_split(600, 120, (1, 2), seed=0)
  heldout_questions = {p.question for p in heldout}
  assert len(heldout_questions) == 120
  assert not heldout_questions & {p.question for p in train}
  assert len({p.id for p in train + heldout}) == 720


def test_exhausted_level_raises():
  # Level 1 with operands 0..1 has exactly 7 questions: 0+0 0+1 1+0 1+1 0-0 1-0 1-1.
  assert len({p.question for p in make_dataset(7, (1,), 0, max_operand=1, distinct=True)}) == 7
  with pytest.raises(ValueError, match="level 1 .*no new question"):
    make_dataset(8, (1,), 0, max_operand=1, distinct=True)


def test_verification_undoes_the_steps():
  assert verification(solve("7+5-3=")) == "9+3=12,12-5=7"
  rng = np.random.default_rng(3)
  for level in (1, 2, 4):
    problem = make_problem(rng, level, max_operand=9)
    steps = verification(problem).split(",")
    assert len(steps) == level
    value = int(problem.answer)
    for step in steps:  # each step is true arithmetic and starts where the previous ended
      left, result = step.split("=")
      assert int(left.split("+")[0].split("-")[0]) == value
      value = left_to_right(left + "=")
      assert value == int(result)
    assert value == int(re.match(r"\d+", problem.question).group())
    response = target_response(problem, verify=True)
    assert is_correct(response, problem.answer) and set(response) <= set(CHARSET)


def test_worksheet_repeats_itself():
  sheet = worksheet(np.random.default_rng(0), num_problems=5, levels=(1, 2), max_operand=9)
  half = sheet[:len(sheet) // 2]
  assert sheet == half + half and half.count("#") == 5 and set(sheet) <= set(CHARSET)
  once = worksheet(np.random.default_rng(0), 5, (1, 2), 9, repeat=False)
  assert once == half
