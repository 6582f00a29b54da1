"""Chain-of-thought reward model with its strict JSON verdict."""
import numpy as np
import pytest

from kimi_jax.rewards import verdict
from kimi_jax.rewards.judge import (JUDGE_PROMPT_TEMPLATE, ChainOfThoughtRewardModel, RMExample,
                                     judge_reward)

EXAMPLES = [RMExample("1+2", "3", "three so 3"), RMExample("add two and two", "4", "5")]


class ScriptedJudge:
  """A `generate` callable handing out queued replies in order and recording its calls."""

  def __init__(self, replies):
    self.replies, self.calls = list(replies), []

  def __call__(self, prompts, max_new_tokens):
    self.calls.append((list(prompts), max_new_tokens))
    replies, self.replies = self.replies[:len(prompts)], self.replies[len(prompts):]
    return replies


VERDICT_CASES = [
    # (reply, verdict or error reason)
    ('The answer 3 matches.\n{"correct": true}', True),
    ('5 != 4.\n{"correct": false}', False),
    ('ok {"correct":true}\n\n', True),  # trailing whitespace
    ('fine. {"correct": true} <|im_end|> That is all.', True),  # trailing junk without braces
    ('{\n  "correct" : false\n}', False),
    (r'$\frac{1}{2} = \{0.5\}$ and the set {1, 2}. {"correct": true}', True),  # braces in reasoning
    ('Draft: {"correct": false}. On reflection: {"correct": true}', True),  # last object wins
    ('A stray { here. {"correct": false}', False),
    ('{"correct": true} and then \\boxed{7}', verdict.MALFORMED),  # something after the verdict
    ('{"correct": tru}', verdict.MALFORMED),
    ("{'correct': true}", verdict.MALFORMED),
    ('{"correct": true,}', verdict.MALFORMED),
    ('{"correct": true} }', verdict.MALFORMED),  # stray closing brace after the verdict
    ('{"correct": "true"}', verdict.NON_BOOLEAN),
    ('{"correct": 1}', verdict.NON_BOOLEAN),
    ('{"correct": null}', verdict.NON_BOOLEAN),
    ('{"correct": {"value": true}}', verdict.NON_BOOLEAN),
    ('{"correct": true, "confidence": 0.9}', verdict.WRONG_FIELDS),
    ('{"verdict": true}', verdict.WRONG_FIELDS),
    ('{}', verdict.WRONG_FIELDS),
    ('{"correct": false, "correct": true}', verdict.WRONG_FIELDS),  # repeated key
    ('{"result": {"correct": true}}', verdict.WRONG_FIELDS),  # the outer object is the verdict
    ('The response is right, so correct: true', verdict.NO_JSON),
    ('', verdict.NO_JSON),
    ('{"correct": false} ... wait, {"correct": tr', verdict.UNTERMINATED),  # cut by max tokens
]


@pytest.mark.parametrize("reply,expected", VERDICT_CASES)
def test_parse_verdict(reply, expected):
  if isinstance(expected, bool):
    assert verdict.parse_verdict(reply) is expected
  else:
    with pytest.raises(verdict.VerdictError) as err:
      verdict.parse_verdict(reply)
    assert err.value.reason == expected


def test_cot_rm_scores_verdicts_and_counts_errors():
  replies = [reply for reply, _ in VERDICT_CASES]
  judge = ScriptedJudge(replies)
  model = ChainOfThoughtRewardModel(judge, max_new_tokens=512)
  examples = [RMExample(f"q{i}", f"ref{i}", f"resp{i}") for i in range(len(replies))]
  scores = model.score(examples)
  expected = [1.0 if outcome is True else 0.0 for _, outcome in VERDICT_CASES]
  np.testing.assert_array_equal(scores, expected)
  reasons = [outcome for _, outcome in VERDICT_CASES if not isinstance(outcome, bool)]
  assert model.errors == {r: reasons.count(r) for r in verdict.VERDICT_ERRORS}

  prompts, max_new_tokens = judge.calls[0]
  assert max_new_tokens == 512
  assert prompts[2] == JUDGE_PROMPT_TEMPLATE.format(question="q2", reference="ref2",
                                                    response="resp2")
  assert 'Response:\nresp2\n' in prompts[2] and '{"correct": true}' in prompts[2]

  judge.replies = [replies[0], replies[-1]]  # counters accumulate across calls
  judgements = model.judge(examples[:2])
  assert (judgements[0].correct, judgements[0].error) == (True, None)
  assert (judgements[1].correct, judgements[1].error) == (None, verdict.UNTERMINATED)
  assert judgements[1].text == replies[-1]
  assert model.errors[verdict.UNTERMINATED] == reasons.count(verdict.UNTERMINATED) + 1


def test_cot_rm_rejects_bad_generator_and_settings():
  with pytest.raises(ValueError, match="generate returned 1 texts for 2 prompts"):
    ChainOfThoughtRewardModel(ScriptedJudge(['{"correct": true}']), 64).score(EXAMPLES[:2])
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    ChainOfThoughtRewardModel(ScriptedJudge([]), 0)


def test_judge_reward_grades_each_response_against_its_question_and_reference():
  judge = ScriptedJudge(['{"correct": true}', '{"correct": false}', "no verdict"])
  reward = judge_reward(ChainOfThoughtRewardModel(judge, max_new_tokens=32))
  rewards = reward(["q0", "q1", "q2"], ["resp0", "resp1", "resp2"], ["ref0", "ref1", "ref2"])
  assert rewards.dtype == np.float64
  np.testing.assert_array_equal(rewards, [1.0, 0.0, 0.0])
  (prompts, max_new_tokens), = judge.calls
  assert max_new_tokens == 32
  assert prompts == [JUDGE_PROMPT_TEMPLATE.format(question=f"q{i}", reference=f"ref{i}",
                                                  response=f"resp{i}") for i in range(3)]
