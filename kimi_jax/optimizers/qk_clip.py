"""QK-clip (Kimi K2): rescale W_q / W_k of heads whose attention logits grew past tau.

Applied to the parameters after the optimizer update, with the max logits the model reported
in that step's forward pass. Per layer l and query head h, gamma = min(1, tau / S_max[l, h]).

- MHA (num_kv_heads == num_heads): q head h and k head h columns (and biases) are scaled by
  sqrt(gamma) each, so the logit q.k scales by gamma.
- GQA (num_kv_heads < num_heads): a k head is shared by several q heads, so scaling it would
  change heads that did not exceed tau. The whole gamma goes to q head h's columns and bias;
  W_k is left untouched.

RoPE is linear, so scaling the projections scales the post-RoPE logit by the same factor.
Models with q/k RMSNorm (Qwen3) are rejected: the norm removes any scale put on W_q / W_k.

Parameter layout (kimi_jax.model): params['layers_{i}']['attn'][q_proj|k_proj]['kernel'] of
shape [D, heads * head_dim], optional ['bias'] of shape [heads * head_dim]; head h occupies
columns [h * head_dim, (h + 1) * head_dim).
"""
import jax.numpy as jnp


def _scale_columns(projection: dict, factor_H, head_dim: int) -> dict:
  """Multiply each head's columns of a {kernel[, bias]} projection by factor_H[head]."""
  factor_cols = jnp.repeat(factor_H, head_dim)
  return {name: w * factor_cols.astype(w.dtype) for name, w in projection.items()}


def qk_clip(params: dict, max_logits_LxH, tau: float) -> dict:
  """Params with W_q (and, under MHA, W_k) clipped per head so logits stay <= tau.

  `max_logits_LxH`: per layer, per query head, the max scaled q.k logit of the forward pass
  (the model's `return_max_logits` output). Heads with S_max <= tau are left bit-identical.
  """
  num_layers, num_heads = max_logits_LxH.shape
  layer_names = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k[7:]))
  if len(layer_names) != num_layers:
    raise ValueError(f"max_logits has {num_layers} layers, params have {len(layer_names)}")
  if tau <= 0:
    raise ValueError(f"tau={tau}: must be positive")
  new_params = dict(params)
  for layer, name in enumerate(layer_names):
    attn = params[name]["attn"]
    if "q_norm" in attn or "k_norm" in attn:
      raise ValueError(f"{name}/attn has q/k RMSNorm: QK-clip through W_q/W_k has no effect "
                       "there (the norm removes the scale)")
    q_width, k_width = attn["q_proj"]["kernel"].shape[1], attn["k_proj"]["kernel"].shape[1]
    if q_width % num_heads:
      raise ValueError(f"{name}/attn/q_proj width {q_width} is not a multiple of "
                       f"num_heads={num_heads} (from max_logits)")
    head_dim = q_width // num_heads
    num_kv_heads = k_width // head_dim
    max_logits_H = max_logits_LxH[layer].astype(jnp.float32)
    gamma_H = jnp.where(max_logits_H > tau, tau / max_logits_H, 1.0)
    new_attn = dict(attn)
    if num_kv_heads == num_heads:
      new_attn["q_proj"] = _scale_columns(attn["q_proj"], jnp.sqrt(gamma_H), head_dim)
      new_attn["k_proj"] = _scale_columns(attn["k_proj"], jnp.sqrt(gamma_H), head_dim)
    else:
      new_attn["q_proj"] = _scale_columns(attn["q_proj"], gamma_H, head_dim)
    new_params[name] = {**params[name], "attn": new_attn}
  return new_params
