"""Long2short: model merging, shortest rejection sampling, DPO pairs.

Merging averages the weights of a long-CoT and a short-CoT model. The data methods start from
n samples per prompt (the paper's n = 8) of the long-CoT model, each marked correct or not with
its response length in tokens:
  * shortest rejection sampling keeps the shortest correct response per prompt as an SFT example;
  * DPO pairs take that response as chosen and, as rejected, only LONGER responses: every wrong
    response longer than the chosen and every correct one at least `length_ratio` (1.5) times
    longer. A wrong answer no longer than the chosen is not a negative: rejecting it would
    teach length-neutral correctness, not brevity.
Ties in length go to the earliest sample; prompts without a correct sample give nothing.
"""
import dataclasses
import numbers
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.checkpointing.hf import CheckpointError, config_diff, load_hf, save_hf


@dataclasses.dataclass(frozen=True)
class Sample:
  """One sampled response to `prompt`, graded, with its length in tokens."""

  prompt: str
  response: str
  correct: bool
  num_tokens: int

  def __post_init__(self):
    if not isinstance(self.correct, (bool, np.bool_)):
      raise ValueError(f"Sample.correct={self.correct!r} (prompt {self.prompt!r}): must be a bool")
    tokens = self.num_tokens
    integer = isinstance(tokens, numbers.Integral) and not isinstance(tokens, (bool, np.bool_))
    if not integer or tokens < 1:
      raise ValueError(f"Sample.num_tokens={self.num_tokens!r} (prompt {self.prompt!r}): "
                       "must be a positive integer")


class SFTExample(NamedTuple):
  prompt: str
  response: str


class PreferencePair(NamedTuple):
  prompt: str
  chosen: str
  rejected: str


def group_by_prompt(samples: Sequence[Sample], num_samples: int) -> dict[str, list[Sample]]:
  """Samples per prompt, prompts and samples in input order; each prompt needs `num_samples`."""
  groups: dict[str, list[Sample]] = {}
  for sample in samples:
    groups.setdefault(sample.prompt, []).append(sample)
  for prompt, group in groups.items():
    if len(group) != num_samples:
      raise ValueError(f"prompt {prompt!r}: {len(group)} samples, expected "
                       f"num_samples={num_samples}")
  return groups


def shortest_correct(group: Sequence[Sample]) -> Sample | None:
  """The correct sample with the fewest tokens (the earliest on ties), or None."""
  correct = [s for s in group if s.correct]
  return min(correct, key=lambda s: s.num_tokens) if correct else None


def shortest_rejection_sampling(samples: Sequence[Sample],
                                num_samples: int = 8) -> list[SFTExample]:
  """One SFT example per prompt that has a correct sample: its shortest correct response."""
  examples = []
  for prompt, group in group_by_prompt(samples, num_samples).items():
    chosen = shortest_correct(group)
    if chosen is not None:
      examples.append(SFTExample(prompt, chosen.response))
  return examples


def build_dpo_pairs(samples: Sequence[Sample], num_samples: int = 8,
                    length_ratio: float = 1.5) -> list[PreferencePair]:
  """Chosen = shortest correct; rejected = each wrong sample with more tokens than the chosen
  and each correct one with num_tokens >= length_ratio * the chosen's (> 1, so the chosen never
  rejects itself)."""
  if length_ratio <= 1.0:
    raise ValueError(f"length_ratio={length_ratio}: must be > 1")
  pairs = []
  for prompt, group in group_by_prompt(samples, num_samples).items():
    chosen = shortest_correct(group)
    if chosen is None:
      continue
    pairs.extend(PreferencePair(prompt, chosen.response, s.response) for s in group
                 if (not s.correct and s.num_tokens > chosen.num_tokens)
                 or s.num_tokens >= length_ratio * chosen.num_tokens)
  return pairs


def _average(a, b, weight):
  mixed = weight * a.astype(jnp.float32) + (1.0 - weight) * b.astype(jnp.float32)
  return mixed.astype(a.dtype)


def _average_trees(params_a, params_b, weight):
  return jax.tree.map(lambda a, b: _average(a, b, weight), params_a, params_b)


def merge_params(params_a, params_b, weight: float = 0.5):
  """weight * params_a + (1 - weight) * params_b leaf by leaf (float32 math, params_a's dtype),
  each leaf placed with params_a's sharding. weight = 0.5 is the plain average."""
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"weight={weight}: must be in [0, 1]")
  if jax.tree.structure(params_a) != jax.tree.structure(params_b):
    raise ValueError("params_a and params_b have different tree structures")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params_a), jax.tree.leaves(params_b)):
    if a.shape != b.shape:
      raise ValueError(f"param {jax.tree_util.keystr(path)}: shape {a.shape} in params_a, "
                       f"{b.shape} in params_b")
  shardings = jax.tree.map(lambda a: a.sharding, params_a)
  merge = jax.jit(_average_trees, out_shardings=shardings)
  return merge(params_a, params_b, jnp.float32(weight))


def merge_hf_checkpoints(path_a: str, path_b: str, out_path: str, weight: float = 0.5) -> None:
  """Merge two HF checkpoint directories of the same architecture into `out_path`."""
  config_a, params_a = load_hf(path_a)
  config_b, params_b = load_hf(path_b)
  if config_a != config_b:
    raise CheckpointError(f"{path_a} and {path_b}: model configs differ in "
                          f"{config_diff(config_a, config_b)}")
  save_hf(out_path, config_a, merge_params(params_a, params_b, weight))
