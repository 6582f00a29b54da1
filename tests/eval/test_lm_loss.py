"""Held-out loss by position: bucket arithmetic, and packed rows equal each document run alone."""
import jax
import numpy as np
import pytest

from kimi_jax.eval.lm_loss import heldout_loss_by_position, loss_by_position
from kimi_jax.model import ModelConfig, apply_lm, init_params

CFG = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)


def test_loss_by_position_buckets():
  logp = np.log(np.array([[0.5, 0.25, 0.125, 1.0]]))
  mask = np.array([[1, 1, 1, 0]])
  positions = np.array([[0, 1, 2, 3]])
  out = loss_by_position(logp, mask, positions, (0, 1, 3, 10))
  assert out["loss_pos0-1"] == pytest.approx(np.log(2))
  assert out["loss_pos1-3"] == pytest.approx((np.log(4) + np.log(8)) / 2)
  assert "loss_pos3-10" not in out  # its only token is masked


def test_heldout_rows_equal_documents_run_alone():
  params = init_params(CFG, jax.random.key(0))
  rng = np.random.default_rng(1)
  docs = [list(rng.integers(0, 30, size=n)) for n in (5, 11, 20)]
  eos, pad, seq_len, edges = 31, 0, 16, (0, 4, 16)
  got = heldout_loss_by_position(CFG, params, docs, eos, pad, seq_len, edges)
  losses = {edge: [] for edge in zip(edges[:-1], edges[1:])}
  for doc in docs:
    ids = np.array(doc + [eos])[:seq_len + 1]  # the third document is cut at seq_len + 1
    logits = np.asarray(apply_lm(CFG, params, ids[None, :-1]), np.float64)[0]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for p, target in enumerate(ids[1:]):
      for lo, hi in losses:
        if lo <= p < hi:
          losses[(lo, hi)].append(-logp[p, target])
  for (lo, hi), values in losses.items():
    # float32 forward vs the same logits normalised in float64.
    assert got[f"loss_pos{lo}-{hi}"] == pytest.approx(np.mean(values), rel=1e-5)
