"""RL training rows: per-segment loss masks, right-padded arrays."""
import numpy as np

from kimi_jax.rollout.partial import PartialRolloutBuffer, RolloutLimits, collect_groups, new_groups
from kimi_jax.training.rl_data import build_rl_batch
from tests.rollout.test_partial import EOS, SAMPLING, P, ScriptedPolicy, encode


def _two_segment_group():
  policy = ScriptedPolicy({2: [10, 11, 12, EOS]})
  buffer = PartialRolloutBuffer()
  groups = new_groups([P("b", "2", "y")], encode, k=1, first_group_id=7, version=3)
  limits = RolloutLimits(max_response_tokens=8, segment_tokens=2)
  collect_groups(policy, SAMPLING, groups, buffer, limits, 3, 0)
  return collect_groups(policy, SAMPLING, [], buffer, limits, 4, 0)[0]


def test_loss_mask_follows_segment_policy():
  groups = _two_segment_group()
  for train_old, expected in ((True, [1, 1, 1, 1]), (False, [0, 0, 1, 1])):
    batch = build_rl_batch(groups, np.ones(1), seq_len=8, pad_id=99,
                           train_old_segments=train_old)
    # prompt has 1 token: response token i is predicted at position i.
    np.testing.assert_array_equal(batch["loss_mask"][0, :4], expected)
    assert batch["loss_mask"][0, 4:].sum() == 0
    np.testing.assert_array_equal(batch["targets"][0, :4], [10, 11, 12, EOS])
    np.testing.assert_array_equal(batch["tokens"][0, :5], [2, 10, 11, 12, EOS])


def test_trajectory_finished_early_keeps_its_final_segment_in_the_loss():
  """Prompt 1 answers in 3 tokens (iteration 0); its sibling, prompt 2's twin in the same group,
  needs 3 iterations. Without old segments, each trajectory still trains its final segment."""
  policy = ScriptedPolicy({1: [5, 6, EOS], 2: list(range(10, 19)) + [EOS]})
  limits = RolloutLimits(max_response_tokens=32, segment_tokens=4)
  buffer = PartialRolloutBuffer()
  (group,) = new_groups([P("a", "1", "x")], encode, k=2, first_group_id=0, version=0)
  group.trajectories[1].prompt_ids = [2]  # the sibling that runs long
  complete = []
  for version in range(3):
    complete += collect_groups(policy, SAMPLING, [group] if version == 0 else [], buffer, limits, version,
                               seed_base=0)[0]
  assert complete == [group]
  short, long = group.trajectories
  assert [s.version for s in short.segments] == [0] and [s.version for s in long.segments] == [0, 1, 2]
  batch = build_rl_batch(complete, np.ones(2), seq_len=16, pad_id=99, train_old_segments=False)
  np.testing.assert_array_equal(batch["loss_mask"][0, :4], [1, 1, 1, 0])  # 3 tokens, all trained
  np.testing.assert_array_equal(batch["loss_mask"][1, :11], [0] * 8 + [1, 1, 0])  # last segment
