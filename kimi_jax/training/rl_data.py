"""Host-side RL training batches from complete prompt groups: padding to whole minibatches,
per-segment loss masks, right-padded arrays, minibatch splits, the rows' images."""
import dataclasses
from typing import Sequence

import numpy as np

from kimi_jax.data import images
from kimi_jax.data.image_batches import image_fields, padded_patches
from kimi_jax.model.config import VisionConfig
from kimi_jax.rollout.partial import Group, Trajectory


def pad_groups(groups: list[Group], groups_per_minibatch: int, k: int) -> list[Group]:
  """Append empty finished groups so the count divides into equal minibatches."""
  missing = (-len(groups)) % groups_per_minibatch
  prompt_ids = groups[0].trajectories[0].prompt_ids
  empty = lambda: Group(-1, "", "", [Trajectory(prompt_ids, finished=True) for _ in range(k)],
                        images=groups[0].images)
  return groups + [empty() for _ in range(missing)]



def loss_token_mask(trajectory: Trajectory, train_old_segments: bool):
  """Per response token: 1 if it counts in the loss under the segment policy.

  A trajectory's final segment always counts, even when it finished in an earlier iteration
  while a sibling of its group was still running: masking it would leave short (often correct)
  answers without gradient, a bias towards length. Earlier segments, sampled by an older policy
  than the one that finished the trajectory, count only with `train_old_segments`.
  """
  mask = np.zeros(len(trajectory.response_ids), np.float32)
  for i, segment in enumerate(trajectory.segments):
    if train_old_segments or i == len(trajectory.segments) - 1:
      mask[segment.start:segment.end] = 1.0
  return mask


def build_rl_batch(groups: Sequence[Group], rewards_B: np.ndarray, seq_len: int, pad_id: int,
                   train_old_segments: bool) -> dict[str, np.ndarray]:
  """Right-padded [B, seq_len] arrays; row b = trajectory b in group order.

  Position p predicts token p+1, so a response token at index P+i is scored at P+i-1.
  """
  trajectories = [t for g in groups for t in g.trajectories]
  b = len(trajectories)
  tokens = np.full((b, seq_len + 1), pad_id, np.int32)
  loss_mask = np.zeros((b, seq_len), np.float32)
  group_ids = np.zeros(b, np.int32)
  row = 0
  for g_index, group in enumerate(groups):
    for t in group.trajectories:
      full = t.prompt_ids + t.response_ids
      if len(full) > seq_len + 1:
        raise ValueError(f"group {group.group_id}: prompt+response has {len(full)} tokens, "
                         f"more than seq_len+1={seq_len + 1}")
      tokens[row, :len(full)] = full
      p = len(t.prompt_ids)
      loss_mask[row, p - 1:p - 1 + len(t.response_ids)] = loss_token_mask(
          t, train_old_segments)
      group_ids[row] = g_index
      row += 1
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": loss_mask,
          "rewards": np.asarray(rewards_B, np.float32), "group_ids": group_ids}


def counted_ends(mask_BxT: np.ndarray) -> np.ndarray:
  """Per row, the position just after its last counted (loss-mask) token; 0 for a row with
  none (a padding row)."""
  counted_BxT = mask_BxT > 0
  return np.where(counted_BxT.any(axis=1),
                  mask_BxT.shape[1] - np.argmax(counted_BxT[:, ::-1], axis=1), 0)


def groups_by_length(batch: dict[str, np.ndarray], group_size: int) -> dict[str, np.ndarray]:
  """The batch's whole groups reordered by length, longest first (a group's length: the end
  of its last counted token; ties keep batch order), `group_ids` renumbered in the new order.

  Split into minibatches and trimmed to their buckets, the few long groups of a heavy-tailed
  batch then share minibatches and only those pay the long length (Hugging Face Trainer's
  `group_by_length`, here by whole groups since the loss's group baseline needs every member).
  """
  mask_BxT = batch["loss_mask"]
  num_groups = mask_BxT.shape[0] // group_size
  if mask_BxT.shape[0] % group_size:
    raise ValueError(f"{mask_BxT.shape[0]} rows are not whole groups of {group_size}")
  end_B = counted_ends(mask_BxT)
  order_G = np.argsort(-end_B.reshape(num_groups, group_size).max(axis=1), kind="stable")
  rows_B = (order_G[:, None] * group_size + np.arange(group_size)).reshape(-1)
  grouped = {k: v[rows_B] for k, v in batch.items()}
  grouped["group_ids"] = np.repeat(np.arange(num_groups), group_size).astype(
      batch["group_ids"].dtype)
  return grouped


def split_minibatches(batch: dict[str, np.ndarray], group_size: int, num_minibatches: int):
  """Split a batch into `num_minibatches` of whole groups (rows must be group-contiguous)."""
  b = batch["tokens"].shape[0]
  num_groups = b // group_size
  if b % group_size or num_groups % num_minibatches:
    raise ValueError(f"{num_groups} groups of {group_size} cannot split into "
                     f"{num_minibatches} equal minibatches")
  rows = b // num_minibatches
  out = []
  for i in range(num_minibatches):
    mb = {k: v[i * rows:(i + 1) * rows] for k, v in batch.items()}
    mb["group_ids"] = mb["group_ids"] - mb["group_ids"][0]
    out.append(mb)
  return out


@dataclasses.dataclass(frozen=True)
class RowImages:
  """How RL batch rows get their prompt's images: the vision tower's batch-major fields, every
  row of a group with its prompt's images, patches padded to one count for the whole run."""
  vision: VisionConfig
  processing: images.ImageProcessing
  patches_per_row: int

  @classmethod
  def for_prompts(cls, prompts, vision: VisionConfig, processing: images.ImageProcessing):
    counts = [len(images.preprocess(p.images, processing).pixel_values)
              for p in prompts if p.images]
    return cls(vision, processing, padded_patches(counts, vision.merge_unit))

  def fields(self, groups: Sequence[Group], tokens_BxT: np.ndarray) -> dict[str, np.ndarray]:
    """Image fields of `build_rl_batch(groups, ...)`'s rows."""
    processed = [images.preprocess(g.images, self.processing) if g.images else None
                 for g in groups]
    row_images = [p for p, g in zip(processed, groups) for _ in g.trajectories]
    prompt_lengths = [len(t.prompt_ids) for g in groups for t in g.trajectories]
    return image_fields(self.vision, tokens_BxT, row_images, self.patches_per_row,
                        prompt_lengths)


# Batch fields whose last axis is the token position; every other field is per row or per patch.
TIME_FIELDS = ("tokens", "targets", "loss_mask", "ref_logp", "image_mask", "rope_positions")


def trim_to_bucket(minibatch: dict[str, np.ndarray], min_length: int = 32) -> dict[str, np.ndarray]:
  """The minibatch's `TIME_FIELDS` cut after its last counted token, rounded up to a power of
  two (at least `min_length`, at most T). The LM is causal, so no log-prob changes; training
  cost then follows the responses' real lengths, with at most log2(T / min_length) + 2 shapes
  to compile."""
  t = minibatch["loss_mask"].shape[1]
  last = max(int(counted_ends(minibatch["loss_mask"]).max()), 1)
  length = min(t, max(min_length, 1 << (last - 1).bit_length()))
  return {k: v[..., :length] if k in TIME_FIELDS else v for k, v in minibatch.items()}


def pack_rows(minibatch: dict[str, np.ndarray], row_multiple: int) -> dict[str, np.ndarray]:
  """The minibatch with its token rows packed, first fit by decreasing length, into rows of the
  same width: B/4, B/2 or B rows, the fewest that hold them and divide by `row_multiple` (three
  shapes per width to compile). Each trajectory is a segment (`segment_ids`, `positions` from
  0), cut after its last counted token (the LM is causal: nothing after it changes a log-prob).

  `unpack_index` [B, T] gives each original row's positions in the flattened packed rows, so
  per-token log-probs of the packed rows gather back to the minibatch's rows; per-row fields
  (`loss_mask`, `ref_logp`, rewards, ...) keep the original rows. A heavy-tailed minibatch then
  runs its short trajectories side by side in the width its longest one needs.
  """
  mask_BxT = minibatch["loss_mask"]
  b, t = mask_BxT.shape
  end_B = counted_ends(mask_BxT)
  used, place = [], {}  # tokens used per packed row; original row -> (packed row, offset)
  for row in np.argsort(-end_B, kind="stable"):
    if end_B[row] == 0:
      continue  # a padding row: no counted token, nothing to run
    packed = next((i for i, n in enumerate(used) if n + end_B[row] <= t), len(used))
    if packed == len(used):
      used.append(0)
    place[row] = (packed, used[packed])
    used[packed] += end_B[row]
  rows = next(r for r in (b // 4, b // 2, b)
              if r >= len(used) and r % row_multiple == 0 and r > 0)
  out = {k: v for k, v in minibatch.items() if k not in ("tokens", "targets")}
  out.update({name: np.zeros((rows, t), np.int32)
              for name in ("tokens", "targets", "positions", "segment_ids")})
  out["unpack_index"] = np.zeros((b, t), np.int32)
  for row, (packed, offset) in place.items():
    n = end_B[row]
    span = slice(offset, offset + n)
    out["tokens"][packed, span] = minibatch["tokens"][row, :n]
    out["targets"][packed, span] = minibatch["targets"][row, :n]
    out["positions"][packed, span] = np.arange(n)
    out["segment_ids"][packed, span] = row + 1  # 0: the packed rows' unused tail
    out["unpack_index"][row, :n] = packed * t + offset + np.arange(n)
  return out


def unpacked(minibatch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The minibatch as its own packing (one trajectory per row): `unpack_index` the identity."""
  b, t = minibatch["loss_mask"].shape
  return {**minibatch, "unpack_index": np.arange(b * t, dtype=np.int32).reshape(b, t)}
