"""Scoring an RL iteration's finished groups, and what a researcher reads of it.

`score_groups` gives every trajectory (group order) its reward parts: the registered task
reward of its domain, the k1.5 length reward (per prompt group) and the repetition penalty;
`RowFacts` is what every process learns of every trajectory (scores and counts, no tokens);
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


@dataclasses.dataclass(frozen=True)
class RowFacts:
  """What every process learns of every trajectory of an iteration, per row [B] (group order,
  k rows per group): the scores and counts the metrics, the sampler and the batch layout need,
  and no token ids or text (those stay with the process that sampled them)."""
  group_id: np.ndarray
  prompt_id: np.ndarray
  domain: np.ndarray
  reward: np.ndarray
  correct: np.ndarray
  num_tokens: np.ndarray
  logprob_sum: np.ndarray  # float64 sum of the sampled tokens' log-probs
  repetition: np.ndarray
  truncated: np.ndarray
  segments: np.ndarray
  counted_end: np.ndarray  # the position after the row's last loss token (rl_data.counted_ends)

  @classmethod
  def of(cls, groups: list[Group], scores: GroupScores, counted_end_B) -> "RowFacts":
    rows = [(g, t) for g in groups for t in g.trajectories]
    column = lambda values, dtype: np.array(values, dtype).reshape(len(rows))
    return cls(column([g.group_id for g, _ in rows], np.int64),
               column([g.prompt_id for g, _ in rows], object),
               column([g.domain for g, _ in rows], object), np.asarray(scores.rewards, np.float64),
               np.asarray(scores.correct, bool), np.asarray(scores.num_tokens, np.int64),
               column([np.sum(t.logprobs, dtype=np.float64) for _, t in rows], np.float64),
               column([t.repetition for _, t in rows], bool),
               column([t.finish_reason["type"] == LENGTH for _, t in rows], bool),
               column([t.num_segments for _, t in rows], np.int64),
               np.asarray(counted_end_B, np.int64))

  @classmethod
  def merged(cls, parts: list["RowFacts"]) -> "RowFacts":
    """Every process's facts in group-id order: the order of one process holding every group
    (buffered groups, older, come first; new groups in sampling order)."""
    fields = [f.name for f in dataclasses.fields(cls)]
    joined = {f: np.concatenate([getattr(p, f) for p in parts]) for f in fields}
    order = np.argsort(joined["group_id"], kind="stable")
    return cls(**{f: v[order] for f, v in joined.items()})

  def __len__(self) -> int:
    return len(self.group_id)


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


def rollout_metrics(facts: RowFacts, domains) -> dict:
  """Reward, accuracy, length and segment statistics of the complete groups, overall and for
  each of `domains` (NaN where there are none, so every row has the same keys)."""
  lengths_B = facts.num_tokens.astype(np.float64)
  metrics = {
      "reward": _mean(facts.reward), "accuracy": _mean(facts.correct),
      "length_mean": _mean(lengths_B), "length_p50": _percentile(lengths_B, 50),
      "length_p90": _percentile(lengths_B, 90), "length_max": _percentile(lengths_B, 100),
      "lengths": lengths_B,
      "repetition_frac": _mean(facts.repetition), "truncated_frac": _mean(facts.truncated),
      "multi_segment_frac": _mean(facts.segments > 1),
      # Sampled-token negative log-prob: an entropy estimate (exact in expectation at T=1).
      "entropy": (-float(facts.logprob_sum.sum() / lengths_B.sum()) if lengths_B.sum()
                  else float("nan")),
  }
  for domain in domains:
    rows = facts.domain == domain
    metrics[f"reward/{domain}"] = _mean(facts.reward[rows])
    metrics[f"accuracy/{domain}"] = _mean(facts.correct[rows])
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
