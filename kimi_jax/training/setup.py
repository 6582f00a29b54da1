"""Run set-up shared by every stage (RL, SFT, long2short, eval, sweeps): the task, tokenizer,
model config and mesh of a config; initial checkpoints; metric writers; the logging cadence."""
import dataclasses
import os
from typing import NamedTuple

from kimi_jax.checkpointing.hf import CheckpointError, config_diff, load_hf
from kimi_jax.data.tasks import Task, build_task
from kimi_jax.data.tokenizer import Tokenizer, char_tokenizer
from kimi_jax.metrics.writers import JsonlWriter, MultiWriter, TensorBoardWriter
from kimi_jax.model import ModelConfig
from kimi_jax.model.config import with_execution
from kimi_jax.sharding.rules import make_mesh


class Basics(NamedTuple):
  task: Task
  tokenizer: Tokenizer
  model_config: ModelConfig
  mesh: object  # jax.sharding.Mesh


def build_model_config(model_cfg, tokenizer) -> ModelConfig:
  """The `model` config section with the vocabulary rounded up to `vocab_multiple`."""
  fields = {k: v for k, v in model_cfg.items() if k != "vocab_multiple"}
  vocab = -(-tokenizer.vocab_size // model_cfg.vocab_multiple) * model_cfg.vocab_multiple
  return ModelConfig(vocab_size=vocab, bos_token_id=tokenizer.bos_id,
                     eos_token_id=tokenizer.eos_id, **fields)


def build_basics(config, workdir: str) -> Basics:
  """(task, tokenizer, model config, mesh) of a run; the tokenizer is saved in `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  task = build_task(config.task, config.seed)
  tokenizer = char_tokenizer(task.charset)
  tokenizer.save(os.path.join(workdir, "tokenizer"))
  return Basics(task, tokenizer, build_model_config(config.model, tokenizer),
                make_mesh(**config.mesh))


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
  """metrics.jsonl (cut after step `truncate_after` on resume), plus TensorBoard if enabled."""
  writers = [JsonlWriter(os.path.join(workdir, "metrics.jsonl"), truncate_after=truncate_after)]
  if config.metrics.tensorboard:
    writers.append(TensorBoardWriter(os.path.join(workdir, "tensorboard")))
  return MultiWriter(writers)


def every_or_final(step: int, every: int, last: int) -> bool:
  """True on every `every`-th step and on the last one (steps count from 1)."""
  return step % every == 0 or step == last
