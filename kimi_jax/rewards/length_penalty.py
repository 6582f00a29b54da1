"""The k1.5 length reward, host side in numpy.

Within one prompt group of k responses with lengths in tokens: if all lengths are equal every
response gets 0; otherwise lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len), a correct
response gets lambda_i and a wrong one min(0, lambda_i). The reward used for training is
r_i + w * len_reward_i, with w switched on after a warm-up of W iterations. Lengths are only
compared inside a group, never across the batch.
"""
import numpy as np


def _as_vectors(lengths, correct, group_ids=None):
  lengths = np.asarray(lengths)
  correct = np.asarray(correct)
  if lengths.ndim != 1 or lengths.size == 0:
    raise ValueError(f"lengths must be a non-empty 1-D array of token counts, got shape "
                     f"{lengths.shape}")
  if correct.shape != lengths.shape:
    raise ValueError(f"correct has shape {correct.shape}, lengths has {lengths.shape}")
  if correct.dtype != np.bool_:
    raise ValueError(f"correct must be boolean, got dtype {correct.dtype}")
  if np.any(lengths < 0):
    raise ValueError(f"lengths must be >= 0, got min {lengths.min()}")
  if group_ids is not None and np.shape(group_ids) != lengths.shape:
    raise ValueError(f"group_ids has shape {np.shape(group_ids)}, lengths has {lengths.shape}")
  return lengths.astype(np.float64), correct


def length_reward(lengths_N, correct_N) -> np.ndarray:
  """Length reward of the k responses of one prompt, float64 [K]."""
  lengths_N, correct_N = _as_vectors(lengths_N, correct_N)
  shortest, longest = lengths_N.min(), lengths_N.max()
  if longest == shortest:
    return np.zeros_like(lengths_N)
  lambda_N = 0.5 - (lengths_N - shortest) / (longest - shortest)
  return np.where(correct_N, lambda_N, np.minimum(0.0, lambda_N))


def grouped_length_reward(lengths_B, correct_B, group_ids_B) -> np.ndarray:
  """`length_reward` applied to each prompt group of a rollout separately, float64 [B]."""
  lengths_B, correct_B = _as_vectors(lengths_B, correct_B, group_ids_B)
  group_ids_B = np.asarray(group_ids_B)
  rewards_B = np.zeros_like(lengths_B)
  for group in np.unique(group_ids_B):
    rows = group_ids_B == group
    rewards_B[rows] = length_reward(lengths_B[rows], correct_B[rows])
  return rewards_B


def length_penalty_weight(weight: float, iteration: int, warmup_iterations: int) -> float:
  """w from iteration `warmup_iterations` on (iterations count from 0), 0 before."""
  return weight if iteration >= warmup_iterations else 0.0

