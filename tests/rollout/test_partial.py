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

  def generate(self, requests, sampling, images=None):
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
  images: tuple = ()


def encode(prompt):
  return [int(prompt.question)]


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
  assert group.question == "2"  # a judge reward grades against it after the last segment


def test_buffer_saved_before_groups_had_questions_still_loads():
  policy = ScriptedPolicy({2: list(range(10, 19)) + [EOS]})
  buffer = PartialRolloutBuffer()
  groups = new_groups([P("b", "2", "y")], encode, k=2, first_group_id=0, version=0)
  collect_groups(policy, SAMPLING, groups, buffer, RolloutLimits(32, 4), 0, 0)
  (record,) = json.loads(json.dumps(buffer.to_json()))
  del record["question"]
  (group,) = PartialRolloutBuffer.from_json([record]).take_all()
  assert group.question == "" and group.prompt_id == "b"


def test_requests_continue_prompt_and_response_with_the_segment_budget_and_seed():
  policy = ScriptedPolicy({2: list(range(10, 19)) + [EOS]})
  assert isinstance(policy, RolloutBackend)
  groups = new_groups([P("b", "2", "y")], encode, k=2, first_group_id=0, version=0)
  buffer, limits = PartialRolloutBuffer(), RolloutLimits(32, 4)
  collect_groups(policy, SAMPLING, groups, buffer, limits, 0, seed_base=40)
  captured = []
  policy.generate = lambda requests, sampling, images: captured.append((requests, sampling)) or []
  with pytest.raises(RuntimeError, match="answered 0 of 2 requests"):
    collect_groups(policy, SAMPLING, [], buffer, limits, 1, seed_base=50)
  requests, sampling = captured[0]
  assert requests == [[2, 10, 11, 12, 13]] * 2
  assert [(s.seed, s.max_new_tokens, s.temperature, s.stop_token_ids) for s in sampling] == [
      (50, 4, 1.0, (EOS,)), (51, 4, 1.0, (EOS,))]


class LoopingServer(FakeBackend):
  """Like an SGLang server: knows nothing of loops, answers every budget in full and says
  only "length" or "stop" (at EOS)."""

  def __init__(self, responses):
    super().__init__()
    self.responses = responses

  def generate(self, requests, sampling, images=None):
    out = []
    for ids, params in zip(requests, sampling):
      chunk = self.responses[ids[0]][len(ids) - 1:][:params.max_new_tokens]
      reason = ({"type": "stop", "matched": EOS} if chunk and chunk[-1] == EOS
                else {"type": "length", "length": len(chunk)})
      out.append(Completion(list(ids), chunk, [-0.1] * len(chunk), reason))
    return out


def test_loops_are_cut_on_the_host_for_a_backend_that_does_not_detect_them():
  # ngram 2, count 3: six tokens with period <= 2 close a loop.
  responses = {1: [7, 8, 9, 4, 5, 4, 5, 4, 5, 4, 5, 6], 2: [7, 8, 9, 9, 9, 9, 9, 9, 9],
               3: [4, 4, 4, 4, 4, EOS], 4: [7, 3, 5, EOS]}
  limits = RolloutLimits(max_response_tokens=20, segment_tokens=5, repetition_ngram=2,
                         repetition_count=3)
  buffer = PartialRolloutBuffer()
  groups = new_groups([P(str(i), str(i), "") for i in (1, 2, 3, 4)], encode, k=1,
                      first_group_id=0, version=0)
  complete = collect_groups(LoopingServer(responses), SAMPLING, groups, buffer, limits, 0, 0)[0]
  complete += collect_groups(LoopingServer(responses), SAMPLING, [], buffer, limits, 1, 0)[0]
  by_prompt = {g.prompt_id: g.trajectories[0] for g in complete}
  assert len(by_prompt) == 4 and len(buffer) == 0
  # The loop 4,5,4,5,4,5 closes at token 9, in the second segment, spanning both.
  assert by_prompt["1"].response_ids == [7, 8, 9, 4, 5, 4, 5, 4, 5]
  assert len(by_prompt["1"].logprobs) == 9
  assert [(s.start, s.end) for s in by_prompt["1"].segments] == [(0, 5), (5, 9)]
  assert by_prompt["2"].response_ids == [7, 8, 9, 9, 9, 9, 9, 9]
  # Five 4s then EOS: the loop closes at the sixth token, but the stop token wins there.
  assert by_prompt["3"].response_ids == [4, 4, 4, 4, 4, EOS]
  for prompt, repeated in (("1", True), ("2", True), ("3", False), ("4", False)):
    t = by_prompt[prompt]
    assert t.repetition == repeated and t.finished, prompt
    assert (t.finish_reason == {"type": "stop", "matched": "repetition"}) == repeated, prompt


def test_engine_and_a_non_detecting_backend_give_the_same_trajectories():
  """The engine stops loops itself; the same engine without detection stands for an SGLang
  server. Through collect_groups both yield identical tokens, log-probs and flags."""
  from kimi_jax.rollout.engine import RolloutEngine
  from tests.rollout.tiny_model import CFG, EOS as MODEL_EOS, peaked_params

  params = peaked_params(3)
  limits = RolloutLimits(max_response_tokens=24, segment_tokens=8, repetition_ngram=2,
                         repetition_count=3)

  def rollouts(detect: bool):
    engine = RolloutEngine(CFG, params, max_batch=16, max_seq_len=32,
                           eos_token_ids=(MODEL_EOS,), repetition_ngram=2 if detect else 0,
                           repetition_count=3 if detect else 0)

    backend = FakeBackend()
    backend.generate = engine.generate
    buffer, done = PartialRolloutBuffer(), []
    prompts = [P(str(i), str(i), "") for i in range(3, 11)]
    groups = new_groups(prompts, lambda p: [int(p.question), 1], k=2, first_group_id=0, version=0)
    for version in range(3):
      done += collect_groups(backend, SamplingParams(temperature=0.3),
                             groups if version == 0 else [], buffer, limits, version,
                             seed_base=10 * version)[0]
    return [(t.response_ids, t.logprobs, t.repetition, t.finish_reason)
            for g in sorted(done, key=lambda g: g.group_id) for t in g.trajectories]

  with_engine, without = rollouts(True), rollouts(False)
  assert with_engine == without
  assert any(r[2] for r in with_engine)  # some samples looped: the check is not vacuous
