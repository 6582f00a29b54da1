"""QK-clip on a planted attention computation written here in numpy (no model package)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.optimizers.qk_clip import qk_clip

DIM, HEADS, HEAD_DIM, TOKENS = 8, 4, 4, 6
PLANTED = {0: 1, 1: 2}  # layer -> the head whose logits are blown up
# The clipped logit is tau up to float32 round-off in the weights and the float64 recompute.
LOGIT_RTOL = 1e-5


def _projection(rng, width, scale=0.3):
  return {"kernel": (scale * rng.normal(size=(DIM, width))).astype(np.float32),
          "bias": (scale * rng.normal(size=width)).astype(np.float32)}


def _planted_params(kv_heads: int):
  rng = np.random.default_rng(0)
  params = {"embed_tokens": {"embedding": rng.normal(size=(16, DIM)).astype(np.float32)}}
  for layer, head in PLANTED.items():
    attn = {"q_proj": _projection(rng, HEADS * HEAD_DIM),
            "k_proj": _projection(rng, kv_heads * HEAD_DIM),
            "v_proj": _projection(rng, kv_heads * HEAD_DIM),
            "o_proj": {"kernel": rng.normal(size=(HEADS * HEAD_DIM, DIM)).astype(np.float32)}}
    columns = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    attn["q_proj"]["kernel"][:, columns] *= 25.0
    params[f"layers_{layer}"] = {"attn": attn, "input_norm": {"scale": np.ones(DIM, np.float32)}}
  return params


def _max_logits_LxH(params, x_TxD):
  """Per layer and query head, the max causal q.k / sqrt(head_dim), in float64."""
  out = []
  for layer in range(len(PLANTED)):
    attn = params[f"layers_{layer}"]["attn"]
    project = lambda p: x_TxD @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"])
    q_TxHxD = project(attn["q_proj"]).reshape(TOKENS, HEADS, HEAD_DIM)
    k_TxKxD = project(attn["k_proj"]).reshape(TOKENS, -1, HEAD_DIM)
    group = HEADS // k_TxKxD.shape[1]
    causal_TxT = np.tril(np.ones((TOKENS, TOKENS), bool))
    per_head = []
    for h in range(HEADS):
      logits_TxT = q_TxHxD[:, h] @ k_TxKxD[:, h // group].T / np.sqrt(HEAD_DIM)
      per_head.append(logits_TxT[causal_TxT].max())
    out.append(per_head)
  return np.asarray(out)


@pytest.fixture
def x_TxD():
  return np.random.default_rng(1).normal(size=(TOKENS, DIM))


@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["mha", "gqa"])
def test_planted_heads_are_clipped_to_tau_and_others_untouched(kv_heads, x_TxD):
  params = _planted_params(kv_heads)
  before_LxH = _max_logits_LxH(params, x_TxD)
  planted = np.zeros_like(before_LxH, bool)
  for layer, head in PLANTED.items():
    planted[layer, head] = True
  tau = 2.0 * before_LxH[~planted].max()
  assert before_LxH[planted].min() > tau  # the plant really exceeds tau

  clipped = jax.jit(lambda p, m: qk_clip(p, m, tau))(params, jnp.asarray(before_LxH, jnp.float32))
  after_LxH = _max_logits_LxH(clipped, x_TxD)

  np.testing.assert_allclose(after_LxH[planted], tau, rtol=LOGIT_RTOL)
  assert np.all(after_LxH[planted] <= tau * (1 + LOGIT_RTOL))
  np.testing.assert_array_equal(after_LxH[~planted], before_LxH[~planted])
  for layer, head in PLANTED.items():
    old, new = params[f"layers_{layer}"]["attn"], clipped[f"layers_{layer}"]["attn"]
    gamma = tau / before_LxH[layer, head]
    q_cols = np.arange(HEADS * HEAD_DIM) // HEAD_DIM == head
    k_cols = np.arange(kv_heads * HEAD_DIM) // HEAD_DIM == head
    # MHA splits gamma evenly between q and k; GQA puts all of it on q (k heads are shared).
    q_factor, k_factor = (np.sqrt(gamma), np.sqrt(gamma)) if kv_heads == HEADS else (gamma, 1.0)
    for name, columns, factor in (("q_proj", q_cols, q_factor), ("k_proj", k_cols, k_factor)):
      for leaf in ("kernel", "bias"):
        old_w, new_w = old[name][leaf], np.asarray(new[name][leaf])
        np.testing.assert_array_equal(new_w[..., ~columns], old_w[..., ~columns])
        np.testing.assert_allclose(new_w[..., columns], factor * old_w[..., columns], rtol=1e-6)
    for name in ("v_proj", "o_proj"):
      for leaf in old[name]:
        np.testing.assert_array_equal(new[name][leaf], old[name][leaf])


def test_no_head_over_tau_leaves_params_bit_identical(x_TxD):
  params = _planted_params(HEADS)
  max_logits_LxH = _max_logits_LxH(params, x_TxD)
  clipped = qk_clip(params, jnp.asarray(max_logits_LxH, jnp.float32), 2 * max_logits_LxH.max())
  for old, new in zip(jax.tree.leaves(params), jax.tree.leaves(clipped)):
    np.testing.assert_array_equal(new, old)


def test_qk_norm_models_are_rejected():
  params = _planted_params(HEADS)
  params["layers_1"]["attn"]["q_norm"] = {"scale": np.ones(HEAD_DIM, np.float32)}
  with pytest.raises(ValueError, match="layers_1/attn has q/k RMSNorm"):
    qk_clip(params, jnp.ones((2, HEADS)), 100.0)


def test_layer_count_mismatch_is_rejected():
  with pytest.raises(ValueError, match="max_logits has 3 layers, params have 2"):
    qk_clip(_planted_params(HEADS), jnp.ones((3, HEADS)), 100.0)
