"""Scoring an RL iteration's finished groups, and what a researcher reads of it.

`score_groups` gives every trajectory (group order) its reward parts: the registered task
reward of its domain, the k1.5 length reward (per prompt group) and the repetition penalty;
`rollout_metrics` summarises them overall and per domain (`reward/<domain>`,
`accuracy/<domain>`); `write_samples` writes one JSON row per sampled response to
`samples/iter_NNNNN.jsonl` (prompt, response, gold answer, reward and its parts, correct,
num_tokens, finish_reason).
"""
import dataclasses
import json
import os

import numpy as np

from kimi_jax.rewards.registry import REGISTRY, RewardRegistry, score_rollout
from kimi_jax.rollout.partial import Group
from kimi_jax.rollout.types import LENGTH


@dataclasses.dataclass(frozen=True)
class GroupScores:
  """Per-trajectory arrays [B] in group order."""
  responses: list[str]
  task: np.ndarray  # registered reward in [0, 1]
  length: np.ndarray  # weighted length reward
  repetition: np.ndarray  # repetition penalty (<= 0)
  correct: np.ndarray  # bool
  num_tokens: np.ndarray

  @property
  def rewards(self) -> np.ndarray:
    return self.task + self.length + self.repetition

  @classmethod
  def empty(cls) -> "GroupScores":
    """The scores of an iteration whose groups all wait in the partial-rollout buffer."""
    nothing = np.zeros(0)
    return cls([], nothing, nothing, nothing, nothing.astype(bool), nothing)

  def take(self, rows_B) -> "GroupScores":
    """The rows `rows_B` (indices), in that order."""
    rows_B = np.asarray(rows_B, np.int64)
    arrays = [np.asarray(getattr(self, f))[rows_B] for f in _array_fields()]
    return GroupScores([self.responses[i] for i in rows_B], *arrays)

  @classmethod
  def concatenate(cls, parts: list["GroupScores"]) -> "GroupScores":
    arrays = [np.concatenate([np.asarray(getattr(p, f)) for p in parts])
              for f in _array_fields()]
    return cls([r for p in parts for r in p.responses], *arrays)


def _array_fields() -> list[str]:
  return [f.name for f in dataclasses.fields(GroupScores) if f.name != "responses"]


def merge_scored_groups(parts) -> tuple[list[Group], GroupScores]:
  """One (groups, scores) from several (e.g. every process's complete groups and their
  scores), groups and rows in group-id order: the order one process holding every group
  produces (buffered groups, older, come first; new groups in sampling order)."""
  groups = [g for part_groups, _ in parts for g in part_groups]
  scores = GroupScores.concatenate([part_scores for _, part_scores in parts])
  row_group_ids = np.array([g.group_id for g in groups for _ in g.trajectories], np.int64)
  order = np.argsort([g.group_id for g in groups], kind="stable")
  return [groups[i] for i in order], scores.take(np.argsort(row_group_ids, kind="stable"))


def score_groups(groups: list[Group], decode, reward_by_domain, rl_config, step: int,
                 registry: RewardRegistry = REGISTRY) -> GroupScores:
  """Reward parts of every trajectory; `registry` holds the run's rewards (e.g. its judge)."""
  rows = [(g, t) for g in groups for t in g.trajectories]
  responses = [decode(t.response_ids) for _, t in rows]
  lengths_B = np.array([len(t.response_ids) for _, t in rows])
  scores = score_rollout(
      reward_by_domain, [g.domain for g, _ in rows], responses, [g.answer for g, _ in rows],
      lengths_B, np.array([g.group_id for g, _ in rows]), rl_config.length_penalty.weight,
      rl_config.length_penalty.warmup_iterations, step, registry,
      questions_B=[g.question for g, _ in rows])
  repeated_B = np.array([t.repetition for _, t in rows], np.float64)
  return GroupScores(responses, scores.task, scores.length,
                     rl_config.repetition_penalty * repeated_B, scores.correct, lengths_B)


def _mean(values) -> float:
  return float(np.mean(values)) if len(values) else float("nan")


def _percentile(values, q: float) -> float:
  return float(np.percentile(values, q)) if len(values) else float("nan")


def rollout_metrics(groups: list[Group], scores: GroupScores, domains) -> dict:
  """Reward, accuracy, length and segment statistics of the complete groups, overall and for
  each of `domains` (NaN where there are none, so every row has the same keys)."""
  trajectories = [t for g in groups for t in g.trajectories]
  logprobs = [lp for t in trajectories for lp in t.logprobs]
  lengths_B = np.asarray(scores.num_tokens, np.float64)
  metrics = {
      "reward": _mean(scores.rewards), "accuracy": _mean(scores.correct),
      "length_mean": _mean(lengths_B), "length_p50": _percentile(lengths_B, 50),
      "length_p90": _percentile(lengths_B, 90), "length_max": _percentile(lengths_B, 100),
      "lengths": lengths_B,
      "repetition_frac": _mean([t.repetition for t in trajectories]),
      "truncated_frac": _mean([t.finish_reason["type"] == LENGTH for t in trajectories]),
      "multi_segment_frac": _mean([t.num_segments > 1 for t in trajectories]),
      # Sampled-token negative log-prob: an entropy estimate (exact in expectation at T=1).
      "entropy": -_mean(logprobs),
  }
  domains_B = np.array([g.domain for g in groups for _ in g.trajectories])
  for domain in domains:
    rows = domains_B == domain
    metrics[f"reward/{domain}"] = _mean(scores.rewards[rows])
    metrics[f"accuracy/{domain}"] = _mean(scores.correct[rows])
  return metrics


def sample_rows(groups: list[Group], scores: GroupScores, decode_prompt) -> list[dict]:
  """One row per trajectory (group order); `decode_prompt` turns prompt ids into text."""
  rows = []
  trajectories = [(g, t) for g in groups for t in g.trajectories]
  for i, (group, trajectory) in enumerate(trajectories):
    rows.append({
        "prompt_id": group.prompt_id, "domain": group.domain,
        "prompt": decode_prompt(trajectory.prompt_ids), "response": scores.responses[i],
        "answer": group.answer, "reward": float(scores.rewards[i]),
        "correct": bool(scores.correct[i]), "task_reward": float(scores.task[i]),
        "length_reward": float(scores.length[i]),
        "repetition_penalty": float(scores.repetition[i]),
        "num_tokens": int(scores.num_tokens[i]), "finish_reason": trajectory.finish_reason,
        "segments": trajectory.num_segments})
  return rows


def write_samples(workdir: str, step: int, rows: list[dict]) -> str:
  """samples/iter_NNNNN.jsonl for iteration `step`; returns its path."""
  path = os.path.join(workdir, "samples", f"iter_{step:05d}.jsonl")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return path
