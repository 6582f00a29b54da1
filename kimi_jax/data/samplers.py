"""Feedback-driven prompt sampling as a parentless Grain IterDataset.

`PromptSampler` yields, per step, this process's slice of a global batch of prompts. The global
batch is drawn i.i.d. with replacement from weights given by a `Strategy`, with an rng seeded
by (seed, step); every process holds the same success table, so every process draws the same
global batch and takes slice [p*B/P, (p+1)*B/P).

Success table: s_i starts at 0 and each `update` call ("visit") moves it towards the mean reward
r of prompt i in that call, s_i += a_i (r - s_i) with a_i = max(1 / visits_i, ema_rate). With
ema_rate 0 this is the running mean over visits; with ema_rate > 0 it becomes an exponential
moving average after 1/ema_rate visits, so it follows the improving policy. Rewards must lie in
[0, 1] (pass the correctness bit, not the length-penalised reward).

Strategies (selected by `make_strategy(config)`): uniform; prioritized, weight (1 - s_i) + eps;
curriculum, a base strategy restricted to the difficulty levels a schedule allows at the step
(`SwitchSchedule`: all levels, then only levels >= hard_level from step N, as in the k1.5
ablation; `GradualSchedule`: the highest allowed level rises by one every `steps_per_level`
steps). Difficulty levels are integers, larger = harder.

No prefetch: a batch is drawn only when asked for, after the previous step's `update`.
"""
import collections
import dataclasses
import hashlib
from typing import Any, Mapping, Protocol, Sequence

import grain
import jax
import numpy as np

from kimi_jax.data.sources import Prompt

NO_DIFFICULTY = -1  # difficulty_P entry of a prompt without one


class Strategy(Protocol):
  needs_difficulty: bool

  def weights(self, success_P: np.ndarray, difficulty_P: np.ndarray, step: int) -> np.ndarray:
    """Non-negative, unnormalised sampling weight of every prompt at `step`."""


@dataclasses.dataclass(frozen=True)
class Uniform:
  needs_difficulty = False

  def weights(self, success_P, difficulty_P, step):
    return np.ones_like(success_P)


@dataclasses.dataclass(frozen=True)
class Prioritized:
  epsilon: float = 0.05  # floor so solved prompts are still drawn now and then
  needs_difficulty = False

  def weights(self, success_P, difficulty_P, step):
    return (1.0 - success_P) + self.epsilon


@dataclasses.dataclass(frozen=True)
class SwitchSchedule:
  """Every level before `switch_step`, then only levels >= `hard_level` (k1.5 ablation)."""
  switch_step: int
  hard_level: int

  def allowed(self, step: int, difficulty_P: np.ndarray) -> np.ndarray:
    if step < self.switch_step:
      return np.ones(difficulty_P.shape, bool)
    return difficulty_P >= self.hard_level


@dataclasses.dataclass(frozen=True)
class GradualSchedule:
  """Levels up to start_level + step // steps_per_level."""
  start_level: int
  steps_per_level: int

  def allowed(self, step: int, difficulty_P: np.ndarray) -> np.ndarray:
    return difficulty_P <= self.start_level + step // self.steps_per_level


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """`base` weights, zeroed for prompts whose level the schedule does not allow at `step`."""
  schedule: SwitchSchedule | GradualSchedule
  base: Uniform | Prioritized = Uniform()
  needs_difficulty = True

  def weights(self, success_P, difficulty_P, step):
    allowed_P = self.schedule.allowed(step, difficulty_P)
    return self.base.weights(success_P, difficulty_P, step) * allowed_P


@dataclasses.dataclass(frozen=True, eq=False)
class DomainMix:
  """`base` weights rescaled within each domain so domain d gets share_d of the draws (k1.5
  mixes math, code and vision prompts); a domain with no weight left keeps none."""
  base: Strategy
  domain_N: np.ndarray  # int: index into share_D
  share_D: np.ndarray  # normalised to sum 1

  @property
  def needs_difficulty(self) -> bool:
    return self.base.needs_difficulty

  def weights(self, success_N, difficulty_N, step):
    w_N = self.base.weights(success_N, difficulty_N, step)
    total_D = np.bincount(self.domain_N, weights=w_N, minlength=len(self.share_D))
    scale_D = np.divide(self.share_D, total_D, out=np.zeros_like(self.share_D), where=total_D > 0)
    return w_N * scale_D[self.domain_N]


def mix_domains(strategy: Strategy, prompts: Sequence[Prompt],
                weight_by_domain: Mapping[str, float]) -> Strategy:
  """`strategy` with per-domain shares (DomainMix); unchanged for a single domain."""
  if len(weight_by_domain) <= 1:
    return strategy
  names = list(weight_by_domain)
  missing = sorted({p.domain for p in prompts} - set(names))
  if missing:
    raise ValueError(f"prompts of domain(s) {missing} have no weight; weighted: {names}")
  share_D = np.array([weight_by_domain[n] for n in names], np.float64)
  return DomainMix(strategy, np.array([names.index(p.domain) for p in prompts]),
                   share_D / share_D.sum())


def _base_strategy(config: Mapping[str, Any]) -> Uniform | Prioritized:
  base = config.get("base", "uniform")
  if base not in ("uniform", "prioritized"):
    raise ValueError(f"sampler.base: unknown {base!r}; one of ['prioritized', 'uniform']")
  return _STRATEGY_BUILDERS[base](config)


_STRATEGY_BUILDERS = {
    "uniform": lambda c: Uniform(),
    "prioritized": lambda c: Prioritized(c["epsilon"]),
    "switch_curriculum": lambda c: Curriculum(
        SwitchSchedule(c["switch_step"], c["hard_level"]), _base_strategy(c)),
    "gradual_curriculum": lambda c: Curriculum(
        GradualSchedule(c["start_level"], c["steps_per_level"]), _base_strategy(c)),
}


def make_strategy(config: Mapping[str, Any]) -> Strategy:
  """From config fields: strategy (a name below), epsilon; curricula also take base
  ("uniform" | "prioritized"), and switch_step + hard_level, or start_level + steps_per_level."""
  name = config["strategy"]
  if name not in _STRATEGY_BUILDERS:
    raise ValueError(f"sampler.strategy: unknown {name!r}; one of {sorted(_STRATEGY_BUILDERS)}")
  try:
    return _STRATEGY_BUILDERS[name](config)
  except KeyError as e:
    raise ValueError(f"sampler strategy {name!r} needs config field {e.args[0]!r}") from None


def _table_column(values: list, dtype, length: int, name: str) -> np.ndarray:
  array = np.asarray(values, dtype)
  if array.shape != (length,):
    raise ValueError(f"sampler state {name!r}: shape {array.shape} for {length} prompts")
  return array


class SuccessTable:
  """Per-prompt success rate s_P and visit count (see the module docstring for the rule)."""

  def __init__(self, num_prompts: int, ema_rate: float):
    if not 0.0 <= ema_rate <= 1.0:
      raise ValueError(f"ema_rate must be in [0, 1], got {ema_rate}")
    self.ema_rate = ema_rate
    self.success_P = np.zeros(num_prompts, np.float64)
    self.visits_P = np.zeros(num_prompts, np.int64)

  def update(self, index_B: np.ndarray, rewards_B: np.ndarray) -> None:
    """One visit for each distinct index; its reward is the mean over its entries."""
    outside_B = ~((rewards_B >= 0.0) & (rewards_B <= 1.0))
    if outside_B.any():
      raise ValueError(f"rewards must lie in [0, 1], got {rewards_B[outside_B][:5]}")
    unique_U, inverse_B = np.unique(index_B, return_inverse=True)
    mean_U = np.bincount(inverse_B, rewards_B) / np.bincount(inverse_B)
    self.visits_P[unique_U] += 1
    rate_U = np.maximum(1.0 / self.visits_P[unique_U], self.ema_rate)
    self.success_P[unique_U] += rate_U * (mean_U - self.success_P[unique_U])

  def state(self) -> dict[str, list]:
    """Plain lists: JSON writes floats with repr, which reads back bit-exactly."""
    return {"success": self.success_P.tolist(), "visits": self.visits_P.tolist()}

  def restore(self, state: Mapping[str, list]) -> None:
    n = len(self.success_P)
    self.success_P = _table_column(state["success"], np.float64, n, "success")
    self.visits_P = _table_column(state["visits"], np.int64, n, "visits")


class PromptSampler(grain.IterDataset):
  """Infinite stream of per-process prompt batches; iterate it to get a `SamplerIterator`."""

  def __init__(self, prompts: Sequence[Prompt], strategy: Strategy, global_batch_size: int,
               seed: int, ema_rate: float = 0.0, process_index: int | None = None,
               process_count: int | None = None):
    super().__init__()
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size < 1 or global_batch_size % self.process_count:
      raise ValueError(f"global_batch_size {global_batch_size} is not a positive multiple of "
                       f"process_count {self.process_count}")
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")
    if not prompts:
      raise ValueError("no prompts to sample from")
    self.prompts = list(prompts)
    self.index_of = {p.id: i for i, p in enumerate(self.prompts)}
    if len(self.index_of) != len(self.prompts):
      repeated = sorted(i for i, n in collections.Counter(p.id for p in self.prompts).items() if n > 1)
      raise ValueError(f"prompt ids are not unique: {repeated[:5]}")
    self.difficulty_P = np.array([NO_DIFFICULTY if p.difficulty is None else p.difficulty
                                  for p in self.prompts], np.int64)
    missing = [p.id for p in self.prompts if p.difficulty is None]
    if strategy.needs_difficulty and missing:
      raise ValueError(f"{type(strategy).__name__} needs a difficulty on every prompt; "
                       f"{len(missing)} have none (first: {missing[:3]})")
    self.strategy = strategy
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.ema_rate = ema_rate
    self.fingerprint = hashlib.sha256("\n".join(self.index_of).encode()).hexdigest()[:16]

  def __iter__(self) -> "SamplerIterator":
    return SamplerIterator(self)


class SamplerIterator(grain.DatasetIterator):
  """Holds the success table and the step; `update` feeds rollout rewards back."""

  def __init__(self, sampler: PromptSampler):
    super().__init__()
    self._sampler = sampler
    self.table = SuccessTable(len(sampler.prompts), sampler.ema_rate)
    self.step = 0

  def _draw(self, step: int) -> np.ndarray:
    """Prompt indices of the global batch at `step` under the current table."""
    s = self._sampler
    weights_P = s.strategy.weights(self.table.success_P, s.difficulty_P, step)
    total = weights_P.sum()
    if not (np.all(weights_P >= 0) and np.isfinite(total) and total > 0):
      raise ValueError(f"step {step}: {type(s.strategy).__name__} gives no drawable prompt "
                       f"(weight total {total})")
    rng = np.random.default_rng([s.seed, step])
    return rng.choice(len(weights_P), size=s.global_batch_size, p=weights_P / total)

  def __next__(self) -> list[Prompt]:
    self._assert_not_closed()
    s = self._sampler
    local = s.global_batch_size // s.process_count
    index_B = self._draw(self.step)[s.process_index * local:(s.process_index + 1) * local]
    self.step += 1
    return [s.prompts[i] for i in index_B]

  def update(self, prompt_ids: Sequence[str], rewards) -> None:
    """Feed back rewards of the GLOBAL batch (all-gathered), one entry per sample.

    Every process must make the same calls, or their tables (and batches) diverge.
    """
    rewards_B = np.asarray(rewards, np.float64).reshape(-1)
    if len(prompt_ids) != len(rewards_B):
      raise ValueError(f"{len(prompt_ids)} prompt ids but {len(rewards_B)} rewards")
    unknown = [i for i in prompt_ids if i not in self._sampler.index_of]
    if unknown:
      raise KeyError(f"unknown prompt ids: {unknown[:5]}")
    index_B = np.array([self._sampler.index_of[i] for i in prompt_ids], np.int64)
    self.table.update(index_B, rewards_B)

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step, "fingerprint": self._sampler.fingerprint, **self.table.state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if state["fingerprint"] != self._sampler.fingerprint:
      raise ValueError(f"sampler state was saved for another prompt set (fingerprint "
                       f"{state['fingerprint']}, this set {self._sampler.fingerprint})")
    self.table.restore(state)
    self.step = int(state["step"])
