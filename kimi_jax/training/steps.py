"""Pure, module-level step functions `(state, batch) -> (state, metrics)` and their jitting.

Static configuration (the ModelConfig, loss hyper-parameters) is bound with functools.partial
before jitting; nothing inside a step branches on configuration.
"""
import functools
import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from kimi_jax.model import ModelConfig
from kimi_jax.model.logprobs import token_logprobs
from kimi_jax.sharding.rules import activation_mesh, logical_to_spec
from kimi_jax.training import multihost


def keep_params(params, max_logits_LxH):
  """The identity post-update (no QK-clip)."""
  del max_logits_LxH
  return params


def apply_update(state, grads, metrics, post_update=keep_params):
  """The ending every step shares (LM, RL, DPO, reward model): the gradient norm before
  clipping, the optimizer step (global-norm clipping included, `training.optim`), then
  `post_update(params, max_logits_LxH)` (QK-clip, Kimi K2) on the attention logits the loss's
  own forward pass measured, `metrics["max_logits"]` (replaced by its maximum)."""
  max_logits_LxH = metrics.pop("max_logits")
  metrics["grad_norm"] = optax.global_norm(grads)
  metrics["max_attention_logit"] = max_logits_LxH.max()
  state = state.apply_gradients(grads)
  return state.replace(params=post_update(state.params, max_logits_LxH)), metrics


def lm_loss(params, batch, config: ModelConfig):
  """Mean next-token cross-entropy over loss_mask_BxT."""
  logp_BxT, max_logits_LxH = token_logprobs(config, params, batch, return_max_logits=True)
  mask_BxT = batch["loss_mask"].astype(jnp.float32)
  num_tokens = jnp.maximum(mask_BxT.sum(), 1.0)
  loss = -(logp_BxT * mask_BxT).sum() / num_tokens
  return loss, {"loss": loss, "num_tokens": mask_BxT.sum(), "max_logits": max_logits_LxH}


def lm_step(state, batch, config: ModelConfig, post_update=keep_params):
  """One optimizer step on the LM cross-entropy."""
  grads, metrics = jax.grad(lm_loss, has_aux=True)(state.params, batch, config)
  return apply_update(state, grads, metrics, post_update)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch-major arrays are split over (data, fsdp), everything else replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",)))


def batch_shards(mesh: Mesh) -> int:
  """How many parts `batch_sharding` splits the batch axis into: every batch's row count must
  divide by it."""
  axes = batch_sharding(mesh).spec[0] or ()
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def _with_activation_mesh(fn, mesh: Mesh, static):
  bound = functools.partial(fn, **static)

  def traced(state, batch):
    with activation_mesh(mesh):
      return bound(state, batch)

  traced.__name__ = traced.__qualname__ = fn.__name__  # the program's name in profiles
  return traced


class GlobalBatchProgram:
  """A jitted `(state, batch, *rest)` program whose host batch (a dict of numpy arrays) enters
  as global arrays, each process contributing its own rows (`multihost.global_batch`)."""

  def __init__(self, jitted, mesh: Mesh):
    self.jitted, self.sharding = jitted, batch_sharding(mesh)

  def __call__(self, state, batch, *rest):
    return self.jitted(state, multihost.global_batch(batch, self.sharding), *rest)

  def lower(self, state, batch, *rest):
    return self.jitted.lower(state, multihost.global_batch(batch, self.sharding), *rest)


def jit_step(step_fn, mesh: Mesh, state_shardings, **static) -> GlobalBatchProgram:
  """jit `step_fn(state, batch, **static) -> (state, metrics)` with explicit shardings and
  state donation. Activations are pinned by the rules table while tracing."""
  return GlobalBatchProgram(jax.jit(_with_activation_mesh(step_fn, mesh, static),
                                    in_shardings=(state_shardings, batch_sharding(mesh)),
                                    out_shardings=(state_shardings, None), donate_argnums=0),
                            mesh)


def jit_eval(eval_fn, mesh: Mesh, state_shardings, **static) -> GlobalBatchProgram:
  """jit a read-only `eval_fn(state, batch, **static) -> outputs` (no donation)."""
  return GlobalBatchProgram(jax.jit(_with_activation_mesh(eval_fn, mesh, static),
                                    in_shardings=(state_shardings, batch_sharding(mesh))), mesh)


def rl_token_logprobs(config: ModelConfig, params, batch):
  """(per-token log-probs [B, T] of an RL minibatch's rows, max attention logits): the LM runs
  on the minibatch's token rows (packed: `rl_layout`) and `unpack_index` gathers the
  log-probs back to the rows of `loss_mask`."""
  logp_RxT, max_logits_LxH = token_logprobs(config, params, batch, return_max_logits=True)
  return logp_RxT.reshape(-1)[batch["unpack_index"]], max_logits_LxH


def masked_token_logprobs(state, batch, config: ModelConfig) -> jax.Array:
  """Loss-masked per-token log-probs under `state.params` [B, T] (DPO's reference)."""
  return token_logprobs(config, state.params, batch) * batch["loss_mask"]


def masked_rl_token_logprobs(state, batch, config: ModelConfig) -> jax.Array:
  """`masked_token_logprobs` of an RL minibatch's rows (token rows packed or not)."""
  return rl_token_logprobs(config, state.params, batch)[0] * batch["loss_mask"]


def rl_loss(params, batch, config: ModelConfig, policy_loss):
  """`policy_loss(logp_BxT, batch) -> (loss, metrics)`, e.g. the bound mirror-descent loss.
  The metrics also carry the masked per-token log-probs the loss saw, `logp_BxT`.

  Rows with `ref_is_own` set take these very log-probs (stop-gradient) as `ref_logp`: for a
  minibatch trained at pi_theta_i itself they are the reference, with no separate pass."""
  logp_BxT, max_logits_LxH = rl_token_logprobs(config, params, batch)
  masked_BxT = logp_BxT * batch["loss_mask"]
  ref_BxT = jnp.where(batch["ref_is_own"][:, None], jax.lax.stop_gradient(masked_BxT),
                      batch["ref_logp"])
  loss, metrics = policy_loss(logp_BxT, {**batch, "ref_logp": ref_BxT})
  return loss, {**metrics, "logp_BxT": masked_BxT, "max_logits": max_logits_LxH}


def rl_grads(state, batch, config: ModelConfig, policy_loss):
  """(grads, metrics) of the policy loss on one minibatch of whole prompt groups.

  Run at pi_theta_i before any update, its `logp_BxT` are the reference log-probs: the same
  program then computes the loss's own log-probs, so at the first update they are equal bit
  for bit and the tau term of the k1.5 loss is exactly inert there. The minibatch of the first
  update, run at pi_theta_i, is its own reference pass (`ref_is_own`).
  """
  return jax.grad(rl_loss, has_aux=True)(state.params, batch, config, policy_loss)


def apply_grads(state, grads, metrics, post_update=keep_params):
  """The optimizer step for `rl_grads`' output; drops the per-token `logp_BxT`."""
  metrics = {k: v for k, v in metrics.items() if k != "logp_BxT"}
  return apply_update(state, grads, metrics, post_update)


def jit_rl_programs(mesh: Mesh, state_shardings, config: ModelConfig, policy_loss,
                    post_update=keep_params):
  """(grads, apply): `rl_grads` jitted read-only, and `apply_grads` jitted with the state
  donated. An RL step is `apply(state, *grads(state, minibatch))`; keeping the
  gradient program separate lets S_ref come from that very program."""
  grads = GlobalBatchProgram(jax.jit(
      _with_activation_mesh(rl_grads, mesh, dict(config=config, policy_loss=policy_loss)),
      in_shardings=(state_shardings, batch_sharding(mesh)),
      out_shardings=(state_shardings.params, None)), mesh)

  def apply(state, grads, metrics):
    with activation_mesh(mesh):
      return apply_grads(state, grads, metrics, post_update)

  apply = jax.jit(apply, in_shardings=(state_shardings, state_shardings.params, None),
                  out_shardings=(state_shardings, None), donate_argnums=0)
  return grads, apply
