"""DPO training: pair batches, reference log-probs computed once, the pure jitted `dpo_step`.

Batch layout (what `pair_batch` builds and `dpo_step` reads): 2B right-padded rows, rows [0, B)
the chosen responses and rows [B, 2B) the rejected ones, row b + B being the rejected partner of
row b. Keys `tokens`, `targets`, `loss_mask` [2B, T] (response-only mask) and `ref_logp_sum`
[2B], the response log-prob sums under the frozen reference. One forward pass scores both sides.
Each process builds only its own rows of the 2B (`multihost.process_rows`) and holds their
reference sums; the steps see the global batch.
"""
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from kimi_jax.sharding.processes import Processes, this_job
from kimi_jax.losses.preference import dpo_loss
from kimi_jax.losses.masking import sequence_logprob
from kimi_jax.model import ModelConfig
from kimi_jax.model.logprobs import token_logprobs
from kimi_jax.training import multihost
from kimi_jax.training.setup import every_or_final
from kimi_jax.training.steps import (apply_update, jit_eval, jit_step, keep_params,
                                     masked_token_logprobs)


def pair_batch(pairs: Sequence[tuple[list[int], list[int], list[int]]], seq_len: int,
               pad_id: int, processes: Processes | None = None) -> dict[str, np.ndarray]:
  """(prompt_ids, chosen_ids, rejected_ids) triples -> this process's rows (`processes`, by
  default this job's) of the [2B, seq_len] layout above. Every pair is checked on every
  process, so all fail alike.

  Position p predicts token p + 1, so a response token at index P + i is scored at P + i - 1.
  """
  if not pairs:
    raise ValueError("pairs: need at least one (prompt_ids, chosen_ids, rejected_ids) triple")
  sides = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
  for row, (prompt_ids, response_ids) in enumerate(sides):
    where = f"pair {row % len(pairs)} ({'chosen' if row < len(pairs) else 'rejected'})"
    if not prompt_ids or not response_ids:
      raise ValueError(f"{where}: prompt_ids and response ids must be non-empty")
    if len(prompt_ids) + len(response_ids) > seq_len + 1:
      raise ValueError(f"{where}: prompt+response has {len(prompt_ids) + len(response_ids)} "
                       f"tokens, more than seq_len+1={seq_len + 1}")
  own = sides[(processes or this_job()).rows(len(sides))]
  tokens = np.full((len(own), seq_len + 1), pad_id, np.int32)
  loss_mask = np.zeros((len(own), seq_len), np.float32)
  for row, (prompt_ids, response_ids) in enumerate(own):
    full = list(prompt_ids) + list(response_ids)
    tokens[row, :len(full)] = full
    loss_mask[row, len(prompt_ids) - 1:len(full) - 1] = 1.0
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": loss_mask}


def dpo_objective(params, batch, config: ModelConfig, beta, chosen_nll_weight=0.0):
  """DPO loss of `params` on one pair batch (layout above), plus `chosen_nll_weight` times the
  per-token NLL of the chosen responses (as in RPO, Pang et al. 2024: it keeps DPO from pushing
  the chosen responses' likelihood down together with the rejected ones)."""
  logp_2BxT, max_logits_LxH = token_logprobs(config, params, batch, return_max_logits=True)
  seq_logp_2B = sequence_logprob(logp_2BxT, batch["loss_mask"], length_normalize=False)
  policy_chosen_B, policy_rejected_B = jnp.split(seq_logp_2B, 2)
  ref_chosen_B, ref_rejected_B = jnp.split(batch["ref_logp_sum"], 2)
  loss, metrics = dpo_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B,
                           beta)
  chosen_tokens = jnp.split(batch["loss_mask"], 2)[0].sum()
  chosen_nll = -policy_chosen_B.sum() / jnp.maximum(chosen_tokens, 1.0)
  metrics.update(chosen_nll=chosen_nll, max_logits=max_logits_LxH)
  return loss + chosen_nll_weight * chosen_nll, metrics


def dpo_step(state, batch, config: ModelConfig, beta, chosen_nll_weight=0.0,
             post_update=keep_params):
  """One optimizer step on the DPO objective."""
  grads, metrics = jax.grad(dpo_objective, has_aux=True)(state.params, batch, config, beta,
                                                         chosen_nll_weight)
  return apply_update(state, grads, metrics, post_update)


def with_reference_logprobs(reference_state, shardings, mesh, config: ModelConfig,
                            batches: Sequence[dict]) -> list[dict]:
  """Copies of `batches` (this process's rows) with `ref_logp_sum` of those rows under
  `reference_state`'s params (run once)."""
  logprobs = jit_eval(masked_token_logprobs, mesh, shardings, config=config)
  return [{**batch, "ref_logp_sum": multihost.local_rows(logprobs(
      reference_state, multihost.global_from_rows(batch, logprobs.sharding))).sum(axis=-1)}
          for batch in batches]


def run_dpo(state, shardings, mesh, model_config: ModelConfig, batches: Sequence[dict], beta: float,
            num_steps: int, writer=None, log_every: int = 50, desc: str = "dpo",
            chosen_nll_weight: float = 0.0, post_update=keep_params):
  """`num_steps` DPO steps cycling through `batches` (this process's rows of pair batches,
  without `ref_logp_sum`).

  The reference is `state` as passed in (the SFT model): its log-prob sums are computed for
  every batch before the first update, so no second copy of the params stays in memory.
  Returns (state, last metrics). Progress is shown as a bar; metrics go to `writer`.
  """
  batches = with_reference_logprobs(state, shardings, mesh, model_config, batches)
  train_step = jit_step(dpo_step, mesh, shardings, config=model_config, beta=beta,
                        chosen_nll_weight=chosen_nll_weight, post_update=post_update)
  metrics = {}
  with tqdm(zip(range(1, num_steps + 1), itertools.cycle(batches)), total=num_steps, desc=desc,
            dynamic_ncols=True) as bar:
    for step, batch in bar:
      state, metrics = train_step(state, multihost.global_from_rows(batch, train_step.sharding))
      if every_or_final(step, log_every, num_steps):
        metrics = jax.device_get(metrics)
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}",
                        acc=f"{float(metrics['accuracy']):.2f}")
        if writer is not None:
          writer.write(step, {f"{desc}/{k}": v for k, v in metrics.items()})
  return state, jax.device_get(metrics)
