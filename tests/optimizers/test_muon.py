"""Muon updates against optax.contrib.muon and a float64 numpy reference; routing."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec
from optax.contrib import MuonDimensionNumbers

from kimi_jax.optimizers import routing
from kimi_jax.optimizers.muon import muon
from tests.optimizers import trees

# optax.contrib.muon sees the momentum scaled by (1 - beta) / (1 - beta^t); NS normalises that
# away up to eps / ||M|| ~ 1e-9. Compared in float64, where NS's amplification of float32
# round-off in small singular directions (up to ~1e-4 on near-zero entries) does not blur it.
OPTAX_RTOL = 1e-5
# Entries near zero: a floor of 1e-9 of the leaf's largest entry.
NEAR_ZERO_FLOOR = 1e-9
# float64 end to end; the reference is a separate numpy implementation.
F64_RTOL = 1e-10


def _run(tx, params, grads_list):
  """Apply `tx` for each grads tree; return the list of update trees."""
  update = jax.jit(tx.update)
  state, out = tx.init(params), []
  for grads in grads_list:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


def test_equals_optax_contrib_muon_with_moonlight_settings(x64):
  stacked = MuonDimensionNumbers(reduction_axis=1, output_axis=2)
  params = {**trees.model_params(np.float64),
            "experts": {"kernel": jnp.asarray(np.random.default_rng(9).normal(size=(3, 16, 8)))}}
  grads_list = [trees.random_grads(params, seed) for seed in range(4)]
  lr, wd = 0.02, 0.1
  ours = muon(lr, weight_decay=wd, nesterov=False, eps=1e-8, adam_b2=0.999, adam_eps=1e-8,
              consistent_rms=0.2, ns_dtype="float64",
              dimension_numbers=functools.partial(routing.route_by_path, stacked=stacked))
  reference = optax.contrib.muon(
      lr, nesterov=False, eps=1e-8, weight_decay=wd, adam_weight_decay=wd, adam_b2=0.999,
      consistent_rms=0.2,
      muon_weight_dimension_numbers=routing.route_by_path(params, stacked=stacked))
  for step, (mine, theirs) in enumerate(zip(_run(ours, params, grads_list),
                                            _run(reference, params, grads_list))):
    for path, value in trees.flat(mine).items():
      expected = trees.flat(theirs)[path]
      np.testing.assert_allclose(value, expected, rtol=OPTAX_RTOL,
                                 atol=NEAR_ZERO_FLOOR * np.abs(expected).max(),
                                 err_msg=f"step {step} {path}")


def _ns_reference(g, steps=5, coeffs=(3.4445, -4.7750, 2.0315), eps=1e-7):
  a, b, c = coeffs
  x = g.T if g.shape[0] > g.shape[1] else g
  x = x / (np.linalg.norm(x) + eps)
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if g.shape[0] > g.shape[1] else x


def _reference_steps(params, grads_list, lr, wd, scaling, beta=0.95, b1=0.9, b2=0.95, eps=1e-8):
  """Muon (Moonlight scaling) written out in numpy: Nesterov Muon + AdamW, shared lr and wd."""
  params = {path: np.asarray(p, np.float64) for path, p in trees.flat(params).items()}
  moments = {path: [np.zeros_like(p), np.zeros_like(p)] for path, p in params.items()}
  for t, grads in enumerate(grads_list, start=1):
    for path, g in trees.flat(grads).items():
      w, m = params[path], moments[path]
      if trees.is_hidden_kernel(path):
        m[0] = beta * m[0] + g
        fan_in, fan_out = w.shape
        scale = (0.2 * np.sqrt(max(fan_in, fan_out)) if scaling == "moonlight"
                 else np.sqrt(max(1.0, fan_out / fan_in)))
        direction = scale * _ns_reference(beta * m[0] + g)
      else:
        m[0] = b1 * m[0] + (1 - b1) * g
        m[1] = b2 * m[1] + (1 - b2) * g * g
        m_hat, v_hat = m[0] / (1 - b1 ** t), m[1] / (1 - b2 ** t)
        direction = m_hat / (np.sqrt(v_hat) + eps)
      params[path] = w - lr * (direction + wd * w)
  return params


@pytest.mark.parametrize("scaling", ["moonlight", "keller_jordan"])
def test_nesterov_muon_and_adamw_match_float64_reference(scaling, x64):
  params = trees.model_params(np.float64)
  grads_list = [trees.random_grads(params, seed) for seed in range(3)]
  tx = muon(0.01, weight_decay=0.1, scaling=scaling, ns_dtype="float64")
  new_params = params
  for updates in _run(tx, params, grads_list):
    new_params = optax.apply_updates(new_params, updates)
  expected = _reference_steps(params, grads_list, lr=0.01, wd=0.1, scaling=scaling)
  for path, value in trees.flat(new_params).items():
    np.testing.assert_allclose(value, expected[path], rtol=F64_RTOL, atol=1e-12,
                               err_msg=str(path))


def test_zero_gradient_gives_pure_decoupled_weight_decay():
  params = trees.model_params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  lr, wd = 0.05, 0.1
  tx = muon(lr, weight_decay=wd)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  for path, value in trees.flat(updates).items():
    # NS(0) = 0 and Adam's 0 / (0 + eps) = 0: only -lr * wd * W is left, on every leaf.
    np.testing.assert_allclose(value, -lr * wd * trees.flat(params)[path], rtol=1e-6,
                               err_msg=str(path))


def test_schedule_is_evaluated_at_each_step():
  params = trees.model_params()
  grads_list = [trees.random_grads(params, seed) for seed in range(3)]
  schedule = optax.linear_schedule(0.1, 0.04, transition_steps=3)
  scheduled, constant = muon(schedule), muon(1.0)
  state_s, state_c = scheduled.init(params), constant.init(params)
  update_s, update_c = jax.jit(scheduled.update), jax.jit(constant.update)
  for step, grads in enumerate(grads_list):
    # Same params every step, so the update is linear in lr: u(schedule) = lr_t * u(lr=1).
    u_s, state_s = update_s(grads, state_s, params)
    u_c, state_c = update_c(grads, state_c, params)
    for path, value in trees.flat(u_s).items():
      np.testing.assert_allclose(value, schedule(step) * trees.flat(u_c)[path], rtol=1e-5,
                                 atol=1e-9, err_msg=f"step {step} {path}")


def test_default_routing_on_model_layout():
  labels = trees.flat(routing.labels(trees.model_params(), routing.route_by_path))
  for path, label in labels.items():
    assert label == ("muon" if trees.is_hidden_kernel(path) else "adam"), path
  assert labels[("embed_tokens", "embedding")] == labels[("lm_head", "kernel")] == "adam"


def test_logical_axis_routing_agrees_with_path_routing():
  by_axes = routing.route_by_logical_axes(trees.logical_specs())
  by_path = routing.route_by_path(trees.model_params())
  is_leaf = lambda x: x is None or isinstance(x, MuonDimensionNumbers)
  assert jax.tree.leaves(by_axes, is_leaf=is_leaf) == jax.tree.leaves(by_path, is_leaf=is_leaf)


def test_logical_axis_routing_of_scanned_layers():
  specs = {"mlp": {"kernel": PartitionSpec("embed", "layers", "mlp")},
           "norm": {"scale": PartitionSpec("layers", "norm")}}
  routed = routing.route_by_logical_axes(specs)
  assert routed["mlp"]["kernel"] == MuonDimensionNumbers(reduction_axis=0, output_axis=2)
  assert routed["norm"]["scale"] is None


def test_undeclared_stacked_weight_is_an_error_naming_it():
  params = {"layers": {"mlp": {"kernel": jnp.zeros((2, 4, 8))}}}
  with pytest.raises(ValueError, match="layers/mlp/kernel"):
    muon(0.1).init(params)


def test_user_routing_tree_overrides_default():
  params = trees.model_params()
  custom = routing.route_by_path(params)
  custom["layers_0"]["attn"]["q_proj"]["kernel"] = None  # q_proj -> AdamW
  tx = muon(0.1, dimension_numbers=custom)
  labels = trees.flat(routing.labels(params, custom))
  assert labels[("layers_0", "attn", "q_proj", "kernel")] == "adam"
  assert labels[("layers_0", "attn", "k_proj", "kernel")] == "muon"
  grads = trees.random_grads(params, 0)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  # An Adam first step moves every entry by ~lr (sign of the gradient); Muon does not.
  q0 = trees.flat(updates)[("layers_0", "attn", "q_proj", "kernel")]
  q0_grad = trees.flat(grads)[("layers_0", "attn", "q_proj", "kernel")]
  q0_params = trees.flat(params)[("layers_0", "attn", "q_proj", "kernel")]
  np.testing.assert_allclose(q0, -0.1 * (np.sign(q0_grad) + 0.1 * q0_params), rtol=1e-4)


def test_unknown_scaling_rejected():
  with pytest.raises(ValueError, match="scaling='spectral'"):
    muon(0.1, scaling="spectral")
