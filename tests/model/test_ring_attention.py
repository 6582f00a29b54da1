"""Ring attention (context parallelism over the mesh's `sequence` axis) against attention with
the whole sequence on one device, from the kernel up to the LM."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.model import ModelConfig, apply_lm, init_params, param_logical_specs
from kimi_jax.model.attention import causal_mask, dot_product_attention, ring_attention
from kimi_jax.sharding.rules import activation_mesh, logical_shardings, make_mesh

# float32; the ring merges per-chunk softmaxes by log-sum-exp, a different but mathematically
# equal summation order from one softmax over all keys: agreement to 1e-5.
ATOL = 1e-5
LENGTH = 4096
# Two packed documents whose boundary falls inside the second of four chunks.
BOUNDARY = 1500


def packed_positions_segments(b: int, t: int, boundary: int):
  positions = np.concatenate([np.arange(boundary), np.arange(t - boundary)])
  segments = np.concatenate([np.zeros(boundary, np.int32), np.ones(t - boundary, np.int32)])
  return (jnp.asarray(np.broadcast_to(positions, (b, t))),
          jnp.asarray(np.broadcast_to(segments, (b, t))))


@pytest.fixture(scope="module")
def qkv():
  b, h, kv, d = 1, 2, 1, 8  # tiny heads keep 4k tokens fast
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, LENGTH, h, d))
  k = jax.random.normal(keys[1], (b, LENGTH, kv, d))
  v = jax.random.normal(keys[2], (b, LENGTH, kv, d))
  d_out = jax.random.normal(keys[3], q.shape)
  return q, k, v, d_out


def test_ring_attention_on_4_devices_equals_unsharded_at_4k(qkv):
  """Forward and gradients for two packed causal documents."""
  q, k, v, d_out = qkv
  pos, seg = packed_positions_segments(1, LENGTH, BOUNDARY)
  mesh = make_mesh(1, 1, 1, sequence=4, devices=jax.devices()[:4])

  def ring(q, k, v):
    return ring_attention(mesh, q, k, v, pos, seg, 512, False)[0]

  def whole(q, k, v):  # jax.nn.dot_product_attention with the whole sequence on one device
    return dot_product_attention(q, k, v, causal_mask(pos, pos, seg, seg))

  out_ring, vjp_ring = jax.vjp(jax.jit(ring), q, k, v)
  out_whole, vjp_whole = jax.vjp(jax.jit(whole), q, k, v)
  assert len(out_ring.sharding.device_set) == 4
  np.testing.assert_allclose(out_ring, out_whole, atol=ATOL)
  for name, g_ring, g_whole in zip("qkv", vjp_ring(d_out), vjp_whole(d_out)):
    np.testing.assert_allclose(g_ring, g_whole, atol=ATOL, err_msg=f"d{name}")


CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                  num_kv_heads=2, head_dim=8, qkv_bias=True)


def test_lm_on_data_sequence_tensor_mesh_equals_one_device():
  """Logits, max logits and gradients of a packed batch with batch, sequence and heads all split
  (the one-device reference runs jax.nn.dot_product_attention)."""
  mesh = make_mesh(data=2, fsdp=1, tensor=2, sequence=2)
  params = init_params(CFG, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, CFG.vocab_size)
  pos, seg = packed_positions_segments(2, 48, 19)

  def loss(p, use_mesh):
    with activation_mesh(mesh if use_mesh else None):
      logits, max_LxH = apply_lm(CFG, p, tokens, pos, seg, return_max_logits=True)
    return logits.std(), (logits, max_LxH)

  sharded = jax.device_put(params, logical_shardings(mesh, param_logical_specs(CFG)))
  value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, (logits, max_LxH)), grads = value_and_grad(sharded, True)
  (_, (ref_logits, ref_max_LxH)), ref_grads = value_and_grad(params, False)
  np.testing.assert_allclose(logits, ref_logits, atol=ATOL)
  np.testing.assert_allclose(max_LxH, ref_max_LxH, rtol=1e-6)
  for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, ref, atol=ATOL)


def test_sequence_axis_of_the_mesh():
  mesh = make_mesh(data=1, fsdp=-1, tensor=1, sequence=4)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "sequence": 4, "tensor": 1}
  params = init_params(CFG, jax.random.key(0))
  with pytest.raises(ValueError, match="mesh.sequence=4"), activation_mesh(mesh):
    apply_lm(CFG, params, jnp.zeros((2, 10), jnp.int32))
