"""Scored groups of several processes merged into the one-process order."""
import dataclasses

import ml_collections
import numpy as np

from kimi_jax.rollout.partial import PartialRolloutBuffer, RolloutLimits, collect_groups, new_groups
from kimi_jax.training.scoring import GroupScores, merge_scored_groups, score_groups
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
  groups = new_groups(prompts, encode, k=2, first_group_id=first_group_id, version=version)
  complete, _ = collect_groups(SeededPolicy(RESPONSES), SAMPLING, groups, buffer,
                               RolloutLimits(max_response_tokens=32, segment_tokens=4), version,
                               seed_base=0)
  return complete, score_groups(complete, lambda ids: " ".join(map(str, ids)),
                                {"arith": "arith"}, RL, version)


def test_two_processes_slices_merge_into_the_one_process_groups_and_scores():
  one_buffer, buffers = PartialRolloutBuffer(), [PartialRolloutBuffer(), PartialRolloutBuffer()]
  for version in range(3):
    first = version * len(PROMPTS)
    groups, scores = rollout(PROMPTS, first, one_buffer, version)
    # Process p takes prompts [2p, 2p + 2) with their global group ids, and its own buffer.
    merged_groups, merged_scores = merge_scored_groups(
        [rollout(PROMPTS[2 * p:2 * p + 2], first + 2 * p, buffers[p], version) for p in (0, 1)])
    assert merged_groups == groups
    assert [g.group_id for g in groups] == sorted(g.group_id for g in groups)
    for field in dataclasses.fields(GroupScores):
      np.testing.assert_array_equal(getattr(merged_scores, field.name),
                                    getattr(scores, field.name), err_msg=field.name)
  assert len(one_buffer) == len(buffers[0]) + len(buffers[1]) > 0
  assert not np.all(scores.length == 0)  # the per-group length reward is in the comparison


def test_merging_nothing_gives_empty_scores():
  groups, scores = merge_scored_groups([([], GroupScores.empty()), ([], GroupScores.empty())])
  assert groups == [] and scores.responses == [] and scores.num_tokens.shape == (0,)
