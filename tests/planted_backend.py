"""A rollout backend that answers with chosen responses, so tests can show what the real
rewards make of correct, wrong, hedged, hanging or malicious answers inside a real loop."""
from kimi_jax.rollout.types import Completion


class PlantedBackend:
  """Answers request i of every call with `responses(prompt_text)[seed % n]`, respecting the
  token budget (a longer response is cut there with finish "length")."""

  def __init__(self, tokenizer, responses):
    self.tokenizer, self.responses = tokenizer, responses

  def generate(self, requests, sampling, images=None):
    out = []
    for ids, params in zip(requests, sampling):
      options = self.responses(self.tokenizer.decode(ids, skip_special_tokens=False))
      planted = self.tokenizer.encode(options[params.seed % len(options)])
      planted = (planted + [self.tokenizer.eos_id])[:params.max_new_tokens]
      done = planted[-1] == self.tokenizer.eos_id
      out.append(Completion(list(ids), planted, [-1.0] * len(planted),
                            {"type": "stop", "matched": planted[-1]} if done
                            else {"type": "length", "length": len(planted)}))
    return out

  def sync(self, params, version):
    pass

  def release(self):
    pass

  def resume(self):
    pass

  def close(self):
    pass
