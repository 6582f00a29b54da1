"""Partial rollouts (k1.5 section 2.6.2): trajectories that outlive one iteration.

A trajectory's response grows segment by segment; each segment records the policy version
that produced it and its rollout log-probs. A prompt group (k samples of one prompt) is only
trained on when every member has finished; unfinished groups wait in the buffer and resume
next iteration from prompt + partial response. The buffer is JSON so it is saved with
checkpoints.
"""
import dataclasses


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
