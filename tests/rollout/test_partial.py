"""Partial rollouts: segments across iterations, continuity, versions, buffer JSON."""
import dataclasses
import json

import pytest

from kimi_jax.rollout.backends import RolloutBackend
from kimi_jax.rollout.partial import PartialRolloutBuffer, RolloutLimits, collect_groups, new_groups
from kimi_jax.rollout.types import Completion, SamplingParams
from tests.rollout.fakes import FakeBackend

EOS = 0
SAMPLING = SamplingParams(temperature=1.0, stop_token_ids=(EOS,))


class ScriptedPolicy(FakeBackend):
  """Each prompt (first input token) has a fixed full response; emits it in segments."""

  def __init__(self, responses):
    super().__init__()
    self.responses = responses
    self.calls = []

  def generate(self, requests, sampling):
    self.calls.append([s.max_new_tokens for s in sampling])
    out = []
    for ids, params in zip(requests, sampling):
      full = self.responses[ids[0]]
      done = len(ids) - 1  # prompts are one token long here
      chunk = full[done:done + params.max_new_tokens]
      finished = done + len(chunk) == len(full)
      reason = ({"type": "stop", "matched": EOS} if finished
                else {"type": "length", "length": params.max_new_tokens})
      out.append(Completion(list(ids), chunk, [-0.5 - 0.01 * t for t in chunk], reason))
    return out


@dataclasses.dataclass
class P:
  id: str
  question: str
  answer: str
  domain: str = "arith"


def encode(text):
  return [int(text)]


def test_long_responses_finish_over_several_iterations_with_versions():
  # prompt 1 -> 3-token response; prompt 2 -> 10-token response; segment budget 4.
  policy = ScriptedPolicy({1: [5, 6, EOS], 2: list(range(10, 19)) + [EOS]})
  limits = RolloutLimits(max_response_tokens=32, segment_tokens=4)
  buffer = PartialRolloutBuffer()
  groups = new_groups([P("a", "1", "x"), P("b", "2", "y")], encode, k=2, first_group_id=0, version=0)
  complete, tokens = collect_groups(policy, SAMPLING, groups, buffer, limits, version=0, seed_base=0)
  assert [g.prompt_id for g in complete] == ["a"] and len(buffer) == 1
  assert tokens == 2 * 3 + 2 * 4
  finished_by_version = {}
  for version in (1, 2):
    for g in collect_groups(policy, SAMPLING, [], buffer, limits, version=version, seed_base=100 * version)[0]:
      finished_by_version[version] = g
  long_group = finished_by_version[2]
  for t in long_group.trajectories:
    assert t.response_ids == list(range(10, 19)) + [EOS]  # continuous across segments
    assert [(s.start, s.end, s.version) for s in t.segments] == [(0, 4, 0), (4, 8, 1), (8, 10, 2)]
    assert len(t.logprobs) == 10
  assert policy.calls[1] == [4, 4] and len(buffer) == 0


def test_response_cap_finishes_truncated_trajectories():
  policy = ScriptedPolicy({2: list(range(10, 30))})
  limits = RolloutLimits(max_response_tokens=6, segment_tokens=4)
  buffer = PartialRolloutBuffer()
  groups = new_groups([P("b", "2", "y")], encode, k=1, first_group_id=0, version=0)
  assert collect_groups(policy, SAMPLING, groups, buffer, limits, 0, 0) == ([], 4)
  (group,), _ = collect_groups(policy, SAMPLING, [], buffer, limits, 1, 0)
  assert policy.calls[-1] == [2]  # only the remaining 2 tokens were requested
  assert group.trajectories[0].finish_reason["type"] == "length"


def test_buffer_survives_json_round_trip():
  policy = ScriptedPolicy({2: list(range(10, 19)) + [EOS]})
  buffer = PartialRolloutBuffer()
  groups = new_groups([P("b", "2", "y")], encode, k=2, first_group_id=0, version=0)
  collect_groups(policy, SAMPLING, groups, buffer, RolloutLimits(32, 4), 0, 0)
  restored = PartialRolloutBuffer.from_json(json.loads(json.dumps(buffer.to_json())))
  assert restored.to_json() == buffer.to_json()
  (group,) = restored.take_all()
  assert group.trajectories[1].segments[0].version == 0 and not group.complete


def test_requests_continue_prompt_and_response_with_the_segment_budget_and_seed():
  policy = ScriptedPolicy({2: list(range(10, 19)) + [EOS]})
  assert isinstance(policy, RolloutBackend)
  groups = new_groups([P("b", "2", "y")], encode, k=2, first_group_id=0, version=0)
  buffer, limits = PartialRolloutBuffer(), RolloutLimits(32, 4)
  collect_groups(policy, SAMPLING, groups, buffer, limits, 0, seed_base=40)
  captured = []
  policy.generate = lambda requests, sampling: captured.append((requests, sampling)) or []
  with pytest.raises(RuntimeError, match="answered 0 of 2 requests"):
    collect_groups(policy, SAMPLING, [], buffer, limits, 1, seed_base=50)
  requests, sampling = captured[0]
  assert requests == [[2, 10, 11, 12, 13]] * 2
  assert [(s.seed, s.max_new_tokens, s.temperature, s.stop_token_ids) for s in sampling] == [
      (50, 4, 1.0, (EOS,)), (51, 4, 1.0, (EOS,))]
