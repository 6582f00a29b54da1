"""Sampling filters, log-probs and the repetition detector against numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.rollout.repetition import first_loop_end, repeated_loop
from kimi_jax.rollout.sampling import first_argmax, kept_mask, log_probs, sample_tokens
from kimi_jax.rollout.types import SamplingParams
from tests.rollout.tiny_model import is_loop, kept_set, log_softmax

# float32 log-softmax against float64: differences are a few ulps of values of size ~10.
LOGPROB_ATOL = 1e-5

SETTINGS = [  # (temperature, top_p, top_k, min_p)
    (1.0, 1.0, -1, 0.0), (0.7, 0.5, -1, 0.0), (1.3, 1.0, 3, 0.0), (1.0, 1.0, -1, 0.2),
    (0.9, 0.8, 5, 0.05), (1.0, 1e-6, -1, 0.0), (2.0, 1.0, 1, 0.0), (1.0, 1.0, -1, 1.0),
]


def _columns(settings):
  t, p, k, m = (np.array(col) for col in zip(*settings))
  return (jnp.asarray(t, jnp.float32), jnp.asarray(p, jnp.float32), jnp.asarray(k, jnp.int32),
          jnp.asarray(m, jnp.float32))


def test_kept_mask_matches_float64_reference():
  logits_BxV = np.random.default_rng(0).normal(0, 2, (len(SETTINGS), 50))
  t_B, p_B, k_B, m_B = _columns(SETTINGS)
  mask = np.asarray(kept_mask(log_probs(jnp.asarray(logits_BxV, jnp.float32), t_B), p_B, k_B, m_B))
  for row, (t, p, k, m) in enumerate(SETTINGS):
    assert set(np.flatnonzero(mask[row]).tolist()) == kept_set(logits_BxV[row], t, p, k, m), row


def test_sample_tokens_stays_in_kept_set_and_reports_unfiltered_logprobs():
  rng = np.random.default_rng(1)
  settings = SETTINGS * 64
  logits_BxV = rng.normal(0, 2, (len(settings), 40))
  t_B, p_B, k_B, m_B = _columns(settings)
  keys = jax.random.split(jax.random.key(0), len(settings))
  tokens, logprobs = sample_tokens(jnp.asarray(logits_BxV, jnp.float32), t_B, p_B, k_B, m_B, keys)
  for row, (t, p, k, m) in enumerate(settings):
    assert int(tokens[row]) in kept_set(logits_BxV[row], t, p, k, m)
    expected = log_softmax(logits_BxV[row] / t)[int(tokens[row])]  # before filtering
    np.testing.assert_allclose(float(logprobs[row]), expected, atol=LOGPROB_ATOL)


def test_greedy_rows_take_argmax_with_temperature_one_logprobs():
  logits_BxV = np.random.default_rng(2).normal(0, 2, (4, 30))
  zeros = jnp.zeros(4)
  tokens, logprobs = sample_tokens(jnp.asarray(logits_BxV, jnp.float32), zeros, jnp.full(4, 0.1),
                                   jnp.full(4, 2, jnp.int32), zeros,
                                   jax.random.split(jax.random.key(0), 4))
  np.testing.assert_array_equal(tokens, logits_BxV.argmax(-1))
  expected = log_softmax(logits_BxV)[np.arange(4), logits_BxV.argmax(-1)]
  np.testing.assert_allclose(logprobs, expected, atol=LOGPROB_ATOL)


def test_first_argmax_matches_numpy_on_ties_infinities_and_nans():
  x_BxV = np.random.default_rng(3).integers(-3, 4, (64, 50)).astype(np.float32)  # many ties
  x_BxV[1] = -np.inf
  x_BxV[2, [7, 30]] = np.inf
  x_BxV[3, [11, 40]] = np.nan
  x_BxV[4, 0] = np.nan
  x_BxV[5, -1] = 1e30
  np.testing.assert_array_equal(first_argmax(jnp.asarray(x_BxV)), np.argmax(x_BxV, axis=-1))


@pytest.mark.parametrize("outputs", [
    [1, 2] * 4, [5] * 8, [1, 2, 3] * 3, [7, 1, 2] + [1, 2] * 4, [1, 2] * 3 + [1, 3],
    [1, 2, 3, 4] * 2, [9] * 7, [4, 4, 5, 4, 4, 5, 4, 4], list(range(8)),
])
def test_repeated_loop_matches_reference(outputs):
  ngram, count, length = 3, 3, 24
  prompt = [11, 12, 11, 12, 11, 12]  # a loop inside the prompt must not count
  seq = prompt + outputs
  history = np.zeros((1, length), np.int32)
  history[0, :len(seq)] = seq
  got = repeated_loop(jnp.asarray(history), jnp.array([len(seq) - 1]), jnp.array([len(outputs)]),
                      ngram, count)
  assert bool(got[0]) == is_loop(outputs, ngram, count)


def test_repeated_loop_ignores_the_prompt():
  history = jnp.asarray([[3, 3, 3, 3, 3, 3, 3, 0]])
  assert not repeated_loop(history, jnp.array([6]), jnp.array([2]), 1, 4)[0]
  assert repeated_loop(history, jnp.array([6]), jnp.array([4]), 1, 4)[0]


@pytest.mark.parametrize("ngram,count", [(1, 4), (3, 3), (4, 2)])
def test_host_loop_detector_finds_the_first_loop_like_the_reference(ngram, count):
  rng = np.random.default_rng(ngram)
  for trial in range(200):
    # Three symbols and planted repeats make loops of every period common.
    tokens = rng.integers(0, 3, 40).tolist()
    if trial % 2:
      cut = int(rng.integers(0, 30))
      tokens[cut:] = (tokens[cut:cut + ngram] * 40)[:40 - cut]
    start = int(rng.integers(0, 20))
    want = next((e for e in range(start + 1, 41) if is_loop(tokens[:e], ngram, count)), None)
    assert first_loop_end(tokens, ngram, count, start=start) == want, (tokens, start)
  assert first_loop_end([5] * 9, 0, 0) is None  # disabled
  assert first_loop_end([5] * 9, 1, 4, stop=3) is None  # window longer than the prefix


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
                                         ("top_k", 0), ("min_p", 1.5), ("max_new_tokens", -1),
                                         ("n", 0), ("stop_token_ids", (-3,))])
def test_invalid_sampling_params_name_the_field(field, value):
  with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
    SamplingParams(**{field: value})
