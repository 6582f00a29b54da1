"""RL tasks as data plus a reward: prompt sets, how a prompt becomes token ids, the reward name
of each domain (looked up in `kimi_jax.rewards.registry.REGISTRY`) and, for synthetic tasks,
the reference responses of the SFT warm-up.

`build_task(task_config, data_config, seed=...)` picks a builder by `task.name`:
- "prompts": prompt files, one per domain: `data.train` / `data.eval` (.jsonl or .parquet read
  with a `Schema`: gsm8k `#### N`, math `\\boxed{}`, answer, code `tests: [{input, output}]`),
  `data.template` (the question goes where "{question}" stands), `data.reward` and
  `data.domain`; `data.mix` adds more domains with the same fields plus a sampling `weight`
  (the k1.5 RL set mixes math, code and vision prompts).
- "arith": the synthetic multi-step arithmetic task of the CPU demo, with its own char
  tokenizer (`charset`) and reference responses.
- "vision": synthetic prompts of every domain in `task.domains`: "arith_image" (the arithmetic
  question only in a picture), "chart" (bar-chart reading) and "arith" (the text task, for a
  mixed text + vision run); `num_train` / `num_heldout` prompts per domain, the same
  direct-answer mix in each.

Prompt ids: the templated question becomes one user message rendered with the tokenizer's chat
template (a checkpoint's `chat_template`, `data.chat_template_kwargs` passed through, e.g.
enable_thinking); a tokenizer without one gets bos (if it has one) + the text. Every stage
(SFT, rollouts, eval, curation) encodes prompts this one way.

The arithmetic warm-up mixes two kinds of reference response, like real SFT data that mixes
long-CoT and short answers: a fraction `direct_answer_fraction` of prompts (fixed per prompt)
is answered with the final answer alone ("#12"), the rest with the worked chain of thought.
The warmed-up policy therefore chooses between reasoning and guessing on every prompt, and RL
must discover from the verifier alone when the chain of thought pays. A fraction
`verify_fraction` of the worked responses then checks itself: the steps are undone back to the
first operand before the answer (`synthetic.verification`). That reflection makes the chain of
thought long without making it more accurate: the redundancy long2short removes.
"""
import dataclasses
import zlib
from typing import Callable, Mapping

import numpy as np

from kimi_jax.data import rendered, sources, synthetic
from kimi_jax.data.image_prompts import IMAGE_PLACEHOLDER, PromptInputs, with_image_pads
from kimi_jax.data.images import ImageProcessing
from kimi_jax.data.packing import PLAIN, ChatTemplate, encode_prompt
from kimi_jax.data.sources import Prompt

QUESTION = "{question}"
SCHEMAS = {"gsm8k": sources.GSM8K, "math": sources.MATH, "answer": sources.Schema(),
           "code": sources.CODE}
VISION_DOMAINS = (synthetic.DOMAIN, rendered.ARITH_IMAGE_DOMAIN, rendered.CHART_DOMAIN)
TEMPLATE = ChatTemplate(add_bos=True)  # tokenizers without a chat template: <bos> + text


def encode_text(tokenizer, text: str, chat_template_kwargs: Mapping | None = None) -> list[int]:
  """Ids of a prompt text: one user turn of the tokenizer's chat template, or bos + text."""
  if tokenizer.chat_template is None:
    return encode_prompt(tokenizer, PLAIN if tokenizer.bos_id is None else TEMPLATE, text)
  chat = tokenizer.chat_template.render([{"role": "user", "content": text}],
                                        add_generation_prompt=True, **(chat_template_kwargs or {}))
  return encode_prompt(tokenizer, PLAIN, chat)


@dataclasses.dataclass(frozen=True)
class Task:
  train: list[Prompt]
  heldout: list[Prompt]
  reward_by_domain: dict[str, str]  # prompt domain -> registered reward name
  template_by_domain: dict[str, str]  # prompt domain -> text with "{question}"
  weight_by_domain: dict[str, float]  # prompt domain -> share of the sampled prompts
  chat_template_kwargs: Mapping = dataclasses.field(default_factory=dict)
  charset: str | None = None  # synthetic tasks: the char tokenizer they train from scratch with
  reference_response: Callable[[Prompt], str] | None = None  # synthetic tasks: SFT targets

  def prompt_text(self, prompt: Prompt) -> str:
    """The domain's template around the question, one image placeholder per image first."""
    return (IMAGE_PLACEHOLDER * len(prompt.images)
            + self.template_by_domain[prompt.domain].replace(QUESTION, prompt.question))

  def encode_prompt(self, tokenizer, prompt: Prompt) -> list[int]:
    """Prompt ids exactly as every stage sees them (module docstring); an image is one pad."""
    return encode_text(tokenizer, self.prompt_text(prompt), self.chat_template_kwargs)

  def prompt_inputs(self, tokenizer, prompt: Prompt, processing: ImageProcessing) -> PromptInputs:
    """`encode_prompt` with each image's pads expanded to its LM tokens, and the images."""
    return with_image_pads(tokenizer, self.encode_prompt(tokenizer, prompt), prompt, processing)

  @property
  def has_images(self) -> bool:
    return any(p.images for p in self.train + self.heldout)


def _prompt_fraction(prompt: Prompt, salt: str) -> float:
  """A fixed pseudo-random number in [0, 1) per prompt id and salt."""
  return zlib.crc32(f"{prompt.id}{salt}".encode()) % 10_000 / 10_000


def _is_direct(prompt: Prompt, direct_answer_fraction: float) -> bool:
  """Whether the prompt's warm-up reference is the bare answer."""
  return _prompt_fraction(prompt, "") < direct_answer_fraction


def arith_reference(prompt: Prompt, direct_answer_fraction: float, verify_fraction: float) -> str:
  problem = synthetic.solve(prompt.question)
  if _is_direct(prompt, direct_answer_fraction):
    return f"{synthetic.ANSWER_MARKER}{problem.answer}"
  verify = _prompt_fraction(prompt, ":verify") < verify_fraction
  return synthetic.target_response(problem, verify)


def _check_fractions(task_config, fields) -> None:
  for field in fields:
    if not 0.0 <= task_config[field] <= 1.0:
      raise ValueError(f"config.task.{field}={task_config[field]}: must be in [0, 1]")


def _build_arith(task_config, data_config, seed: int) -> Task:
  _check_fractions(task_config, ("direct_answer_fraction", "verify_fraction"))
  train, heldout = synthetic.train_heldout_split(task_config.num_train, task_config.num_heldout,
                                                 tuple(task_config.levels), seed,
                                                 task_config.max_operand)
  domain = synthetic.DOMAIN
  return Task(train=train, heldout=heldout, reward_by_domain={domain: task_config.reward},
              template_by_domain={domain: QUESTION}, weight_by_domain={domain: 1.0},
              charset=synthetic.CHARSET,
              reference_response=lambda p: arith_reference(p, task_config.direct_answer_fraction,
                                                            task_config.verify_fraction))


def _load_domain(source, key: str, domain: str) -> tuple[list[Prompt], list[Prompt]]:
  """(train, eval) prompts of one source section, every prompt tagged with `domain`."""
  if source.schema not in SCHEMAS:
    raise ValueError(f"config.{key}.schema={source.schema!r}: one of {sorted(SCHEMAS)}")
  if QUESTION not in source.template:
    raise ValueError(f"config.{key}.template={source.template!r}: must contain {QUESTION}")
  loaded = []
  for split in ("train", "eval"):
    if not source[split]:
      raise ValueError(f"config.{key}.{split} is empty: set it to a .jsonl or .parquet file")
    prompts = sources.load_prompts(source[split], SCHEMAS[source.schema])
    loaded.append([dataclasses.replace(p, id=f"{domain}/{p.id}", domain=domain) for p in prompts])
  return loaded[0], loaded[1]


def _build_prompts(task_config, data_config, seed: int) -> Task:
  sections = {data_config.domain: (data_config, "data")}
  sections.update({name: (source, f"data.mix.{name}") for name, source in data_config.mix.items()})
  train, heldout, rewards, templates, weights = [], [], {}, {}, {}
  for domain, (source, key) in sections.items():
    domain_train, domain_eval = _load_domain(source, key, domain)
    train += domain_train
    heldout += domain_eval
    rewards[domain], templates[domain] = source.reward, source.template
    weights[domain] = float(source.weight)
    if weights[domain] <= 0:
      raise ValueError(f"config.{key}.weight={source.weight}: must be > 0")
  return Task(train=train, heldout=heldout, reward_by_domain=rewards,
              template_by_domain=templates, weight_by_domain=weights,
              chat_template_kwargs=dict(data_config.chat_template_kwargs))


def _domain_split(task_config, domain: str, seed: int):
  """(train, held-out, {prompt id: worked response}) of one vision-task domain."""
  c = task_config
  if domain == synthetic.DOMAIN:
    train, heldout = synthetic.train_heldout_split(c.num_train, c.num_heldout, tuple(c.levels),
                                                   seed, c.max_operand)
    return train, heldout, {p.id: synthetic.target_response(synthetic.solve(p.question))
                            for p in train + heldout}
  if domain == rendered.ARITH_IMAGE_DOMAIN:
    train, heldout = rendered.arith_image_split(c.num_train, c.num_heldout, tuple(c.levels), seed,
                                                c.max_operand)
    worked = {p.id: synthetic.target_response(problem) for p, problem in train + heldout}
  else:
    layout = rendered.ChartLayout(max_value=c.chart_max_value, unit=c.chart_unit)
    train, heldout = rendered.chart_split(c.num_train, c.num_heldout, tuple(c.chart_levels), seed,
                                          c.num_bars, layout)
    worked = {p.id: chart.response() for p, chart in train + heldout}
  return [p for p, _ in train], [p for p, _ in heldout], worked


def _build_vision(task_config, data_config, seed: int) -> Task:
  """Prompts of every domain in `task_config.domains` (see the module docstring)."""
  _check_fractions(task_config, ("direct_answer_fraction",))
  domains = tuple(task_config.domains)
  unknown = [d for d in domains if d not in VISION_DOMAINS]
  if not domains or unknown or len(set(domains)) != len(domains):
    raise ValueError(f"config.task.domains={domains}: expected distinct names from "
                     f"{VISION_DOMAINS}")
  train, heldout, worked = [], [], {}
  for i, domain in enumerate(domains):
    domain_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
    domain_train, domain_heldout, domain_worked = _domain_split(task_config, domain, domain_seed)
    train += domain_train
    heldout += domain_heldout
    worked.update(domain_worked)
  direct = task_config.direct_answer_fraction
  return Task(train=train, heldout=heldout, reward_by_domain={d: task_config.reward for d in domains},
              template_by_domain={d: QUESTION for d in domains},
              weight_by_domain={d: 1.0 for d in domains}, charset=rendered.charset(),
              reference_response=lambda p: (f"{synthetic.ANSWER_MARKER}{p.answer}"
                                            if _is_direct(p, direct) else worked[p.id]))


TASK_BUILDERS = {"arith": _build_arith, "prompts": _build_prompts, "vision": _build_vision}


def build_task(task_config, data_config=None, *, seed: int) -> Task:
  """The task named by `task_config.name` (module docstring); `data_config` feeds "prompts"."""
  if task_config.name not in TASK_BUILDERS:
    raise ValueError(f"config.task.name={task_config.name!r}: one of {sorted(TASK_BUILDERS)}")
  return TASK_BUILDERS[task_config.name](task_config, data_config, seed)
