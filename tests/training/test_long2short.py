"""Long2short: weight merging (exact, sharding kept, exported checkpoint loads in transformers)
and the sample selection rules on planted samples."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from kimi_jax.checkpointing.hf import CheckpointError, load_hf, save_hf
from kimi_jax.model import ModelConfig, apply_lm, init_params, param_logical_specs
from kimi_jax.sharding.rules import logical_shardings, make_mesh
from kimi_jax.training.long2short import (PreferencePair, Sample, SFTExample, build_dpo_pairs,
                                          merge_hf_checkpoints, merge_params,
                                          shortest_rejection_sampling)
from tests.model.hf_reference import hf_logits

# A Qwen2 layout transformers can load; every dim divides the (2, 2, 2) mesh's tensor axis.
CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, architecture="qwen2", qkv_bias=True,
                  rope_theta=5000.0)
# float32 logits against transformers: the parity suite's bar (tests/model/test_hf_parity.py).
LOGITS_ATOL = 1e-4


def random_params(seed):
  """Initialised params plus noise on every leaf, so biases and norm scales differ too."""
  params = init_params(CFG, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + rng.normal(0.0, 0.05, x.shape).astype(np.float32), params)


@pytest.fixture(scope="module")
def sharded_pair():
  mesh = make_mesh(2, 2, 2)
  shardings = logical_shardings(mesh, param_logical_specs(CFG))
  return tuple(jax.device_put(random_params(seed), shardings) for seed in (1, 2))


def np_leaves(params):
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_average_is_exact_and_keeps_shardings(sharded_pair):
  a, b = sharded_pair
  merged = merge_params(a, b)
  for got, x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(a), jax.tree.leaves(b)):
    assert got.sharding == x.sharding and got.dtype == x.dtype
    # (x + y) / 2 is exact in float64, so one rounding to float32 gives the exact answer.
    expected = ((np.asarray(x, np.float64) + np.asarray(y, np.float64)) / 2).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(got), expected)
  assert not jax.tree.leaves(a)[0].sharding.is_fully_replicated  # the check above is real


def test_weighted_merge_and_endpoints(sharded_pair):
  a, b = sharded_pair
  for got, x, y in zip(np_leaves(merge_params(a, b, 0.3)), np_leaves(a), np_leaves(b)):
    expected = 0.3 * x.astype(np.float64) + 0.7 * y.astype(np.float64)
    # float32 products and sum: at most ~3 ulp (1.2e-7 relative each) of the largest input.
    scale = max(np.abs(x).max(), np.abs(y).max())
    np.testing.assert_allclose(got, expected, rtol=0, atol=4e-7 * scale)
  for got, x in zip(np_leaves(merge_params(a, b, 1.0)), np_leaves(a)):
    np.testing.assert_array_equal(got, x)
  for got, y in zip(np_leaves(merge_params(a, b, 0.0)), np_leaves(b)):
    np.testing.assert_array_equal(got, y)


def test_merge_rejects_bad_inputs(sharded_pair):
  a, b = sharded_pair
  with pytest.raises(ValueError, match=r"weight=1.5"):
    merge_params(a, b, 1.5)
  other = ModelConfig(**{**dataclasses.asdict(CFG), "intermediate_size": 64})
  with pytest.raises(ValueError, match=r"param \['layers_0'\]\['mlp'\]\['down_proj'\]\['kernel'\]"):
    merge_params(a, init_params(other, jax.random.key(0)))


def test_exported_merge_reloads_and_matches_transformers(sharded_pair, tmp_path):
  a, b = sharded_pair
  merged = merge_params(a, b)
  save_hf(str(tmp_path / "merged"), CFG, merged)
  config, reloaded = load_hf(str(tmp_path / "merged"))
  assert config == CFG
  for got, want in zip(np_leaves(reloaded), np_leaves(merged)):
    np.testing.assert_array_equal(got, want)
  tokens_BxT = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).float().eval()
  ours = np.asarray(apply_lm(CFG, jax.device_get(merged), jnp.asarray(tokens_BxT)))
  np.testing.assert_allclose(hf_logits(model, tokens_BxT), ours, atol=LOGITS_ATOL, rtol=0)


def test_merge_hf_checkpoints_matches_merge_params(sharded_pair, tmp_path):
  a, b = sharded_pair
  save_hf(str(tmp_path / "a"), CFG, a)
  save_hf(str(tmp_path / "b"), CFG, b)
  merge_hf_checkpoints(str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "ab"), 0.25)
  _, got = load_hf(str(tmp_path / "ab"))
  for x, y in zip(np_leaves(got), np_leaves(merge_params(a, b, 0.25))):
    np.testing.assert_array_equal(x, y)
  save_hf(str(tmp_path / "c"), dataclasses.replace(CFG, rope_theta=1e6), b)
  with pytest.raises(CheckpointError, match=r"differ in \['rope_theta'\]"):
    merge_hf_checkpoints(str(tmp_path / "a"), str(tmp_path / "c"), str(tmp_path / "ac"))


# Planted groups of n = 8: (correct, num_tokens) per sample; responses are "<prompt>/<index>".
GROUPS = {
    # Shortest correct has 12 tokens at indices 2 and 3 (tie -> 2); 1.5x boundary is 18 exactly.
    # The wrong answer at 0 is shorter than the chosen: not a negative.
    "tie": [(False, 5), (True, 20), (True, 12), (True, 12), (True, 17), (True, 18), (False, 40),
            (True, 30)],
    "none": [(False, n) for n in (3, 9, 4, 50, 7, 7, 12, 8)],
    # Shortest correct 7 tokens at indices 1 and 4 (tie -> 1); boundary 10.5: 10 kept, 11 rejected.
    # Wrong answers at 3 (shorter) and 7 (as long as the chosen) are not negatives.
    "odd": [(True, 11), (True, 7), (True, 10), (False, 3), (True, 7), (True, 9), (True, 14),
            (False, 7)],
    # All correct and within 1.5x of the shortest: an SFT example but no DPO pair.
    "short": [(True, n) for n in (13, 10, 11, 14, 12, 10, 13, 11)],
}


def planted_samples():
  """The groups above, interleaved across prompts (sample order within a prompt kept)."""
  return [Sample(prompt, f"{prompt}/{i}", *GROUPS[prompt][i])
          for i in range(8) for prompt in GROUPS]


def test_shortest_rejection_sampling_keeps_first_shortest_correct():
  assert shortest_rejection_sampling(planted_samples()) == [
      SFTExample("tie", "tie/2"), SFTExample("odd", "odd/1"), SFTExample("short", "short/1")]


def test_dpo_pairs_reject_only_longer_responses():
  """k1.5 2.4: rejected = wrong responses longer than the chosen, correct ones >= 1.5x."""
  pairs = build_dpo_pairs(planted_samples())
  assert pairs == ([PreferencePair("tie", "tie/2", f"tie/{i}") for i in (1, 5, 6, 7)]
                   + [PreferencePair("odd", "odd/1", f"odd/{i}") for i in (0, 6)])


def test_dpo_pairs_length_ratio_is_a_parameter():
  pairs = build_dpo_pairs(planted_samples(), length_ratio=2.0)  # boundaries 24 and 14
  assert pairs == ([PreferencePair("tie", "tie/2", f"tie/{i}") for i in (6, 7)]
                   + [PreferencePair("odd", "odd/1", "odd/6")])


def test_selection_rejects_bad_input():
  with pytest.raises(ValueError, match=r"prompt 'tie': 7 samples, expected num_samples=8"):
    shortest_rejection_sampling([s for s in planted_samples() if s.response != "tie/4"])
  with pytest.raises(ValueError, match=r"length_ratio=1.0"):
    build_dpo_pairs(planted_samples(), length_ratio=1.0)
  with pytest.raises(ValueError, match=r"Sample.num_tokens=0 \(prompt 'p'\)"):
    Sample("p", "r", True, 0)
  with pytest.raises(ValueError, match=r"Sample.correct=1 \(prompt 'p'\)"):
    Sample("p", "r", 1, 5)
  assert Sample("p", "r", np.bool_(True), np.int64(5)).num_tokens == 5  # numpy scalars are fine
