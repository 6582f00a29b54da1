"""Value-head reward model on our LM, and its training step.

Parameters are {"lm": <the LM's own tree, unchanged>, "value_head": {"kernel" [D], "bias" []}},
so an SFT checkpoint drops in under "lm" and the LM part can be exported again. Input: [BOS]
question [EOS] reference [EOS] response [EOS] (BOS only when the tokenizer has one),
right-padded. The score is sigmoid(kernel . h + bias), h the final-norm hidden state at the
closing EOS, the last non-pad token; causal attention makes padding after it irrelevant, and
its index is stored rather than searched for, so a pad id equal to EOS is fine. LM and head
train together on binary cross-entropy against a 0/1 correctness label. Hidden states come from
the LM's own forward through flax's `capture_intermediates`; XLA drops the unused unembedding,
which gets zero gradient (keep it out of weight decay to export it intact).
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kimi_jax.data.tokenizer import Tokenizer
from kimi_jax.model import ModelConfig, init_params, param_logical_specs
from kimi_jax.model.transformer import Transformer, default_positions
from kimi_jax.rewards.judge import RMExample
from kimi_jax.sharding.rules import logical_shardings
from kimi_jax.training.state import TrainState, mirror_param_shardings
from kimi_jax.training.steps import apply_update, batch_shards, jit_eval, keep_params

LM, VALUE_HEAD = "lm", "value_head"


def rm_input_ids(example: RMExample, tokenizer: Tokenizer) -> list[int]:
  """[BOS] question [EOS] reference [EOS] response [EOS]."""
  ids = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  for field in (example.question, example.reference, example.response):
    ids += tokenizer.encode(field) + [tokenizer.eos_id]
  return ids


def rm_batch(examples: Sequence[RMExample], tokenizer: Tokenizer, seq_len: int,
             labels: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
  """Examples -> `tokens` [B, seq_len] (right-padded), `last_index` [B] (last non-pad token),
  and with labels `labels` [B] float32 in {0, 1}."""
  if not examples:
    raise ValueError("examples: need at least one RMExample")
  if labels is not None and len(labels) != len(examples):
    raise ValueError(f"labels has {len(labels)} entries, examples has {len(examples)}")
  tokens = np.full((len(examples), seq_len), tokenizer.pad_id, np.int32)
  last_index = np.zeros(len(examples), np.int32)
  for row, example in enumerate(examples):
    ids = rm_input_ids(example, tokenizer)
    if len(ids) > seq_len:
      raise ValueError(f"example {row}: {len(ids)} tokens, more than seq_len={seq_len}")
    tokens[row, :len(ids)] = ids
    last_index[row] = len(ids) - 1
  batch = {"tokens": tokens, "last_index": last_index}
  if labels is not None:
    batch["labels"] = np.asarray(labels, np.float32)
  return batch


def final_hidden_states(config: ModelConfig, lm_params, tokens_BxT,
                        return_max_logits: bool = False):
  """The LM's final-norm output [B, T, D], from the LM's own forward pass (and the per-head
  max attention logits max_logits_LxH of that pass)."""
  (_, _, max_logits_LxH), captured = Transformer(config, return_max_logits).apply(
      {"params": lm_params}, tokens_BxT, default_positions(tokens_BxT),
      capture_intermediates=lambda module, _: module.name == "final_norm",
      mutable=["intermediates"])
  hidden_BxTxD = captured["intermediates"]["final_norm"]["__call__"][0]
  return (hidden_BxTxD, max_logits_LxH) if return_max_logits else hidden_BxTxD


def rm_logits(params, batch, config: ModelConfig, return_max_logits: bool = False):
  """Reward logits [B] read at `last_index`, float32 (and the LM's max_logits_LxH)."""
  out = final_hidden_states(config, params[LM], batch["tokens"], return_max_logits)
  hidden_BxTxD, max_logits_LxH = out if return_max_logits else (out, None)
  last_BxD = jnp.take_along_axis(hidden_BxTxD, batch["last_index"][:, None, None], axis=1)[:, 0]
  head = params[VALUE_HEAD]
  logits_B = last_BxD.astype(jnp.float32) @ head["kernel"].astype(jnp.float32) + head["bias"]
  return (logits_B, max_logits_LxH) if return_max_logits else logits_B


def rm_loss(params, batch, config: ModelConfig):
  """Mean binary cross-entropy of the reward logits against `labels`."""
  logits_B, max_logits_LxH = rm_logits(params, batch, config, return_max_logits=True)
  labels_B = batch["labels"]
  loss = optax.sigmoid_binary_cross_entropy(logits_B, labels_B).mean()
  accuracy = ((logits_B > 0) == (labels_B > 0.5)).mean()
  return loss, {"loss": loss, "accuracy": accuracy, "max_logits": max_logits_LxH}


def rm_step(state, batch, config: ModelConfig, post_update=keep_params):
  """One optimizer step on the reward-model cross-entropy; `post_update` (e.g. QK-clip) acts
  on the LM part of the parameters."""
  grads, metrics = jax.grad(rm_loss, has_aux=True)(state.params, batch, config)
  lm_post_update = lambda params, max_logits_LxH: {
      **params, LM: post_update(params[LM], max_logits_LxH)}
  return apply_update(state, grads, metrics, lm_post_update)


def rm_probabilities(state, batch, config: ModelConfig) -> jax.Array:
  """P(correct) [B] under `state.params`."""
  return jax.nn.sigmoid(rm_logits(state.params, batch, config))


def init_value_head(config: ModelConfig, rng: jax.Array) -> dict:
  """kernel ~ N(0, 1/D) (initial logits of order one), bias 0."""
  dtype = jnp.dtype(config.param_dtype)
  kernel = jax.random.normal(rng, (config.hidden_size,), dtype) / np.sqrt(config.hidden_size)
  return {"kernel": kernel, "bias": jnp.zeros((), dtype)}


def _create_rm_state(config: ModelConfig, tx: optax.GradientTransformation, lm_params,
                     rng) -> TrainState:
  params = {LM: lm_params, VALUE_HEAD: init_value_head(config, rng)}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), tx=tx)


def rm_state_shardings(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh):
  """NamedSharding tree of the RM TrainState: the LM's rules, the head kernel along `embed`."""
  specs = {LM: param_logical_specs(config),
           VALUE_HEAD: {"kernel": PartitionSpec("embed"), "bias": PartitionSpec()}}
  params_shardings = logical_shardings(mesh, specs)
  rng = jax.random.key(0)
  abstract = jax.eval_shape(lambda: _create_rm_state(config, tx, init_params(config, rng), rng))
  replicated = NamedSharding(mesh, PartitionSpec())
  return TrainState(
      step=replicated, params=params_shardings,
      opt_state=mirror_param_shardings(abstract.opt_state, abstract.params, params_shardings, mesh),
      tx=tx)


def init_rm_state(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, lm_params,
                  rng: jax.Array):
  """A sharded RM TrainState around `lm_params` (e.g. the SFT model's) and a fresh head.

  Returns (state, shardings).
  """
  shardings = rm_state_shardings(config, tx, mesh)
  create = lambda lm, key: _create_rm_state(config, tx, lm, key)
  state = jax.jit(create, out_shardings=shardings)(lm_params, rng)
  return state, shardings


class ValueHeadRewardModel:
  """Batch scoring with a trained value-head RM: `score(examples)` -> P(correct) per example."""

  def __init__(self, state: TrainState, shardings: TrainState, mesh: Mesh, config: ModelConfig,
               tokenizer: Tokenizer, seq_len: int, batch_size: int):
    shards = batch_shards(mesh)
    if batch_size % shards:
      raise ValueError(f"batch_size={batch_size} must be a multiple of data*fsdp={shards}")
    self.state, self.tokenizer = state, tokenizer
    self.seq_len, self.batch_size = seq_len, batch_size
    self._probabilities = jit_eval(rm_probabilities, mesh, shardings, config=config)

  def score(self, examples: Sequence[RMExample]) -> np.ndarray:
    """P(correct) float32 [len(examples)], in fixed-size batches (the last one padded)."""
    scores = []
    for start in range(0, len(examples), self.batch_size):
      chunk = list(examples[start:start + self.batch_size])
      padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
      batch = rm_batch(padded, self.tokenizer, self.seq_len)
      scores.append(np.asarray(self._probabilities(self.state, batch))[:len(chunk)])
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)
