"""A tiny Qwen2-style LM and independent numpy references for the rollout tests."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.model import ModelConfig, apply_lm, init_params

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, qkv_bias=True, eos_token_id=2)
EOS = 2
# With the default 0.02 init every next-token distribution is nearly uniform, which would let a
# sampler that ignores the logits pass; a scaled lm_head gives top probabilities of ~0.1-0.5.
LM_HEAD_SCALE = 12.0


def peaked_params(seed: int):
  params = init_params(CFG, jax.random.key(seed))
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * LM_HEAD_SCALE
  return params


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, tokens_NxS):
  return apply_lm(config, params, tokens_NxS)


def teacher_forced_logits(params, sequences, length: int) -> list[np.ndarray]:
  """Full-forward logits (float64) of each sequence, right-padded to `length` (one compile)."""
  tokens = np.zeros((len(sequences), length), np.int32)
  for i, seq in enumerate(sequences):
    tokens[i, :len(seq)] = seq
  logits = np.asarray(_forward(CFG, params, jnp.asarray(tokens)), np.float64)
  return [logits[i, :len(seq)] for i, seq in enumerate(sequences)]


def log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def is_loop(output_ids, ngram: int, count: int) -> bool:
  """Last ngram*count outputs periodic with some period <= ngram."""
  window = ngram * count
  if ngram == 0 or len(output_ids) < window:
    return False
  w = np.asarray(output_ids[-window:])
  return any(np.all(w[p:] == w[:-p]) for p in range(1, ngram + 1))


def greedy_reference(params, prompts, max_new, stop_sets, ngram, count, max_seq_len):
  """Step-by-step greedy decoding with the full forward: (outputs, logprobs, finish reasons).

  `max_new` and `stop_sets` hold one entry per prompt.
  """
  seqs = [list(p) for p in prompts]
  outputs, logprobs = [[] for _ in prompts], [[] for _ in prompts]
  reasons = [None] * len(prompts)
  while any(r is None for r in reasons):
    logits = teacher_forced_logits(params, seqs, max_seq_len)
    for i, reason in enumerate(reasons):
      if reason is not None:
        continue
      logp = log_softmax(logits[i][-1])
      token = int(np.argmax(logp))
      seqs[i].append(token)
      outputs[i].append(token)
      logprobs[i].append(logp[token])
      if token in stop_sets[i]:
        reasons[i] = {"type": "stop", "matched": token}
      elif is_loop(outputs[i], ngram, count):
        reasons[i] = {"type": "stop", "matched": "repetition"}
      elif len(outputs[i]) == max_new[i] or len(seqs[i]) == max_seq_len:
        reasons[i] = {"type": "length", "length": len(outputs[i])}
  return outputs, logprobs, reasons


def kept_set(logits_V, temperature, top_p, top_k, min_p) -> set[int]:
  """SGLang's filter in float64: rank < top_k, mass before <= top_p, p >= min_p * p_max."""
  probs = np.exp(log_softmax(logits_V / temperature))
  order = np.argsort(-probs)
  sorted_p = probs[order]
  before = np.cumsum(sorted_p) - sorted_p
  rank = np.arange(len(probs))
  keep = (before <= top_p) & (sorted_p >= min_p * sorted_p[0])
  if top_k > 0:
    keep &= rank < top_k
  return set(order[keep].tolist())


def penalized(logits_V, output_ids, repetition, frequency, presence, suppress=()):
  """SGLang's penalties in float64: repetition on tokens seen in the output (divide positive
  logits, multiply negative ones), then frequency * count and presence * seen subtracted;
  `suppress` ids get -inf."""
  counts = np.bincount(np.asarray(output_ids, np.int64), minlength=len(logits_V))
  seen = counts > 0
  logits = np.where(seen & (logits_V > 0), logits_V / repetition, logits_V)
  logits = np.where(seen & (logits_V <= 0), logits_V * repetition, logits)
  logits = logits - frequency * counts - presence * seen
  logits[list(suppress)] = -np.inf
  return logits


def greedy_penalized_reference(params, prompt, max_new, stop_ids, repetition=1.0, frequency=0.0,
                               presence=0.0, min_new=0, max_seq_len=256):
  """One prompt decoded greedily with penalties and min_new_tokens: (outputs, logprobs, reason)."""
  seq, outputs, logprobs = list(prompt), [], []
  while True:
    logits = teacher_forced_logits(params, [seq], max_seq_len)[0][-1]
    suppress = stop_ids if len(outputs) < min_new else ()
    logp = log_softmax(penalized(logits, outputs, repetition, frequency, presence, suppress))
    token = int(np.argmax(logp))
    seq.append(token)
    outputs.append(token)
    logprobs.append(logp[token])
    if token in stop_ids:
      return outputs, logprobs, {"type": "stop", "matched": token}
    if len(outputs) == max_new:
      return outputs, logprobs, {"type": "length", "length": max_new}
