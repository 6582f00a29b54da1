"""Partial rollouts (k1.5 section 2.6.2): trajectories that outlive one iteration.

A trajectory's response grows segment by segment; each segment records the policy version
that produced it and its rollout log-probs. A prompt group (k samples of one prompt) is only
trained on when every member has finished; unfinished groups wait in the buffer and resume
next iteration from prompt + partial response. The buffer is JSON so it is saved with
checkpoints. `collect_groups` advances new groups and the buffer's by one segment through a
rollout backend. Repetition is detected there, on the host, from the returned tokens, so a loop
stops a trajectory at the same token whichever backend sampled it (the engine also stops there
on its own, which only saves decode steps).
"""
import dataclasses
from typing import Callable, Sequence

from kimi_jax.data.sources import Prompt
from kimi_jax.rollout.backends import RolloutBackend
from kimi_jax.rollout.repetition import first_loop_end
from kimi_jax.rollout.types import REPETITION_MATCH, STOP, SamplingParams, stop_reason


@dataclasses.dataclass
class Segment:
  start: int  # response-token offsets [start, end)
  end: int
  version: int  # policy version (iteration) that generated these tokens


@dataclasses.dataclass
class Trajectory:
  prompt_ids: list[int]
  response_ids: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  segments: list[Segment] = dataclasses.field(default_factory=list)
  finished: bool = False
  finish_reason: dict | None = None
  repetition: bool = False

  def extend(self, output_ids, logprobs, version: int) -> None:
    if len(output_ids) != len(logprobs):
      raise ValueError(f"{len(output_ids)} tokens but {len(logprobs)} log-probs")
    start = len(self.response_ids)
    self.response_ids.extend(int(t) for t in output_ids)
    self.logprobs.extend(float(x) for x in logprobs)
    if output_ids:
      self.segments.append(Segment(start, len(self.response_ids), version))

  @property
  def num_segments(self) -> int:
    return len(self.segments)


@dataclasses.dataclass
class Group:
  group_id: int
  prompt_id: str
  answer: str
  trajectories: list[Trajectory]
  created_version: int = 0
  domain: str = ""  # selects the registered reward
  images: list[str] = dataclasses.field(default_factory=list)  # the prompt's image sources
  question: str = ""  # the problem text, for rewards that grade against it (a judge model)

  @property
  def complete(self) -> bool:
    return all(t.finished for t in self.trajectories)


class PartialRolloutBuffer:
  """Insertion-ordered store of incomplete groups."""

  def __init__(self):
    self._groups: dict[int, Group] = {}

  def __len__(self) -> int:
    return len(self._groups)

  def put(self, group: Group) -> None:
    if group.complete:
      raise ValueError(f"group {group.group_id} is complete; train on it instead of buffering")
    self._groups[group.group_id] = group

  def take_all(self) -> list[Group]:
    groups = list(self._groups.values())
    self._groups.clear()
    return groups

  def to_json(self) -> list[dict]:
    return [dataclasses.asdict(g) for g in self._groups.values()]

  @classmethod
  def from_json(cls, records: list[dict]) -> "PartialRolloutBuffer":
    buffer = cls()
    for record in records:
      trajectories = [Trajectory(**{**t, "segments": [Segment(**s) for s in t["segments"]]})
                      for t in record["trajectories"]]
      buffer.put(Group(**{**record, "trajectories": trajectories}))
    return buffer


@dataclasses.dataclass(frozen=True)
class RolloutLimits:
  max_response_tokens: int  # cap over all segments of one trajectory
  segment_tokens: int  # cap per iteration (= max_response_tokens disables partial rollouts)
  repetition_ngram: int = 0  # a response whose last ngram*count tokens loop with period
  repetition_count: int = 0  # <= ngram stops there; ngram = 0 disables


def new_groups(prompts, encode: Callable[[Prompt], list[int]], k: int, first_group_id: int,
               version: int) -> list[Group]:
  """k empty trajectories per prompt (a `data.sources.Prompt`: id, question, answer, domain,
  images), starting from `encode(prompt)` (its token ids)."""
  return [Group(first_group_id + i, p.id, p.answer, [Trajectory(encode(p)) for _ in range(k)],
                created_version=version, domain=p.domain or "", images=list(p.images),
                question=p.question)
          for i, p in enumerate(prompts)]


def _is_finished(trajectory: Trajectory, finish_reason: dict, limits: RolloutLimits) -> bool:
  if finish_reason["type"] == STOP:
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


def collect_groups(backend: RolloutBackend, sampling: SamplingParams, groups: Sequence[Group],
                   buffer: PartialRolloutBuffer, limits: RolloutLimits, version: int,
                   seed_base: int) -> tuple[list[Group], int]:
  """Advance every unfinished trajectory of `groups` + the buffer by one segment on `backend`
  (a `RolloutBackend`): each request continues prompt + response so far with `sampling`, its
  max_new_tokens the segment budget and its seed seed_base + group_id * k + j for trajectory j
  of a group of k: a trajectory's samples depend on its group, never on which other groups
  share the call (one process or a slice of the groups on each of several).

  Returns (groups now complete, tokens generated); incomplete groups go (back) into `buffer`.
  """
  pending = buffer.take_all() + list(groups)
  todo = [(g, j, t) for g in pending for j, t in enumerate(g.trajectories) if not t.finished]
  images = [g.images for g, _, _ in todo] if any(g.images for g, _, _ in todo) else None
  seeds = [seed_base + g.group_id * len(g.trajectories) + j for g, j, _ in todo]
  todo = [t for _, _, t in todo]
  requests = [t.prompt_ids + t.response_ids for t in todo]
  params = [dataclasses.replace(sampling, seed=seed, max_new_tokens=min(
      limits.segment_tokens, limits.max_response_tokens - len(t.response_ids)))
            for seed, t in zip(seeds, todo)]
  completions = backend.generate(requests, params, images=images) if todo else []
  if len(completions) != len(todo):
    raise RuntimeError(f"the backend answered {len(completions)} of {len(todo)} requests")
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
