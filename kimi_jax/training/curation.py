"""The curation stage's `generate` over a rollout backend.

`curate` asks for text: n completions per prompt string; a `RolloutBackend` speaks token ids.
This adapter encodes prompts with the chat template the policy was trained with, sends each
of the n samples as its own request with its own seed (one seed for n > 1 would let a server
return n copies of one draw), stops at the tokenizer's eos ids and decodes the outputs without
special tokens. `curate_file` is the stage `launch.curate` runs: a prompt file in, the curated
file (with `difficulty`) and a report out; code rows without tests get them from CYaRon first.
"""
import dataclasses
import itertools
import json
import os
from typing import Callable

from kimi_jax.checkpointing.hf import load_hf
from kimi_jax.data.curation import CurationConfig, CurationReport, Generate, Removal, curate
from kimi_jax.data.sources import DataValidationError, prompts_from_rows, read_rows
from kimi_jax.data.tasks import QUESTION, SCHEMAS, encode_text
from kimi_jax.data.tokenizer import load_tokenizer
from kimi_jax.model.config import with_execution
from kimi_jax.rewards.registry import REGISTRY
from kimi_jax.rewards.testgen import GenerationConfig, generate_tests
from kimi_jax.rollout.backends import RolloutBackend, build_backend
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


UNTESTABLE = "untestable"  # CYaRon generation kept no problem (k1.5 agreement rule)


def generate_missing_tests(numbered_rows: list, config: GenerationConfig) -> dict[int, str]:
  """Code rows without `tests` but with a CYaRon `generator` and ground-truth `solutions` get
  (in place) the tests the k1.5 agreement rule keeps. Returns {line: reason} of the problems
  the rule rejects."""
  rejected = {}
  for line, row in numbered_rows:
    if not isinstance(row, dict) or row.get("tests") or not (row.get("generator")
                                                             and row.get("solutions")):
      continue
    generated = generate_tests(row["generator"], row["solutions"], config)
    if generated.keep_problem:
      row["tests"] = [{"input": stdin, "output": out} for stdin, out in generated.cases]
    else:
      rejected[line] = (f"{sum(generated.passing)} of {len(row['solutions'])} solutions pass "
                        f"the {len(generated.cases)} agreed cases")
  return rejected


def batch_reward_per_response(name: str) -> Callable[[str, str], float]:
  reward = REGISTRY.get(name)
  return lambda response, answer: float(reward([response], [answer])[0])


def curate_file(config, input_path: str, output_path: str) -> CurationReport:
  """Curate the prompt file `input_path` with the policy of `config.init.checkpoint`, sampled on
  the configured rollout backend; write the kept rows (every original field, plus `difficulty`
  = failed samples out of `curation.num_samples`) to `output_path` and the report beside it."""
  data, checkpoint = config.data, config.init.checkpoint
  if not checkpoint:
    raise ValueError("config.init.checkpoint is not set: curation samples from that model")
  numbered = list(read_rows(input_path))
  untestable = generate_missing_tests(numbered, GenerationConfig(**config.curation.testgen))
  numbered = [(line, row) for line, row in numbered if line not in untestable]
  prompts, errors = prompts_from_rows(numbered, input_path, SCHEMAS[data.schema])
  if errors:
    raise DataValidationError(errors)
  templated = [dataclasses.replace(p, question=data.template.replace(QUESTION, p.question))
               for p in prompts]
  tokenizer = load_tokenizer(checkpoint)
  model_config, params = load_hf(checkpoint)
  model_config = with_execution(model_config, config.model)
  backend = build_backend(config, model_config, tokenizer, params, "curation",
                          os.path.dirname(os.path.abspath(output_path)))
  generate = curation_generate(
      backend, tokenizer, lambda text: encode_text(tokenizer, text, data.chat_template_kwargs),
      config.seed)
  settings = {k: v for k, v in config.curation.items() if k != "testgen"}
  kept, report = curate(templated, generate, batch_reward_per_response(data.reward),
                        CurationConfig(**settings))
  backend.close()
  difficulty = {p.id: p.difficulty for p in kept}
  with open(output_path, "w") as f:
    for prompt, (_, row) in zip(prompts, numbered):
      if prompt.id in difficulty:
        f.write(json.dumps({**row, "difficulty": difficulty[prompt.id]}) + "\n")
  report.removed += [Removal(f"{input_path}:{line}", UNTESTABLE, why)
                     for line, why in untestable.items()]
  report.write(output_path + ".report.json")
  return report
