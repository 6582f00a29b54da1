"""Host-side RL training rows from complete prompt groups: per-segment loss masks,
right-padded arrays, where each row's counted tokens end, the rows' images. Where the rows go
(minibatches, buckets, packing, processes) is `rl_layout`'s job."""
import dataclasses
from typing import Sequence

import numpy as np

from kimi_jax.data import images
from kimi_jax.data.image_batches import image_fields, padded_patches
from kimi_jax.model.config import VisionConfig
from kimi_jax.rollout.partial import Group, Trajectory


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

  def row_inputs(self, groups: Sequence[Group]):
    """(processed images or None, prompt length) of each of `build_rl_batch(groups, ...)`'s
    rows; each group's images are preprocessed once."""
    processed = [images.preprocess(g.images, self.processing) if g.images else None
                 for g in groups]
    return ([p for p, g in zip(processed, groups) for _ in g.trajectories],
            [len(t.prompt_ids) for g in groups for t in g.trajectories])

  def fields(self, images_B, prompt_lengths_B, tokens_BxT: np.ndarray) -> dict[str, np.ndarray]:
    """Image fields of token rows `tokens_BxT` whose prompts (`prompt_lengths_B` tokens) hold
    `images_B` (processed; None: a row without images)."""
    return image_fields(self.vision, tokens_BxT, images_B, self.patches_per_row,
                        prompt_lengths_B)


# Batch fields whose last axis is the token position; every other field is per row or per patch.
TIME_FIELDS = ("tokens", "targets", "loss_mask", "ref_logp", "image_mask", "rope_positions")
