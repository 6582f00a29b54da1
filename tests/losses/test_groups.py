"""Group statistics against per-group numpy loops."""
import numpy as np
import pytest

from kimi_jax.losses import groups

# Unequal, non-contiguous groups: ids 3, 0, 5 with sizes 3, 2, 1.
GROUP_IDS = np.array([3, 0, 3, 5, 0, 3])
VALUES = np.array([0.2, 1.0, -0.7, 2.5, 0.0, 1.3])
F64_TOL = 1e-12  # float64 round-off on a handful of additions


def _per_group(values, group_ids, stat):
  out = np.zeros_like(values)
  for g in np.unique(group_ids):
    out[group_ids == g] = stat(values[group_ids == g])
  return out


@pytest.mark.parametrize("name, reference", [
    ("group_mean", np.mean),
    ("group_std", np.std),  # numpy's default ddof=0
    ("group_sizes", np.size),
])
def test_group_statistics_match_numpy(name, reference, x64):
  if name == "group_sizes":
    got = groups.group_sizes(GROUP_IDS)
  else:
    got = getattr(groups, name)(VALUES, GROUP_IDS)
  np.testing.assert_allclose(got, _per_group(VALUES, GROUP_IDS, reference), atol=F64_TOL)


@pytest.mark.parametrize("temperature", [0.3, 2.0])
def test_group_log_mean_exp_matches_numpy(temperature, x64):
  reference = _per_group(VALUES, GROUP_IDS,
                         lambda v: temperature * np.log(np.mean(np.exp(v / temperature))))
  got = groups.group_log_mean_exp(VALUES, GROUP_IDS, temperature)
  np.testing.assert_allclose(got, reference, atol=F64_TOL)


def test_group_log_mean_exp_is_stable_at_small_temperature():
  # exp(1 / 1e-3) overflows float64; closed form for rewards in {0, 1} with m of n correct:
  # tau log((m e^{1/tau} + n - m) / n) = 1 + tau log(m / n) + O(e^{-1/tau}).
  tau = 1e-3
  rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.0])
  got = groups.group_log_mean_exp(rewards.astype(np.float32), np.zeros(5, np.int32), tau)
  np.testing.assert_allclose(got, 1.0 + tau * np.log(2 / 5), rtol=1e-6)  # float32 round-off
