"""Supervised fine-tuning (vanilla and the long-CoT warm-up): the LM step over packed batches."""
import os

import jax
from tqdm import tqdm

from kimi_jax.data import images
from kimi_jax.data.image_batches import ImageExampleBatches, padded_patches
from kimi_jax.data.packing import PackedBatches, example_from_ids
from kimi_jax.metrics.writers import JsonlWriter, MultiWriter
from kimi_jax.training import multihost
from kimi_jax.training.optim import build_optimizer, build_post_update
from kimi_jax.training.setup import every_or_final
from kimi_jax.training.state import init_train_state, train_state_from_params
from kimi_jax.training.steps import jit_step, keep_params, lm_step


def run_sft(state, shardings, mesh, model_config, batches, num_steps: int, writer=None,
            log_every: int = 50, desc: str = "sft", post_update=keep_params):
  """`num_steps` LM steps on `batches` (an iterator of packed numpy batches, each holding this
  process's rows, `multihost.process_rows`, of the global batch).

  Returns (state, last metrics). Progress is shown as a bar; metrics go to `writer`.
  """
  train_step = jit_step(lm_step, mesh, shardings, config=model_config, post_update=post_update)
  metrics = {}
  with tqdm(range(1, num_steps + 1), desc=desc, dynamic_ncols=True) as bar:
    for step in bar:
      state, metrics = train_step(state, multihost.global_from_rows(next(batches),
                                                                    train_step.sharding))
      if every_or_final(step, log_every, num_steps):
        metrics = jax.device_get(metrics)
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
        if writer is not None:
          writer.write(step, {f"{desc}/{k}": v for k, v in metrics.items()})
  return state, jax.device_get(metrics)


def fine_tune(sft_config, seed: int, batches, model_config, mesh, metrics_path: str,
              params=None, desc: str = "sft", key: str = "sft.optimizer"):
  """`sft_config.steps` LM steps on the batch iterator `batches`, with the optimizer of
  `sft_config.optimizer`, from `params` or, when None, from a fresh init with `seed`. Returns the
  trained params; metrics go to the JSONL file at `metrics_path`."""
  tx = build_optimizer(sft_config.optimizer, sft_config.steps, key)
  if params is None:
    state, shardings = init_train_state(model_config, tx, mesh, jax.random.key(seed))
  else:
    state, shardings = train_state_from_params(model_config, tx, mesh, params)
  writer = JsonlWriter(metrics_path) if multihost.is_main_process() else MultiWriter([])
  state, _ = run_sft(state, shardings, mesh, model_config, batches, sft_config.steps, writer,
                     desc=desc, post_update=build_post_update(sft_config.optimizer))
  writer.close()
  return state.params


def check_examples_fit(examples, config) -> None:
  """Every SFT example fits one packed row of `config.sft.seq_len` (an example of n tokens
  takes n - 1 slots); otherwise an error naming the config keys that decide the lengths."""
  longest = max(range(len(examples)), key=lambda i: len(examples[i]))
  needed = len(examples[longest]) - 1
  if needed > config.sft.seq_len:
    raise ValueError(
        f"config.sft.seq_len={config.sft.seq_len} is too short for task "
        f"{config.task.name!r}: its longest SFT example (train prompt {longest}, "
        f"{len(examples[longest])} tokens) needs config.sft.seq_len >= {needed}. Raise "
        f"config.sft.seq_len, or make the task's examples shorter through config.task "
        f"({', '.join(sorted(config.task.keys()))})")


def sft_warmup(config, task, tokenizer, model_config, mesh, workdir: str, params=None):
  """Long-CoT SFT warm-up on the task's reference responses, from `params` or a fresh init;
  returns trained params. Its metrics go to sft_metrics.jsonl (their own step axis)."""
  if task.reference_response is None:
    raise ValueError(f"config.task.name={config.task.name!r} has no reference responses for the "
                     "SFT warm-up: set config.init.checkpoint to the model RL starts from")
  if task.has_images:
    batches = image_sft_batches(config, task, tokenizer, model_config)
  else:
    examples = [example_from_ids(tokenizer, task.encode_prompt(tokenizer, p),
                                 task.reference_response(p)) for p in task.train]
    check_examples_fit(examples, config)
    batches = iter(PackedBatches(examples, config.sft.batch_size, config.sft.seq_len,
                                 tokenizer.pad_id, config.seed))
  return fine_tune(config.sft, config.seed, batches, model_config, mesh,
                   os.path.join(workdir, "sft_metrics.jsonl"), params)


def image_sft_batches(config, task, tokenizer, model_config) -> ImageExampleBatches:
  """Unpacked SFT batches of the task's prompts (with their images) and references, this
  process's rows of each."""
  processing = images.run_image_processing(config)
  examples, num_patches = [], []
  for prompt in task.train:
    inputs = task.prompt_inputs(tokenizer, prompt, processing)
    examples.append(example_from_ids(tokenizer, inputs.ids, task.reference_response(prompt)))
    num_patches.append(len(inputs.images.pixel_values))
  check_examples_fit(examples, config)
  images_of = lambda i: (images.preprocess(task.train[i].images, processing)
                         if task.train[i].images else None)
  vision = model_config.vision
  return ImageExampleBatches(examples, images_of, vision, config.sft.batch_size,
                             config.sft.seq_len, padded_patches(num_patches, vision.merge_unit),
                             tokenizer.pad_id, config.seed)
