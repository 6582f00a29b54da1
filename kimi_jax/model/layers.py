"""Building blocks shared by the decoder: RMSNorm, rotary embeddings, SwiGLU MLP."""
import jax
import jax.numpy as jnp
from flax import linen as nn

from kimi_jax.sharding.rules import constrain


def _partitioned(init, logical_axes):
  return nn.with_logical_partitioning(init, logical_axes)


class RMSNorm(nn.Module):
  """HF-style RMSNorm: normalise in float32, scale after casting back."""

  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", _partitioned(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * normed.astype(self.dtype)


class Dense(nn.Module):
  """x @ kernel (+ bias) with a logically-partitioned (in, out) kernel."""

  features: int
  logical_axes: tuple[str, str]
  use_bias: bool
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", _partitioned(nn.initializers.normal(0.02), self.logical_axes),
                        (x.shape[-1], self.features), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", _partitioned(nn.initializers.zeros, self.logical_axes[1:]),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def rotary_embedding(x_BxTxHxA: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotate-half RoPE as in HF Llama/Qwen (first and second halves pair up)."""
  head_dim = x_BxTxHxA.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_BxTxHalf = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(angles_BxTxHalf)[:, :, None, :]
  sin = jnp.sin(angles_BxTxHalf)[:, :, None, :]
  x32 = x_BxTxHxA.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x_BxTxHxA.dtype)


class SwiGLU(nn.Module):
  intermediate_size: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxTxD):
    dense = lambda name, feats, axes: Dense(feats, axes, False, self.dtype, self.param_dtype, name=name)
    gate = dense("gate_proj", self.intermediate_size, ("embed", "mlp"))(x_BxTxD)
    up = dense("up_proj", self.intermediate_size, ("embed", "mlp"))(x_BxTxD)
    hidden_BxTxF = constrain(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return dense("down_proj", x_BxTxD.shape[-1], ("mlp", "embed"))(hidden_BxTxF)
