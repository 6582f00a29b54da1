"""What processes exchange of an iteration: per-row facts of their scored groups, merged into
the one-process order, and nothing that grows with the responses' tokens."""
import dataclasses
import pickle

import ml_collections
import numpy as np

from kimi_jax.rollout.partial import PartialRolloutBuffer, RolloutLimits, collect_groups, new_groups
from kimi_jax.training.scoring import GroupScores, RowFacts, score_groups
from tests.rollout.test_partial import EOS, SAMPLING, P, ScriptedPolicy, encode

RL = ml_collections.ConfigDict(dict(
    length_penalty=dict(weight=0.2, warmup_iterations=0), repetition_penalty=-0.5))
# Prompt token -> its scripted response: lengths 2 to 10 tokens, so with 4-token segments some
# groups finish at once and others wait one or two iterations in the buffer.
RESPONSES = {1: [5, EOS], 2: list(range(10, 19)) + [EOS], 3: [7, 8, 9, EOS], 4: [6, 6, 6, 6, EOS]}
PROMPTS = [P(str(i), str(i), "9") for i in (2, 1, 4, 3)]


class SeededPolicy(ScriptedPolicy):
  """The scripted response without its first `seed % 3` tokens: a group's samples differ in
  length, and a request whose seed depended on its place in the call would change."""

  def generate(self, requests, sampling, images=None):
    out = []
    for ids, params in zip(requests, sampling):
      self.responses = {k: v[params.seed % 3:] for k, v in RESPONSES.items()}
      out += super().generate([ids], [params])
    return out


def rollout(prompts, first_group_id: int, buffer, version: int):
  """(complete groups, their row facts) of one process's prompts."""
  groups = new_groups(prompts, encode, k=2, first_group_id=first_group_id, version=version)
  complete, _ = collect_groups(SeededPolicy(RESPONSES), SAMPLING, groups, buffer,
                               RolloutLimits(max_response_tokens=32, segment_tokens=4), version,
                               seed_base=0)
  complete = sorted(complete, key=lambda g: g.group_id)
  scores = score_groups(complete, lambda ids: " ".join(map(str, ids)), {"arith": "arith"}, RL,
                        version)
  return complete, RowFacts.of(complete, scores, 100 + scores.num_tokens)


def test_two_processes_facts_merge_into_the_one_process_facts():
  one_buffer, buffers = PartialRolloutBuffer(), [PartialRolloutBuffer(), PartialRolloutBuffer()]
  for version in range(3):
    first = version * len(PROMPTS)
    groups, facts = rollout(PROMPTS, first, one_buffer, version)
    # Process p takes prompts [2p, 2p + 2) with their global group ids, and its own buffer.
    merged = RowFacts.merged(
        [rollout(PROMPTS[2 * p:2 * p + 2], first + 2 * p, buffers[p], version)[1]
         for p in (1, 0)])  # gathered in any order
    for field in dataclasses.fields(RowFacts):
      np.testing.assert_array_equal(getattr(merged, field.name), getattr(facts, field.name),
                                    err_msg=field.name)
    assert facts.group_id.tolist() == [g.group_id for g in groups for _ in range(2)]
  assert len(one_buffer) == len(buffers[0]) + len(buffers[1]) > 0
  assert len(set(facts.group_id)) > 1 and facts.segments.max() > 1  # buffered groups merged


def test_facts_carry_no_tokens_their_size_does_not_grow_with_the_responses():
  """A process sends the others only its rows' facts: 4 or 4000 response tokens per row must
  give the same bytes (token ids or text in the facts would not)."""
  def facts_bytes(length: int) -> int:
    groups = new_groups([P("2", "2", "9"), P("3", "3", "9")], encode, k=2, first_group_id=0,
                        version=0)
    for group in groups:
      for t in group.trajectories:
        t.extend([7] * (length - 1) + [EOS], [-0.5] * length, version=0)
        t.finished, t.finish_reason = True, {"type": "stop"}
    scores = score_groups(groups, lambda ids: " ".join(map(str, ids)), {"arith": "arith"}, RL, 0)
    return len(pickle.dumps(RowFacts.of(groups, scores, np.full(4, length))))
  assert facts_bytes(4) == facts_bytes(4000)


def test_merging_nothing_gives_empty_facts():
  empty = RowFacts.of([], GroupScores.empty(), np.zeros(0))
  merged = RowFacts.merged([empty, empty])
  assert len(merged) == 0 and merged.prompt_id.shape == (0,)
