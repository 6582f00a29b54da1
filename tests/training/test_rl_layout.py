"""The RL batch layout: whole groups per slice in every minibatch, longest first, one bucket per
minibatch, packing per slice, and each process building its block from its own rows only."""
import numpy as np
import pytest

from kimi_jax.rollout.partial import new_groups
from kimi_jax.training.rl_data import build_rl_batch, counted_ends
from kimi_jax.training.rl_layout import (Layout, LocalRows, bucket_length, plan_minibatches,
                                         process_block)
from tests.rollout.test_partial import EOS, P, encode

PAD = 99


def one_slice_minibatches(batch, k: int, groups_per_minibatch: int, pack: bool = True,
                          row_multiple: int = 1) -> list[dict]:
  """The minibatches of `batch` (rows of consecutive groups of k) as one process, one slice."""
  groups = len(batch["rewards"]) // k
  layout = Layout(k, groups_per_minibatch, groups, 1, row_multiple, pack)
  ids = np.arange(groups)
  local = LocalRows.of(batch, ids, np.repeat(ids, k), k)
  plans = plan_minibatches(layout, np.zeros(groups, np.int64), counted_ends(batch["loss_mask"]),
                           batch["loss_mask"].shape[1])
  return [process_block(plan, layout, local, range(1), PAD) for plan in plans]


def rows_ending_at(ends, width: int, seed: int = 0) -> dict:
  """Rows whose last 2 counted tokens end at `ends` (0: a row with none), random tokens."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((len(ends), width), np.float32)
  for row, end in enumerate(ends):
    mask[row, max(end - 2, 0):end] = 1.0
  return {"tokens": rng.integers(1, 50, (len(ends), width)).astype(np.int32),
          "targets": rng.integers(1, 50, (len(ends), width)).astype(np.int32),
          "loss_mask": mask, "rewards": np.arange(float(len(ends)), dtype=np.float32)}


def test_minibatches_take_groups_longest_first_and_pay_one_bucket_each():
  """Groups of 2 whose longest member ends at 100, 20, 0 (padding), 90, 20, 5: minibatches of
  two groups in descending order (ties in batch order), every field moving with its row; only
  the first minibatch pays the 128-wide bucket (batch order would make two of them pay it)."""
  batch = rows_ending_at([100, 3, 20, 7, 0, 0, 4, 90, 20, 1, 5, 5], 128)
  minibatches = one_slice_minibatches(batch, k=2, groups_per_minibatch=2, pack=False)
  order = [0, 3, 1, 4, 5, 2]
  rows = [2 * g + i for g in order for i in range(2)]
  for i, mb in enumerate(minibatches):
    mb_rows, width = rows[4 * i:4 * i + 4], mb["loss_mask"].shape[1]
    for key in ("tokens", "targets", "loss_mask"):
      np.testing.assert_array_equal(mb[key], batch[key][mb_rows, :width])
    np.testing.assert_array_equal(mb["rewards"], batch["rewards"][mb_rows])
  assert [mb["tokens"].shape[1] for mb in minibatches] == [128, 32, 32]
  for mb in minibatches:
    assert mb["group_ids"].tolist() == [0, 0, 1, 1] and mb["group_ids"].dtype == np.int32
    np.testing.assert_array_equal(mb["unpack_index"].reshape(-1), np.arange(mb["loss_mask"].size))
    assert not mb["ref_logp"].any() and not mb["ref_is_own"].any()


def test_bucket_length_keeps_every_counted_token_and_rounds_up():
  assert bucket_length(40, 100, 32) == 64
  assert bucket_length(91, 100, 32) == 100  # past the largest power of two: the full width
  assert bucket_length(0, 100, 32) == bucket_length(5, 100, 32) == 32
  assert bucket_length(64, 100, 32) == 64 and bucket_length(65, 100, 32) == 100


def test_packing_fits_short_trajectories_beside_long_ones_and_unpacks_exactly():
  """Rows used to 60, 30, 25, 20, 10 tokens and three padding rows, width 64: first fit by
  decreasing length gives [60], [30, 25], [20, 10], rounded up to B/2 = 4 packed rows."""
  ends = [20, 60, 0, 10, 25, 30, 0, 0]
  batch = rows_ending_at(ends, 64)
  [packed] = one_slice_minibatches(batch, k=2, groups_per_minibatch=4, row_multiple=2)
  [plain] = one_slice_minibatches(batch, k=2, groups_per_minibatch=4, pack=False)
  assert packed["tokens"].shape == (4, 64) and packed["unpack_index"].shape == (8, 64)
  for key in ("loss_mask", "rewards", "group_ids"):  # per-row fields stay as unpacked
    np.testing.assert_array_equal(packed[key], plain[key])
  order = [2 * g + i for g in (0, 2, 1, 3) for i in range(2)]  # groups longest first
  for row, end in enumerate(np.array(ends)[order]):
    index = packed["unpack_index"][row, :end]
    for key in ("tokens", "targets"):
      np.testing.assert_array_equal(packed[key].reshape(-1)[index], plain[key][row, :end])
    np.testing.assert_array_equal(packed["positions"].reshape(-1)[index], np.arange(end))
    assert set(packed["segment_ids"].reshape(-1)[index]) == ({row + 1} if end else set())
  assert [sorted(set(r) - {0}) for r in packed["segment_ids"]] == [[2], [3, 4], [1, 6], []]
  [wide] = one_slice_minibatches(batch, k=2, groups_per_minibatch=4, row_multiple=8)
  assert wide["tokens"].shape[0] == 8  # B/4 and B/2 are not multiples of 8
  short = rows_ending_at([20, 0, 0, 10, 12, 5, 0, 0], 64)  # bucket 32: [20, 12], [10, 5]
  assert one_slice_minibatches(short, k=2, groups_per_minibatch=4)[0]["tokens"].shape == (2, 32)


def complete_groups(group_ids, seed: int):
  """Finished groups of 2 with these ids, responses of 1 to 12 tokens."""
  rng = np.random.default_rng(seed)
  groups = []
  for group_id in group_ids:
    [group] = new_groups([P(str(group_id), "2", "y")], encode, k=2, first_group_id=group_id,
                         version=0)
    for t in group.trajectories:
      n = int(rng.integers(1, 13))
      t.extend(list(rng.integers(10, 40, n - 1)) + [EOS], [-0.5] * n, version=0)
      t.finished = True
    groups.append(group)
  return groups


def built_rows(groups):
  rewards_B = [g.group_id + i / 2 for g in groups for i in range(2)]  # a row's own reward
  return build_rl_batch(groups, np.array(rewards_B), seq_len=24, pad_id=PAD,
                        train_old_segments=False)


@pytest.mark.parametrize("pack", [True, False])
def test_each_process_builds_its_block_from_its_own_groups_and_the_blocks_make_the_batch(pack):
  """8 prompts per iteration in 2 slices of 4 (process p owns slice p as one of 2 processes),
  minibatches of 4 groups. Iteration 1's complete groups: 8, 9, 11 and a buffered 2 (slice 0),
  13, 14, 15, 5 and 6 (slice 1). Each simulated process sees only its own groups' rows and
  every process's facts; its blocks must stack into the minibatches of one process holding
  every group, and every minibatch takes 2 groups of each slice (slice 0 pads with empty ones)."""
  k, layout = 2, Layout(2, 4, 8, num_slices=2, row_multiple=2, pack=pack)
  owned = {0: complete_groups([2, 8, 9, 11], seed=0), 1: complete_groups([5, 6, 13, 14, 15], 1)}
  every = sorted(owned[0] + owned[1], key=lambda g: g.group_id)
  ids_B = np.array([g.group_id for g in every for _ in range(k)])
  end_B = counted_ends(built_rows(every)["loss_mask"])
  plans = plan_minibatches(layout, layout.slice_of(ids_B[::k]), end_B, 24)
  assert len(plans) == 3  # slice 1's five groups need three minibatches of two
  one = LocalRows.of(built_rows(every), [g.group_id for g in every], ids_B, k)
  locals_ = {p: LocalRows.of(built_rows(owned[p]), [g.group_id for g in owned[p]], ids_B, k)
             for p in (0, 1)}
  for plan in plans:
    whole = process_block(plan, layout, one, layout.owned_slices(0, 1), PAD)
    blocks = [process_block(plan, layout, locals_[p], layout.owned_slices(p, 2), PAD)
              for p in (0, 1)]
    assert whole.keys() == blocks[0].keys()
    for key, value in whole.items():
      np.testing.assert_array_equal(np.concatenate([b[key] for b in blocks]), value, err_msg=key)
    assert plan.rows_HxR.shape == (2, 4)
    for h, rows_R in enumerate(plan.rows_HxR):  # slice h's rows hold slice h's groups
      assert (layout.slice_of(ids_B[rows_R[rows_R >= 0]]) == h).all()
  # The empty groups slice 0 adds train on nothing: pad tokens, no counted token.
  last = process_block(plans[-1], layout, locals_[0], layout.owned_slices(0, 2), PAD)
  assert (plans[-1].rows_HxR[0] == -1).all() and not last["loss_mask"].any()
  if not pack:
    assert (last["tokens"] == PAD).all()
  # Process 1 cannot build process 0's block: it has none of those rows.
  with pytest.raises(ValueError, match="another process"):
    process_block(plans[0], layout, locals_[1], layout.owned_slices(0, 2), PAD)


def test_layout_errors_name_the_config_keys():
  with pytest.raises(ValueError, match="rl.groups_per_minibatch=3"):
    Layout(2, 3, 8, num_slices=2, row_multiple=1, pack=True)
  with pytest.raises(ValueError, match="rl.batch_slices=2 must be a multiple of the 4"):
    Layout(2, 4, 8, num_slices=2, row_multiple=1, pack=True).owned_slices(0, 4)
