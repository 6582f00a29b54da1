"""The k1.5 length reward against hand-computed cases of the paper's formula."""
import numpy as np
import pytest

from kimi_jax.rewards.length_penalty import (grouped_length_reward, length_penalty_weight,
                                             length_reward)
from kimi_jax.rewards.registry import score_rollout

EXACT = 1e-15  # every hand value below is a short sum of dyadic / small rationals


def test_hand_case_mixed_group():
  # min 10, max 30: lambda = 0.5 - (len - 10) / 20 = (0.5, 0, -0.5, 0.25).
  got = length_reward([10, 20, 30, 15], np.array([True, True, False, False]))
  np.testing.assert_allclose(got, [0.5, 0.0, -0.5, 0.0], atol=EXACT)  # wrong: min(0, lambda)


def test_all_equal_lengths_give_zero():
  np.testing.assert_array_equal(length_reward([7, 7, 7], np.array([True, False, True])), 0.0)


def test_all_wrong_group_is_never_rewarded():
  # lambda = (0.5, 0, -0.5); wrong answers keep only the negative part.
  np.testing.assert_allclose(length_reward([4, 6, 8], np.zeros(3, bool)), [0.0, 0.0, -0.5],
                             atol=EXACT)


def test_all_correct_group_gets_lambda():
  np.testing.assert_allclose(length_reward([8, 4, 6, 5], np.ones(4, bool)),
                             [-0.5, 0.5, 0.0, 0.25], atol=EXACT)


def test_groups_are_isolated_in_the_batched_version():
  lengths = np.array([100, 10, 200, 20, 10, 30, 5])
  correct = np.array([True, True, False, True, True, False, True])
  group_ids = np.array([0, 1, 0, 1, 1, 2, 0])
  # Group 0 (100, 200, 5): min 5, max 200. Group 1 (10, 20, 10): min 10, max 20.
  # Group 2 has one response: max == min -> 0. A batch-wide min/max would change every value.
  want = np.zeros(7)
  want[[0, 2, 6]] = [0.5 - 95 / 195, min(0.0, 0.5 - 1.0), 0.5]
  want[[1, 3, 4]] = [0.5, -0.5, 0.5]
  np.testing.assert_allclose(grouped_length_reward(lengths, correct, group_ids), want, atol=EXACT)


@pytest.mark.parametrize("iteration, want_weight", [(0, 0.0), (2, 0.0), (3, 0.2), (50, 0.2)])
def test_warmup_switch(iteration, want_weight):
  assert length_penalty_weight(0.2, iteration, warmup_iterations=3) == want_weight
  # The training reward goes through the registry: task reward (arith: exact answer) + w * len.
  responses = ["#7", "#7", "#8", "#7"]
  lengths = np.array([10, 30, 20, 12])
  group_ids = np.array([0, 0, 1, 1])
  scores = score_rollout({"arith": "arith"}, ["arith"] * 4, responses, ["7"] * 4, lengths,
                         group_ids, 0.2, 3, iteration)
  np.testing.assert_array_equal(scores.correct, [True, True, False, True])
  # Group 0: lambda (0.5, -0.5); group 1 (20 wrong, 12 correct): lambda (-0.5, 0.5).
  want = np.array([1.0, 1.0, 0.0, 1.0]) + want_weight * np.array([0.5, -0.5, -0.5, 0.5])
  np.testing.assert_allclose(scores.rewards, want, atol=EXACT)


@pytest.mark.parametrize("lengths, correct, message", [
    ([], np.array([], bool), "non-empty 1-D"),
    ([3, 4], np.array([True]), "correct has shape"),
    ([3, 4], np.array([1, 0]), "correct must be boolean"),
    ([3, -1], np.array([True, True]), "lengths must be >= 0"),
])
def test_bad_input_names_the_field(lengths, correct, message):
  with pytest.raises(ValueError, match=message):
    length_reward(lengths, correct)
