"""Pure, module-level step functions `(state, batch) -> (state, metrics)` and their jitting.

Static configuration (the ModelConfig, loss hyper-parameters) is bound with functools.partial
before jitting; nothing inside a step branches on configuration.
"""
import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from kimi_jax.model import ModelConfig, apply_lm
from kimi_jax.sharding.rules import activation_mesh, logical_to_spec


def token_logprobs(config: ModelConfig, params, batch) -> jax.Array:
  """log p(targets_BxT | prefix) under `params`, float32 [B, T]."""
  logits_BxTxV = apply_lm(config, params, batch["tokens"], batch.get("positions"),
                          batch.get("segment_ids"))
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  return jnp.take_along_axis(logp_BxTxV, batch["targets"][..., None], axis=-1)[..., 0]


def lm_loss(params, batch, config: ModelConfig):
  """Mean next-token cross-entropy over loss_mask_BxT."""
  logp_BxT = token_logprobs(config, params, batch)
  mask_BxT = batch["loss_mask"].astype(jnp.float32)
  num_tokens = jnp.maximum(mask_BxT.sum(), 1.0)
  loss = -(logp_BxT * mask_BxT).sum() / num_tokens
  return loss, {"loss": loss, "num_tokens": mask_BxT.sum()}


def lm_step(state, batch, config: ModelConfig):
  """One optimizer step on the LM cross-entropy."""
  grads, metrics = jax.grad(lm_loss, has_aux=True)(state.params, batch, config)
  metrics["grad_norm"] = optax.global_norm(grads)
  return state.apply_gradients(grads), metrics


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch-major arrays are split over (data, fsdp), everything else replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",)))


def jit_step(step_fn, mesh: Mesh, state_shardings, **static):
  """jit `step_fn(state, batch, **static)` with explicit shardings and state donation.

  Activations are pinned by the rules table while tracing (`activation_mesh`).
  """
  bound = functools.partial(step_fn, **static)

  def traced(state, batch):
    with activation_mesh(mesh):
      return bound(state, batch)

  return jax.jit(traced, in_shardings=(state_shardings, batch_sharding(mesh)),
                 out_shardings=(state_shardings, None), donate_argnums=0)
