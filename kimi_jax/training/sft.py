"""Supervised fine-tuning (vanilla and the long-CoT warm-up): the LM step over packed batches."""
import os

import jax
import optax
from tqdm import tqdm

from kimi_jax.data.packing import PackedBatches, example_from_ids
from kimi_jax.metrics.writers import JsonlWriter
from kimi_jax.training.setup import every_or_final
from kimi_jax.training.state import init_train_state, train_state_from_params
from kimi_jax.training.steps import jit_step, lm_step


def run_sft(state, shardings, mesh, model_config, batches, num_steps: int, writer=None,
            log_every: int = 50, desc: str = "sft"):
  """`num_steps` LM steps on `batches` (an iterator of packed numpy batches).

  Returns (state, last metrics). Progress is shown as a bar; metrics go to `writer`.
  """
  train_step = jit_step(lm_step, mesh, shardings, config=model_config)
  metrics = {}
  with tqdm(range(1, num_steps + 1), desc=desc, dynamic_ncols=True) as bar:
    for step in bar:
      state, metrics = train_step(state, next(batches))
      if every_or_final(step, log_every, num_steps):
        metrics = jax.device_get(metrics)
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
        if writer is not None:
          writer.write(step, {f"{desc}/{k}": v for k, v in metrics.items()})
  return state, jax.device_get(metrics)


def sft_optimizer(sft_config) -> optax.GradientTransformation:
  """AdamW with linear warm-up then cosine decay to a tenth (the `sft` config section)."""
  # max(): a stage of zero steps (only re-exporting, e.g. under a new RoPE theta) still builds.
  total_steps = max(sft_config.steps, sft_config.warmup_steps + 1)
  schedule = optax.warmup_cosine_decay_schedule(0.0, sft_config.learning_rate,
                                                sft_config.warmup_steps, total_steps,
                                                sft_config.learning_rate / 10)
  return optax.adamw(schedule, weight_decay=sft_config.weight_decay)


def fine_tune(sft_config, seed: int, batches, model_config, mesh, metrics_path: str,
              params=None, desc: str = "sft"):
  """`sft_config.steps` LM steps on the batch iterator `batches`, with `sft_optimizer`, from
  `params` or, when None, from a fresh init with `seed`. Returns the trained params; metrics go
  to the JSONL file at `metrics_path`."""
  tx = sft_optimizer(sft_config)
  if params is None:
    state, shardings = init_train_state(model_config, tx, mesh, jax.random.key(seed))
  else:
    state, shardings = train_state_from_params(model_config, tx, mesh, params)
  writer = JsonlWriter(metrics_path)
  state, _ = run_sft(state, shardings, mesh, model_config, batches, sft_config.steps, writer,
                     desc=desc)
  writer.close()
  return state.params


def sft_warmup(config, task, tokenizer, model_config, mesh, workdir: str, params=None):
  """Long-CoT SFT warm-up on the task's reference responses, from `params` or a fresh init;
  returns trained params. Its metrics go to sft_metrics.jsonl (their own step axis)."""
  if task.reference_response is None:
    raise ValueError(f"config.task.name={config.task.name!r} has no reference responses for the "
                     "SFT warm-up: set config.init.checkpoint to the model RL starts from")
  examples = [example_from_ids(tokenizer, task.encode_prompt(tokenizer, p),
                               task.reference_response(p)) for p in task.train]
  batches = iter(PackedBatches(examples, config.sft.batch_size, config.sft.seq_len,
                               tokenizer.pad_id, config.seed))
  return fine_tune(config.sft, config.seed, batches, model_config, mesh,
                   os.path.join(workdir, "sft_metrics.jsonl"), params)
