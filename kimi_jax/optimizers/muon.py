"""Muon (momentum orthogonalised by Newton-Schulz) as optax GradientTransformations.

For a Muon matrix W with A input and B output features:

  M_t = beta M_{t-1} + g_t,   N_t = beta M_t + g_t (Nesterov) or M_t,   O_t = NS(N_t)
  W  <- W - lr (s O_t + wd W),   s = rms sqrt(max(A, B)) (Moonlight) or sqrt(max(1, B / A))

KellerJordan's `rows / cols` is B / A here because our kernels are (in, out), the transpose of
PyTorch's (out, in). Moonlight's s (rms = 0.2) matches AdamW's update RMS, so both groups share
one learning rate and weight decay. `muon` trains embeddings, lm_head, norms and biases with
AdamW (see `routing`).

The momentum is a plain sum (Moonlight, KellerJordan), not optax.contrib's bias-corrected
average. Without Nesterov the two agree (NS's normalisation removes the scale); with it,
optax's per-step bias corrections weight M_t against g_t differently in early steps.
"""
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kimi_jax.optimizers import routing as routing_lib

DEFAULT_NS_COEFFS = (3.4445, -4.7750, 2.0315)
SCALINGS = ("moonlight", "keller_jordan")


def newton_schulz(g, steps=5, coeffs=DEFAULT_NS_COEFFS, eps=1e-7):
  """Approximate polar factor U V^T of the 2-D `g` = U S V^T, computed in `g.dtype`.

  X0 = g / (||g||_F + eps) (transposed when tall, so Gram matrices are the small side), then
  `steps` times X <- aX + (bA + cA^2)X with A = X X^T. The default quintic pushes singular
  values into roughly [0.68, 1.2] in 5 steps rather than converging to 1.
  """
  if g.ndim != 2:
    raise ValueError(f"newton_schulz expects a matrix, got shape {g.shape}")
  a, b, c = (jnp.asarray(coeff, g.dtype) for coeff in coeffs)
  tall = g.shape[0] > g.shape[1]
  x = g.T if tall else g
  x = x / (jnp.linalg.norm(x) + eps)

  def iterate(_, x):
    gram = x @ x.T
    return a * x + (b * gram + c * (gram @ gram)) @ x

  x = jax.lax.fori_loop(0, steps, iterate, x, unroll=True)
  return x.T if tall else x


def _matrix_axes(shape, dims) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """(batch, reduction, output) axes of a parameter of `shape` under `dims`."""
  def normalise(axes):
    return tuple(ax % len(shape) for ax in ((axes,) if isinstance(axes, int) else axes))

  reduction, output = normalise(dims.reduction_axis), normalise(dims.output_axis)
  if not reduction or not output or set(reduction) & set(output):
    raise ValueError(f"dimension numbers {dims} for shape {shape}: reduction and output axes "
                     "must be non-empty and disjoint")
  batch = tuple(ax for ax in range(len(shape)) if ax not in reduction + output)
  return batch, reduction, output


def _size(shape, axes) -> int:
  return math.prod(shape[ax] for ax in axes)


def fan_in_out(shape, dims) -> tuple[int, int]:
  """(A, B): the product of the reduction axes and of the output axes."""
  _, reduction, output = _matrix_axes(shape, dims)
  return _size(shape, reduction), _size(shape, output)


def orthogonalize(update, dims, steps=5, coeffs=DEFAULT_NS_COEFFS, eps=1e-7, dtype="float32"):
  """Newton-Schulz on every (reduction x output) matrix of `update`, in `dtype`.

  Batch axes (those in neither group) index independent matrices. Returns `update.dtype`.
  """
  batch, reduction, output = _matrix_axes(update.shape, dims)
  fan_in, fan_out = _size(update.shape, reduction), _size(update.shape, output)
  order = batch + reduction + output
  moved = jnp.transpose(update, order).astype(dtype)
  if batch:  # plain matrices skip vmap: a batch-1 dot is ~40% slower on XLA:CPU
    flat = moved.reshape(-1, fan_in, fan_out)
    result = jax.vmap(lambda m: newton_schulz(m, steps, coeffs, eps))(flat)
  else:
    result = newton_schulz(moved.reshape(fan_in, fan_out), steps, coeffs, eps)
  inverse = tuple(order.index(ax) for ax in range(len(order)))
  return jnp.transpose(result.reshape(moved.shape), inverse).astype(update.dtype)


def orthogonalize_tree(updates, routing: dict, steps=5, coeffs=DEFAULT_NS_COEFFS, eps=1e-7,
                       dtype="float32"):
  """`orthogonalize` every leaf of `updates` along `routing[key path]` (see `leaf_routing`)."""
  def one(path, u):
    dims = routing[path]
    if dims is None:
      raise ValueError(f"parameter {routing_lib.path_name(path)!r} is routed to AdamW but "
                       "reached scale_by_muon")
    return orthogonalize(u, dims, steps, coeffs, eps, dtype)

  return jax.tree_util.tree_map_with_path(one, updates)


class ScaleByMuonState(NamedTuple):
  momentum: optax.Updates


def scale_by_muon(beta=0.95, nesterov: bool = True, ns_steps=5, ns_coeffs=DEFAULT_NS_COEFFS,
                  eps=1e-7, ns_dtype: str = "float32", mu_dtype: Any = None,
                  dimension_numbers: routing_lib.RoutingSpec = None
                  ) -> optax.GradientTransformation:
  """Orthogonalised (Nesterov) momentum, unscaled: returns NS(N_t) for every leaf.

  `dimension_numbers`: routing tree / callable (see `routing`); None treats every leaf as an
  (in, out) matrix. Momentum is kept in `mu_dtype` (default: the parameter dtype).
  """
  def init_fn(params):
    return ScaleByMuonState(momentum=optax.tree.zeros_like(params, dtype=mu_dtype))

  def update_fn(updates, state, params=None):
    del params
    routing = routing_lib.leaf_routing(updates, dimension_numbers)
    momentum = jax.tree.map(lambda m, g: (beta * m + g).astype(m.dtype), state.momentum, updates)
    direction = (jax.tree.map(lambda m, g: beta * m + g, momentum, updates) if nesterov
                 else momentum)
    orthogonal = orthogonalize_tree(direction, routing, ns_steps, ns_coeffs, eps, ns_dtype)
    orthogonal = jax.tree.map(lambda o, g: o.astype(g.dtype), orthogonal, updates)
    return orthogonal, ScaleByMuonState(momentum=momentum)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_shape(scaling: str = "moonlight", consistent_rms=0.2,
                   dimension_numbers: routing_lib.RoutingSpec = None
                   ) -> optax.GradientTransformation:
  """Multiply each Muon update by its shape factor: Moonlight `consistent_rms*sqrt(max(A, B))`
  or KellerJordan `sqrt(max(1, B / A))`, A/B = input/output features."""
  if scaling not in SCALINGS:
    raise ValueError(f"scaling={scaling!r}: expected one of {SCALINGS}")

  def factor(shape, dims):
    fan_in, fan_out = fan_in_out(shape, dims)
    if scaling == "moonlight":
      return consistent_rms * math.sqrt(max(fan_in, fan_out))
    return math.sqrt(max(1.0, fan_out / fan_in))

  def update_fn(updates, state, params=None):
    del params
    routing = routing_lib.leaf_routing(updates, dimension_numbers)
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, u: (factor(u.shape, routing[path]) * u).astype(u.dtype), updates)
    return scaled, state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def muon(learning_rate: optax.ScalarOrSchedule, weight_decay=0.1, *, beta=0.95,
         nesterov: bool = True, ns_steps=5, ns_coeffs=DEFAULT_NS_COEFFS, eps=1e-7,
         scaling: str = "moonlight", consistent_rms=0.2, adam_b1=0.9, adam_b2=0.95,
         adam_eps=1e-8, adam_learning_rate: optax.ScalarOrSchedule | None = None,
         adam_weight_decay=None, dimension_numbers: routing_lib.RoutingSpec = None,
         ns_dtype: str = "float32", mu_dtype: Any = None) -> optax.GradientTransformation:
  """Muon for hidden matrices, AdamW for the rest, as one `optax.partition`.

  Args:
    learning_rate: float or optax schedule, shared by both groups unless
      `adam_learning_rate` is given (KellerJordan setups use a separate, larger Muon lr).
    weight_decay: decoupled weight decay, W <- W - lr * wd * W, for both groups unless
      `adam_weight_decay` is given.
    dimension_numbers: routing tree or callable (see `routing`); default
      `routing.route_by_path` (embeddings, lm_head, norms, biases -> AdamW; 2-D -> Muon;
      rank > 2 must be declared). Under `optax.inject_hyperparams` a callable must be listed
      in `static_args`, and `ns_dtype`/`mu_dtype` given as strings.
    scaling: "moonlight" (`consistent_rms * sqrt(max(A, B))`) or "keller_jordan".
    Other arguments: see `scale_by_muon` and `optax.adamw`.
  """
  spec = routing_lib.route_by_path if dimension_numbers is None else dimension_numbers
  adam_learning_rate = learning_rate if adam_learning_rate is None else adam_learning_rate
  adam_weight_decay = weight_decay if adam_weight_decay is None else adam_weight_decay
  muon_chain = optax.chain(
      scale_by_muon(beta, nesterov, ns_steps, ns_coeffs, eps, ns_dtype, mu_dtype, spec),
      scale_by_shape(scaling, consistent_rms, spec),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
  adam = optax.adamw(adam_learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps,
                     weight_decay=adam_weight_decay, mu_dtype=mu_dtype)
  return optax.partition({"muon": muon_chain, "adam": adam},
                         lambda params: routing_lib.labels(params, spec))
