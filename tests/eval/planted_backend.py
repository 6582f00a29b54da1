"""A scripted backend for the synthetic arithmetic task with known right and wrong answers."""
from kimi_jax.data import synthetic
from kimi_jax.data.tokenizer import char_tokenizer
from kimi_jax.rollout.types import Completion
from tests.rollout.fakes import FakeBackend

TOKENIZER = char_tokenizer(synthetic.CHARSET)


class PlantedBackend(FakeBackend):
  """Answers with the worked response when a request's seed is even and with answer + 1
  (always wrong) when it is odd; records every request's sampling params."""

  def __init__(self):
    super().__init__()
    self.sampling, self.questions = [], []

  def generate(self, inputs, sampling, images=None):
    assert not any(images)  # text prompts
    self.sampling += sampling
    self.questions += [TOKENIZER.decode(ids) for ids in inputs]
    out = []
    for ids, params in zip(inputs, sampling):
      problem = synthetic.solve(TOKENIZER.decode(ids))
      text = (synthetic.target_response(problem) if params.seed % 2 == 0
              else f"#{int(problem.answer) + 1}")
      out.append(Completion(list(ids), TOKENIZER.encode(text) + [TOKENIZER.eos_id],
                            [0.0] * (len(text) + 1), {"type": "stop"}))
    return out
