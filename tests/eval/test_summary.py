"""pass@k against brute-force enumeration; summary arithmetic on a planted table."""
import itertools

import numpy as np
import pytest

from kimi_jax.eval.summary import pass_at_k, summarize


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 1, 6), (8, 3, 4)])
def test_pass_at_k_equals_enumeration(n, c, k):
  samples = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(samples, k))
  expected = sum(any(s) for s in subsets) / len(subsets)
  assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_summary_on_planted_results():
  correct = np.array([[1, 0], [0, 0], [1, 1]])
  lengths = np.array([[10, 20], [30, 30], [5, 5]])
  result = summarize(correct, lengths, k=2, difficulty_P=np.array([1, 2, 2]))
  assert result.pass_at_1 == pytest.approx(0.5)
  assert result.pass_at_k == pytest.approx(2 / 3)
  assert result.mean_tokens == pytest.approx(100 / 6)
  assert result.accuracy_per_1k_tokens == pytest.approx(1000 * 0.5 / (100 / 6))
  assert result.by_difficulty == {1: 0.5, 2: 0.5}
  assert result.tokens_by_difficulty == {1: 15.0, 2: 17.5}
  with pytest.raises(ValueError, match="k=3"):
    pass_at_k(2, 1, 3)


def test_pass_at_1_per_domain_when_several():
  correct = np.array([[1, 0], [0, 0], [1, 1]])
  lengths = np.ones((3, 2))
  mixed = summarize(correct, lengths, k=1, domain_P=["chart", "arith", "chart"])
  assert mixed.by_domain == {"arith": 0.0, "chart": 0.75}
  assert mixed.as_dict()["eval/pass@1_chart"] == 0.75
  assert summarize(correct, lengths, k=1, domain_P=["arith"] * 3).by_domain == {}
