"""Supervised fine-tuning (vanilla and the long-CoT warm-up): the LM step over packed batches."""
import jax
from tqdm import tqdm

from kimi_jax.training.steps import jit_step, lm_step


def run_sft(state, shardings, mesh, model_config, batches, num_steps: int, writer=None,
            log_every: int = 50, desc: str = "sft"):
  """`num_steps` LM steps on `batches` (an iterator of packed numpy batches).

  Returns (state, last metrics). Progress is shown as a bar; metrics go to `writer`.
  """
  step = jit_step(lm_step, mesh, shardings, config=model_config)
  metrics = {}
  with tqdm(range(num_steps), desc=desc, dynamic_ncols=True) as bar:
    for i in bar:
      state, metrics = step(state, next(batches))
      if (i + 1) % log_every == 0 or i + 1 == num_steps:
        metrics = jax.device_get(metrics)
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
        if writer is not None:
          writer.write(i + 1, {f"{desc}/{k}": v for k, v in metrics.items()})
  return state, jax.device_get(metrics)
