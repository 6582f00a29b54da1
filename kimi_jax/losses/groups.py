"""Per-prompt-group statistics of a flat batch, jittable.

A batch holds B samples; `group_ids_B` names the prompt group of each. Ids must be integers in
[0, B) (e.g. 0..G-1 for G groups in a minibatch); groups may have different sizes and need not
be contiguous. Reductions use `jax.ops.segment_*` with the static segment count B, so shapes
never depend on the data and one compilation serves every grouping of a B-row batch.
"""
import jax
import jax.numpy as jnp


def _segment_count(group_ids_B: jax.Array) -> int:
  return group_ids_B.shape[0]


def group_sizes(group_ids_B: jax.Array) -> jax.Array:
  """Size of each sample's group, [B]."""
  n = _segment_count(group_ids_B)
  sizes_G = jax.ops.segment_sum(jnp.ones(n), group_ids_B, num_segments=n)
  return sizes_G[group_ids_B]


def group_mean(values_B: jax.Array, group_ids_B: jax.Array) -> jax.Array:
  """Mean of `values_B` over each sample's group, broadcast back to [B]."""
  n = _segment_count(group_ids_B)
  sums_G = jax.ops.segment_sum(values_B, group_ids_B, num_segments=n)
  return sums_G[group_ids_B] / group_sizes(group_ids_B).astype(values_B.dtype)


def group_std(values_B: jax.Array, group_ids_B: jax.Array) -> jax.Array:
  """Population standard deviation (ddof=0) over each sample's group, [B]."""
  centered_B = values_B - group_mean(values_B, group_ids_B)
  return jnp.sqrt(group_mean(centered_B**2, group_ids_B))


def group_log_mean_exp(values_B: jax.Array, group_ids_B: jax.Array, temperature) -> jax.Array:
  """temperature * log(mean_{j in group} exp(values_j / temperature)), [B], stable for small
  temperatures (the group max is factored out before exponentiating)."""
  n = _segment_count(group_ids_B)
  scaled_B = values_B / temperature
  max_G = jax.ops.segment_max(scaled_B, group_ids_B, num_segments=n)
  max_B = max_G[group_ids_B]
  sum_exp_G = jax.ops.segment_sum(jnp.exp(scaled_B - max_B), group_ids_B, num_segments=n)
  log_mean_B = max_B + jnp.log(sum_exp_G[group_ids_B] / group_sizes(group_ids_B))
  return temperature * log_mean_B
