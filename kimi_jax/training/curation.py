"""The curation stage's `generate` over a rollout backend (DESIGN.md section 4).

`curate` asks for text: n completions per prompt string; a `RolloutBackend` speaks token ids.
This adapter encodes prompts with the chat template the policy was trained with, sends each of the n samples as its own request with its own seed (one seed
for n > 1 would let a server return n copies of one draw), stops at the tokenizer's eos and
decodes the outputs without special tokens.
"""
import itertools
from typing import Callable

from kimi_jax.data.curation import Generate
from kimi_jax.rollout.backends import RolloutBackend
from kimi_jax.rollout.types import SamplingParams


def curation_generate(backend: RolloutBackend, tokenizer, encode: Callable[[str], list[int]],
                      seed: int = 0) -> Generate:
  """`generate(prompts, n, temperature, max_new_tokens)` for `curate`, sampled on `backend`.

  `encode` turns a prompt text into ids the way the policy was trained (`tasks.encode_text`).
  Request seeds count up from `seed` over every sample of every call, so no two samples of one
  adapter share a seed.
  """
  seeds = itertools.count(seed)

  def generate(prompts: list[str], n: int, temperature: float,
               max_new_tokens: int) -> list[list[str]]:
    encoded = [encode(text) for text in prompts]
    inputs = [ids for ids in encoded for _ in range(n)]
    sampling = [SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                               seed=next(seeds), stop_token_ids=tuple(tokenizer.eos_ids))
                for _ in inputs]
    completions = backend.generate(inputs, sampling)
    if len(completions) != len(inputs):
      raise RuntimeError(f"backend returned {len(completions)} completions for {len(inputs)} "
                         "requests")
    texts = [tokenizer.decode(c.output_ids) for c in completions]
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

  return generate
