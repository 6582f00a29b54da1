"""RL training batches: per-segment loss masks, right-padded arrays, whole-group minibatches."""
import numpy as np

from kimi_jax.rollout.partial import PartialRolloutBuffer, RolloutLimits, collect_groups, new_groups
from kimi_jax.training.rl_data import (build_rl_batch, groups_by_length, pack_rows, pad_groups,
                                       split_minibatches, trim_to_bucket)
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


def test_minibatches_keep_groups_whole():
  b = {"tokens": np.arange(12)[:, None], "group_ids": np.repeat(np.arange(6), 2)}
  mbs = split_minibatches(b, group_size=2, num_minibatches=3)
  assert [mb["group_ids"].tolist() for mb in mbs] == [[0, 0, 1, 1]] * 3
  assert np.concatenate([mb["tokens"] for mb in mbs]).ravel().tolist() == list(range(12))


def test_groups_by_length_puts_the_long_tail_into_one_minibatch_and_keeps_rows_together():
  """Groups of 2 whose longest member ends at 100, 20, 0 (padding), 90, 20, 5: the order is
  descending by that end, ties (20, 20) in batch order; every field moves with its row."""
  ends = [[100, 3], [20, 7], [0, 0], [4, 90], [20, 1], [5, 5]]
  mask = np.zeros((12, 128), np.float32)
  for row, end in enumerate(np.ravel(ends)):
    mask[row, max(end - 2, 0):end] = 1.0
  b = {"tokens": np.arange(12 * 128).reshape(12, 128), "loss_mask": mask,
       "rewards": np.arange(12.0), "group_ids": np.repeat(np.arange(6), 2).astype(np.int32)}
  grouped = groups_by_length(b, group_size=2)
  order = [0, 3, 1, 4, 5, 2]
  rows = [2 * g + i for g in order for i in range(2)]
  for key in ("tokens", "loss_mask", "rewards"):
    np.testing.assert_array_equal(grouped[key], b[key][rows])
  assert grouped["group_ids"].tolist() == np.repeat(np.arange(6), 2).tolist()
  assert grouped["group_ids"].dtype == np.int32
  # Three minibatches of two groups: only the first pays the 128-wide bucket (was: two of them).
  widths = [trim_to_bucket(mb)["tokens"].shape[1] for mb in split_minibatches(grouped, 2, 3)]
  assert widths == [128, 32, 32]
  assert [trim_to_bucket(mb)["tokens"].shape[1] for mb in split_minibatches(b, 2, 3)] == [
      128, 128, 32]


def test_pack_rows_fits_short_trajectories_beside_long_ones_and_unpacks_exactly():
  """Rows used to 60, 30, 25, 20, 10 tokens and three padding rows, width 64: first fit by
  decreasing length gives [60], [30, 25], [20, 10], rounded up to B/2 = 4 packed rows."""
  ends = [20, 60, 0, 10, 25, 30, 0, 0]
  rng = np.random.default_rng(0)
  mask = np.zeros((8, 64), np.float32)
  for row, end in enumerate(ends):
    mask[row, max(end - 5, 0):end] = 1.0
  mb = {"tokens": rng.integers(1, 50, (8, 64)), "targets": rng.integers(1, 50, (8, 64)),
        "loss_mask": mask, "rewards": np.arange(8.0)}
  packed = pack_rows(mb, row_multiple=2)
  assert packed["tokens"].shape == (4, 64) and packed["unpack_index"].shape == (8, 64)
  np.testing.assert_array_equal(packed["loss_mask"], mask)  # per-row fields stay as they were
  np.testing.assert_array_equal(packed["rewards"], mb["rewards"])
  for row, end in enumerate(ends):
    index = packed["unpack_index"][row, :end]
    for key in ("tokens", "targets"):
      np.testing.assert_array_equal(packed[key].reshape(-1)[index], mb[key][row, :end])
    np.testing.assert_array_equal(packed["positions"].reshape(-1)[index], np.arange(end))
    assert set(packed["segment_ids"].reshape(-1)[index]) == ({row + 1} if end else set())
  per_row = [sorted(set(r) - {0}) for r in packed["segment_ids"]]
  assert per_row == [[2], [5, 6], [1, 4], []]  # segment id = original row + 1
  assert pack_rows(mb, row_multiple=8)["tokens"].shape[0] == 8  # B/4, B/2 not multiples of 8
  short = {**mb, "loss_mask": np.where(np.arange(64) < 30, mask, 0.0)}  # [30, 25], [20, 10]
  assert pack_rows(short, row_multiple=1)["tokens"].shape[0] == 2


def test_trim_to_bucket_keeps_every_counted_token_and_rounds_up():
  mask = np.zeros((2, 100), np.float32)
  mask[1, 30:40] = 1.0  # last counted position 39 -> 40 columns -> bucket 64
  mb = {"tokens": np.arange(200).reshape(2, 100), "loss_mask": mask, "rewards": np.ones(2),
        "rope_positions": np.zeros((2, 3, 100)), "frame_ids": np.zeros((2, 100))}  # per patch
  trimmed = trim_to_bucket(mb)
  assert trimmed["tokens"].shape == (2, 64) and trimmed["rewards"].shape == (2,)
  assert trimmed["rope_positions"].shape == (2, 3, 64) and trimmed["frame_ids"].shape == (2, 100)
  np.testing.assert_array_equal(trimmed["tokens"], mb["tokens"][:, :64])
  assert trimmed["loss_mask"].sum() == mask.sum()
  mask[0, 90] = 1.0  # past the largest power of two: the full width
  assert trim_to_bucket(mb)["tokens"].shape == (2, 100)
  assert trim_to_bucket({**mb, "loss_mask": np.zeros((2, 100))})["tokens"].shape == (2, 32)


def test_pad_groups_appends_finished_empty_groups_that_train_on_nothing():
  complete = new_groups([P(c, "2", "y") for c in "abcde"], encode, k=2, first_group_id=0,
                        version=0)
  for group in complete:
    for t in group.trajectories:
      t.extend([10, EOS], [-0.5, -0.1], version=0)
      t.finished = True
  padded = pad_groups(complete, groups_per_minibatch=4, k=2)
  assert padded[:5] == complete and len(padded) == 8
  for group in padded[5:]:
    assert group.complete and len(group.trajectories) == 2 and group.group_id == -1
    assert all(t.prompt_ids == [2] and t.response_ids == [] for t in group.trajectories)
  batch = build_rl_batch(padded, np.ones(16), seq_len=4, pad_id=99, train_old_segments=False)
  assert batch["loss_mask"][:10].sum(-1).tolist() == [2.0] * 10
  assert batch["loss_mask"][10:].sum() == 0
  assert batch["group_ids"].tolist() == [g for g in range(8) for _ in range(2)]
  assert pad_groups(complete[:4], groups_per_minibatch=4, k=2) == complete[:4]
