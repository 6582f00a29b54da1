"""Host-side RL data: rollouts with partial-rollout resumption, and training batches.

`collect_groups` turns prompts (plus groups waiting in the partial-rollout buffer) into
complete groups of k trajectories through any `generate` callable: the in-process engine or
the SGLang client, adapted to `generate(inputs, max_new_tokens, seeds) -> completions` where
each completion has `output_ids`, `logprobs` and `finish_reason`. Repetition is detected here,
on the host, from the returned tokens, so a loop stops a trajectory at the same token whichever
backend sampled it (the engine also stops there on its own, which only saves decode steps).
"""
import dataclasses
from typing import Callable, Sequence

import numpy as np

from kimi_jax.rollout.repetition import first_loop_end
from kimi_jax.rollout.replay_buffer import Group, PartialRolloutBuffer, Trajectory
from kimi_jax.rollout.types import REPETITION_MATCH, STOP, stop_reason


@dataclasses.dataclass(frozen=True)
class RolloutLimits:
  max_response_tokens: int  # cap over all segments of one trajectory
  segment_tokens: int  # cap per iteration (= max_response_tokens disables partial rollouts)
  repetition_ngram: int = 0  # a response whose last ngram*count tokens loop with period
  repetition_count: int = 0  # <= ngram stops there; ngram = 0 disables


def new_groups(prompts, encode: Callable[[str], list[int]], k: int, first_group_id: int,
               version: int) -> list[Group]:
  return [Group(first_group_id + i, p.id, p.answer, [Trajectory(encode(p.question)) for _ in range(k)],
                created_version=version, domain=p.domain or "")
          for i, p in enumerate(prompts)]


def _is_finished(trajectory: Trajectory, finish_reason: dict, limits: RolloutLimits) -> bool:
  if finish_reason["type"] == "stop":
    return True
  return len(trajectory.response_ids) >= limits.max_response_tokens  # truncated for good


def cut_at_loop(response_ids: list[int], completion, limits: RolloutLimits):
  """(output_ids, logprobs, finish_reason) of `completion`, a continuation of `response_ids`,
  cut after its first token that closes a repeated loop, which then finishes it with
  {"type": "stop", "matched": "repetition"}. A stop token wins over a loop it would close."""
  done = len(response_ids)
  response = response_ids + list(completion.output_ids)
  ends_with_stop_token = (completion.finish_reason["type"] == STOP
                          and completion.finish_reason.get("matched") != REPETITION_MATCH)
  end = first_loop_end(response, limits.repetition_ngram, limits.repetition_count, start=done,
                       stop=len(response) - ends_with_stop_token)
  if end is None:
    return completion.output_ids, completion.logprobs, completion.finish_reason
  return (completion.output_ids[:end - done], completion.logprobs[:end - done],
          stop_reason(REPETITION_MATCH))


def collect_groups(generate, groups: Sequence[Group], buffer: PartialRolloutBuffer,
                   limits: RolloutLimits, version: int, seed_base: int) -> tuple[list[Group], int]:
  """Advance every unfinished trajectory of `groups` + the buffer by one segment.

  Returns (groups now complete, tokens generated); incomplete groups go (back) into `buffer`.
  """
  pending = buffer.take_all() + list(groups)
  todo = [t for g in pending for t in g.trajectories if not t.finished]
  inputs = [t.prompt_ids + t.response_ids for t in todo]
  budgets = [min(limits.segment_tokens, limits.max_response_tokens - len(t.response_ids))
             for t in todo]
  seeds = [seed_base + i for i in range(len(todo))]
  completions = generate(inputs, budgets, seeds) if todo else []
  if len(completions) != len(todo):
    raise RuntimeError(f"generate answered {len(completions)} of {len(todo)} requests")
  for trajectory, completion in zip(todo, completions):
    output_ids, logprobs, finish_reason = cut_at_loop(trajectory.response_ids, completion, limits)
    trajectory.extend(output_ids, logprobs, version)
    trajectory.repetition = finish_reason.get("matched") == REPETITION_MATCH
    if _is_finished(trajectory, finish_reason, limits):
      trajectory.finished = True
      trajectory.finish_reason = finish_reason
  complete = []
  for group in pending:
    (complete.append if group.complete else buffer.put)(group)
  return complete, sum(len(c.output_ids) for c in completions)


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
