"""Run set-up shared by every stage (RL, SFT, long2short, eval, sweeps): the sections a stage
sees, config validation naming the dotted key, the task, tokenizer, model config and mesh of a
config; initial checkpoints; metric writers; the logging cadence.

A run that starts from an HF checkpoint (`init.checkpoint`) takes the model config AND the
tokenizer (with its chat template and eos ids) from that directory; the `model` section then
only says how to run it (dtype, attention, remat) and which `init.changed_fields` it changes
(e.g. rope_theta for a long-context stage). A fresh init builds the model from `model` around
the task's char tokenizer.
"""
import dataclasses
import numbers
import os
from typing import NamedTuple, Sequence

import ml_collections

from kimi_jax.checkpointing.hf import CheckpointError, config_diff, load_hf, load_hf_config
from kimi_jax.data.image_prompts import add_vision_tokens, vision_token_ids
from kimi_jax.data.tasks import Task, build_task
from kimi_jax.data.tokenizer import TOKENIZER_FILE, Tokenizer, char_tokenizer, load_tokenizer
from kimi_jax.metrics.writers import JsonlWriter, MultiWriter, TensorBoardWriter
from kimi_jax.model import ModelConfig, VisionConfig
from kimi_jax.model.config import with_execution
from kimi_jax.sharding.rules import make_mesh
from kimi_jax.training import multihost


# Sections every stage reads through `build_basics`, and those a config may leave out
# (`images`: Qwen2-VL's preprocessing defaults apply without it; `data`: the prompt files of
# the task registry's "prompts" task, absent for synthetic tasks).
BASIC_SECTIONS = ("seed", "task", "model", "mesh", "metrics")
OPTIONAL_SECTIONS = ("images", "data")


def stage_config(config, sections: Sequence[str], stage: str) -> ml_collections.ConfigDict:
  """The sections of `config` that `stage` reads (plus the OPTIONAL_SECTIONS it has), and
  nothing else: a stage that reaches for another stage's section fails by name instead of
  silently depending on it."""
  missing = [s for s in sections if s not in config]
  if missing:
    raise ValueError(f"{stage}: the config has no section(s) {missing}")
  resolved = config.copy_and_resolve_references()
  kept = list(sections) + [s for s in OPTIONAL_SECTIONS if s in config]
  view = ml_collections.ConfigDict({s: resolved[s] for s in kept})
  view.lock()
  return view


def lookup(config, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def check(config, checks) -> None:
  """Fail at start on the first (dotted key, ok, why) whose `ok` is false, naming the key, its
  value and why, rather than deep inside a run."""
  for key, ok, why in checks:
    if not ok:
      raise ValueError(f"config.{key}={lookup(config, key)!r}: {why}")


def is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def eval_checks(config):
  """The `eval` section, as `evaluate_with_config` reads it."""
  e = config.eval
  yield ("eval.max_new_tokens", is_int(e.max_new_tokens) and e.max_new_tokens >= 1,
         "must be an int >= 1")
  yield ("eval.samples", is_int(e.samples) and e.samples >= 1, "must be an int >= 1")
  yield ("eval.k", is_int(e.k) and 1 <= e.k <= e.samples, "must be an int in [1, eval.samples]")
  yield ("eval.temperature", is_number(e.temperature) and e.temperature >= 0
         and (e.samples == 1 or e.temperature > 0), "must be >= 0, and > 0 when eval.samples > 1")


class Basics(NamedTuple):
  task: Task
  tokenizer: Tokenizer
  model_config: ModelConfig
  mesh: object  # jax.sharding.Mesh


def build_model_config(model_cfg, tokenizer) -> ModelConfig:
  """The `model` config section with the vocabulary rounded up to `vocab_multiple`; a `vision`
  subsection becomes the vision tower, with the tokenizer's vision token ids."""
  fields = {k: v for k, v in model_cfg.items() if k not in ("vocab_multiple", "vision")}
  vocab = -(-tokenizer.vocab_size // model_cfg.vocab_multiple) * model_cfg.vocab_multiple
  if model_cfg.get("vision") is not None:
    ids = vision_token_ids(tokenizer)
    fields["vision"] = VisionConfig(**model_cfg.vision.to_dict(), image_token_id=ids.image_pad,
                                    vision_start_token_id=ids.vision_start,
                                    vision_end_token_id=ids.vision_end)
  return ModelConfig(vocab_size=vocab, bos_token_id=tokenizer.bos_id,
                     eos_token_id=tokenizer.eos_id, **fields)


def checkpoint_model_config(path: str, model_cfg, changed_fields=()) -> ModelConfig:
  """The checkpoint's model config, run as `model_cfg` says, with `changed_fields` from it.

  Architecture fields that `model_cfg` also names must agree with the checkpoint outside
  `changed_fields`: a config that asks for another model is refused, not silently ignored."""
  loaded = with_execution(load_hf_config(path), model_cfg)
  named = {f.name for f in dataclasses.fields(loaded)} & set(model_cfg) - set(changed_fields)
  differing = sorted(f for f in named if model_cfg[f] != getattr(loaded, f))
  if differing:
    raise CheckpointError(f"config.init.checkpoint={path!r}: its model config differs from "
                          f"config.model in {differing} (allowed to differ: "
                          f"{tuple(changed_fields)})")
  return dataclasses.replace(loaded, **{f: model_cfg[f] for f in changed_fields})


def build_tokenizer(config, task: Task) -> Tokenizer:
  """The init checkpoint's tokenizer, else the task's char tokenizer (with the vision tokens
  when its prompts carry images)."""
  checkpoint = config.init.checkpoint
  if checkpoint and os.path.exists(os.path.join(checkpoint, TOKENIZER_FILE)):
    return load_tokenizer(checkpoint)
  if task.charset is None:
    where = (f"config.init.checkpoint={checkpoint!r} has no {TOKENIZER_FILE}" if checkpoint
             else "config.init.checkpoint is not set")
    raise ValueError(f"config.task.name={config.task.name!r} needs the tokenizer of the model "
                     f"it trains, but {where}")
  tokenizer = char_tokenizer(task.charset)
  return add_vision_tokens(tokenizer) if task.has_images else tokenizer


def build_basics(config, workdir: str) -> Basics:
  """(task, tokenizer, model config, mesh) of a run; the tokenizer is saved in `workdir` (by
  process 0)."""
  os.makedirs(workdir, exist_ok=True)
  task = build_task(config.task, config.get("data"), seed=config.seed)
  tokenizer = build_tokenizer(config, task)
  if multihost.is_main_process():
    tokenizer.save(os.path.join(workdir, "tokenizer"))
  if config.init.checkpoint:
    model_config = checkpoint_model_config(config.init.checkpoint, config.model,
                                           config.init.changed_fields)
  else:
    model_config = build_model_config(config.model, tokenizer)
  return Basics(task, tokenizer, model_config, make_mesh(**config.mesh))


def load_initial_checkpoint(path: str, model_config: ModelConfig, changed_fields=(),
                            key: str = "init.checkpoint"):
  """Params of the HF checkpoint at `path` (the config field `key`), whose model config must
  equal the run's except in `changed_fields` (e.g. ("rope_theta",) when a long-context stage
  raises the RoPE base)."""
  loaded_config, params = load_hf(path)
  loaded_config = with_execution(loaded_config, dataclasses.asdict(model_config))
  unexpected = [f for f in config_diff(loaded_config, model_config) if f not in changed_fields]
  if unexpected:
    raise CheckpointError(f"config.{key}={path!r}: its model config differs from config.model "
                          f"in {unexpected} (allowed to differ: {tuple(changed_fields)})")
  return params


def build_writer(config, workdir: str, truncate_after: int | None = None) -> MultiWriter:
  """metrics.jsonl (cut after step `truncate_after` on resume), plus TensorBoard if enabled;
  on processes other than 0 of a multi-process run, a writer that writes nothing."""
  if not multihost.is_main_process():
    return MultiWriter([])
  writers = [JsonlWriter(os.path.join(workdir, "metrics.jsonl"), truncate_after=truncate_after)]
  if config.metrics.tensorboard:
    writers.append(TensorBoardWriter(os.path.join(workdir, "tensorboard")))
  return MultiWriter(writers)


def every_or_final(step: int, every: int, last: int) -> bool:
  """True on every `every`-th step and on the last one (steps count from 1)."""
  return step % every == 0 or step == last
