"""Internal consistency of the LM: attention paths, packing, max logits, sharded forward."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from kimi_jax.model import ModelConfig, apply_lm, init_params, param_logical_specs
from kimi_jax.model.attention import Attention
from kimi_jax.model.layers import matmul, rotary_embedding
from kimi_jax.model.transformer import Transformer, default_positions
from kimi_jax.sharding.rules import LOGICAL_RULES, activation_mesh, logical_shardings, make_mesh

# float32 throughout; different but mathematically equal summation orders stay within 1e-5.
ATOL = 1e-5
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, qkv_bias=True)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


def tokens(b=2, t=13, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


@pytest.mark.parametrize("block", [4, 5, 13, 64])
def test_blockwise_equals_dot_product(params, block):
  blockwise = dataclasses.replace(CFG, attention="blockwise", attention_block_size=block)
  np.testing.assert_allclose(apply_lm(blockwise, params, tokens()), apply_lm(CFG, params, tokens()),
                             atol=ATOL)


def test_blockwise_gradients_equal_dot_product(params):
  blockwise = dataclasses.replace(CFG, attention="blockwise", attention_block_size=4, remat=True)
  loss = lambda c: lambda p: apply_lm(c, p, tokens()).std()
  g_plain, g_block = jax.grad(loss(CFG))(params), jax.grad(loss(blockwise))(params)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_block)):
    np.testing.assert_allclose(a, b, atol=ATOL)


def test_packed_segments_do_not_see_each_other(params):
  a, b = tokens(1, 5, seed=2), tokens(1, 7, seed=3)
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.array([[1] * 5 + [2] * 7])
  positions = jnp.array([list(range(5)) + list(range(7))])
  logits = apply_lm(CFG, params, packed, positions, segments)
  np.testing.assert_allclose(logits[:, :5], apply_lm(CFG, params, a), atol=ATOL)
  np.testing.assert_allclose(logits[:, 5:], apply_lm(CFG, params, b), atol=ATOL)


def _reference_max_logits(config, params, toks):
  """Per-layer per-head max q.k/sqrt(d) with numpy, capturing q/k via Flax intermediates."""
  captured = {}

  def capture(next_fun, args, kwargs, context):
    if isinstance(context.module, Attention) and context.method_name == "__call__":
      captured[context.module.scope.path] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture):
    Transformer(config).apply({"params": params}, toks, default_positions(toks))
  out = []
  pos = np.arange(toks.shape[1])
  for i in range(config.num_layers):
    x = np.asarray(captured[(f"layers_{i}", "attn")], np.float64)
    p = params[f"layers_{i}"]["attn"]
    q = x @ np.asarray(p["q_proj"]["kernel"]) + np.asarray(p["q_proj"]["bias"])
    k = x @ np.asarray(p["k_proj"]["kernel"]) + np.asarray(p["k_proj"]["bias"])
    b, t = toks.shape
    h, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
    rope = lambda x, n: np.asarray(rotary_embedding(
        jnp.asarray(x.reshape(b, t, n, d), jnp.float32), default_positions(toks), config.rope_theta))
    q, k = rope(q, h), np.repeat(rope(k, kv), h // kv, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    s = np.where(pos[None, None, None, :] <= pos[None, None, :, None], s, -np.inf)
    out.append(s.max(axis=(0, 2, 3)))
  return np.stack(out)


def test_max_logits_match_numpy(params):
  toks = tokens()
  _, max_logits_LxH = apply_lm(CFG, params, toks, return_max_logits=True)
  assert max_logits_LxH.shape == (CFG.num_layers, CFG.num_heads)
  np.testing.assert_allclose(max_logits_LxH, _reference_max_logits(CFG, params, toks), atol=1e-4)


def test_sharded_forward_equals_unsharded_and_params_follow_rules(params):
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  shardings = logical_shardings(mesh, param_logical_specs(CFG))
  sharded = jax.device_put(params, shardings)
  rules = dict(LOGICAL_RULES)
  for path, spec in traverse_util.flatten_dict(param_logical_specs(CFG)).items():
    leaf = traverse_util.flatten_dict(sharded)[path]
    expected = tuple(rules[name] for name in spec)
    assert tuple(leaf.sharding.spec) == expected, path
    if "tensor" in expected:  # really split: each device holds a fraction
      assert leaf.addressable_shards[0].data.size < leaf.size, path

  def forward(p, t):
    with activation_mesh(mesh):
      return apply_lm(CFG, p, t)

  toks = tokens(b=4)
  out = jax.jit(forward)(sharded, toks)
  np.testing.assert_allclose(out, apply_lm(CFG, params, toks), atol=ATOL)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="num_kv_heads"):
    dataclasses.replace(CFG, num_kv_heads=3)
  with pytest.raises(ValueError, match="attention"):
    dataclasses.replace(CFG, attention="flash3")


def test_matmul_gradients_match_the_float64_closed_form():
  """d/dx sum(g * x @ w) = g w^T and d/dw = x^T g (x with two leading axes, as activations)."""
  rng = np.random.default_rng(4)
  x, w, g = rng.normal(size=(3, 5, 7)), rng.normal(size=(7, 4)), rng.normal(size=(3, 5, 4))
  dx, dw = jax.grad(lambda x, w: jnp.sum(jnp.asarray(g, jnp.float32) * matmul(x, w)),
                    argnums=(0, 1))(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(dx, g @ w.T, atol=ATOL)
  np.testing.assert_allclose(dw, np.einsum("bti,bto->io", x, g), atol=ATOL)
