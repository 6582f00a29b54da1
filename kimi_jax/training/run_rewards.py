"""A run's reward registry: the built-in rewards, plus the chain-of-thought judge ("cot_rm") when
a task names it, its model served through a rollout backend.

`config.rewards.cot_rm` says how the judge runs: `checkpoint` (the judge's HF directory; its
tokenizer and chat template are always read from there), `urls` (SGLang servers already serving
that checkpoint; when empty, an in-process engine runs the checkpoint's weights with
`max_batch`, `max_seq_len` and the loop cut-off `repetition_ngram` / `repetition_count`),
`max_new_tokens` (the budget of its reasoning and verdict) and `temperature` (0: greedy). Each
judge prompt is the filled `JUDGE_PROMPT_TEMPLATE` as one user turn of the judge's chat
template; replies are decoded without special tokens.
"""
import dataclasses
import os
from typing import Iterable

from kimi_jax.checkpointing.hf import load_hf, load_hf_config
from kimi_jax.data.tasks import encode_text
from kimi_jax.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from kimi_jax.rewards.judge import ChainOfThoughtRewardModel, GenerateFn, judge_reward
from kimi_jax.rewards.registry import REGISTRY, RewardRegistry
from kimi_jax.rollout.backends import EngineBackend, RolloutBackend, SGLangBackend
from kimi_jax.training.curation import curation_generate

COT_RM = "cot_rm"
JUDGE_VERSION = "judge"  # the weight version the judge's completions report; it never changes


@dataclasses.dataclass
class RunRewards:
  registry: RewardRegistry
  judge: ChainOfThoughtRewardModel | None = None  # its `errors` count invalid verdicts
  backends: tuple[RolloutBackend, ...] = ()  # what serves the judge

  def close(self) -> None:
    for backend in self.backends:
      backend.close()


def judge_backend(judge_config, tokenizer, workdir: str) -> RolloutBackend:
  """SGLang servers at `urls`, else an in-process engine on the judge checkpoint."""
  if judge_config.urls:
    return SGLangBackend(load_hf_config(judge_config.checkpoint), tokenizer, judge_config.urls,
                         os.path.join(workdir, "judge_weights"))
  model_config, params = load_hf(judge_config.checkpoint)
  return EngineBackend(model_config, params, rollout_config=judge_config, rl_config=judge_config,
                       eos_ids=tokenizer.eos_ids, version=JUDGE_VERSION)


def judge_generate(backend: RolloutBackend, tokenizer, temperature: float,
                   seed: int) -> GenerateFn:
  """The judge's `generate(prompts, max_new_tokens) -> replies`: one sample per prompt."""
  texts = curation_generate(backend, tokenizer, lambda text: encode_text(tokenizer, text), seed)
  return lambda prompts, max_new_tokens: [
      reply for [reply] in texts(prompts, 1, temperature, max_new_tokens)]


def _check_judge_config(config) -> None:
  judge = config.get("rewards", {}).get(COT_RM)
  if judge is None:
    raise ValueError(f"a task's reward is {COT_RM!r} but the config has no rewards.{COT_RM} "
                     "section (checkpoint, urls, max_new_tokens, temperature, ...)")
  if not judge.checkpoint or not os.path.exists(os.path.join(judge.checkpoint, TOKENIZER_FILE)):
    raise ValueError(f"config.rewards.{COT_RM}.checkpoint={judge.checkpoint!r}: must be the "
                     f"judge's HF directory with its {TOKENIZER_FILE} (its weights too unless "
                     f"config.rewards.{COT_RM}.urls names servers)")
  if judge.temperature < 0:
    raise ValueError(f"config.rewards.{COT_RM}.temperature={judge.temperature}: must be >= 0")


def build_run_rewards(config, reward_names: Iterable[str], workdir: str) -> RunRewards:
  """REGISTRY itself unless `reward_names` include "cot_rm"; then a copy with the judge added,
  its backend started here (close it with `RunRewards.close`)."""
  if COT_RM not in set(reward_names):
    return RunRewards(REGISTRY)
  _check_judge_config(config)
  judge_config = config.rewards[COT_RM]
  tokenizer = load_tokenizer(judge_config.checkpoint)
  backend = judge_backend(judge_config, tokenizer, workdir)
  judge = ChainOfThoughtRewardModel(
      judge_generate(backend, tokenizer, judge_config.temperature, config.seed),
      judge_config.max_new_tokens)
  registry = REGISTRY.copy()
  registry.register(COT_RM, judge_reward(judge), needs_questions=True)
  return RunRewards(registry, judge, (backend,))
