"""RolloutEngine against step-by-step full-forward references on a tiny random LM.

One engine serves the whole module (weights are swapped, never recompiled), so the suite pays
for one decode program and one prefill program per prompt bucket. Its small prefill token budget
splits most admissions into several prefill programs.
"""
import jax
import numpy as np
import pytest
from scipy import stats

from kimi_jax.rollout.engine import RolloutEngine, SamplingParams
from tests.rollout.tiny_model import (CFG, EOS, greedy_reference, kept_set, log_softmax,
                                      peaked_params, teacher_forced_logits)

# float32 KV-cached decode vs a float64 softmax of full-forward float32 logits: the bar.
LOGPROB_ATOL = 1e-5
# Chi-square goodness of fit is rejected below this p-value: for a correct sampler and a fresh
# seed this test fails with probability 1e-4 (the seeds are fixed, so runs are reproducible).
P_VALUE_FLOOR = 1e-4
MAX_BATCH, MAX_SEQ_LEN, NGRAM, COUNT = 8, 40, 2, 4
# Rows per prefill program: 8 for prompt bucket 8, then 4, 2 and 1 for buckets 16, 32 and 40.
PREFILL_TOKENS = 64


@pytest.fixture(scope="module")
def params():
  return peaked_params(0)


@pytest.fixture(scope="module")
def engine(params):
  return RolloutEngine(CFG, params, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN,
                       eos_token_ids=(EOS,), repetition_ngram=NGRAM, repetition_count=COUNT,
                       chunk_steps=8, prefill_tokens=PREFILL_TOKENS)


def random_prompts(count, seed, max_len=8):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, CFG.vocab_size, rng.integers(2, max_len + 1)).tolist()
          for _ in range(count)]


def test_greedy_equals_stepwise_full_forward(engine, params):
  prompts = random_prompts(14, seed=0)  # more prompts than rows: rows are refilled
  max_new = [24 - i for i in range(14)]
  first, _, _ = greedy_reference(params, prompts, max_new, [{EOS}] * 14, NGRAM, COUNT, MAX_SEQ_LEN)
  # Every third prompt also stops on its own 4th greedy token.
  stops = [(first[i][3],) if i % 3 == 0 and len(first[i]) > 3 else () for i in range(14)]
  sampling = [SamplingParams(temperature=0.0, max_new_tokens=m, stop_token_ids=s)
              for m, s in zip(max_new, stops)]
  got = engine.generate(prompts, sampling)
  ref_out, ref_logp, ref_reason = greedy_reference(
      params, prompts, max_new, [{EOS, *s} for s in stops], NGRAM, COUNT, MAX_SEQ_LEN)
  assert [c.output_ids for c in got] == ref_out
  assert [c.finish_reason for c in got] == ref_reason
  for c, logp in zip(got, ref_logp):
    np.testing.assert_allclose(c.logprobs, logp, atol=LOGPROB_ATOL)
  kinds = {(r["type"], r.get("matched") == "repetition") for r in ref_reason}
  assert kinds == {("stop", False), ("stop", True), ("length", False)}, "cover every finish rule"
  assert [c.repetition for c in got] == [r.get("matched") == "repetition" for r in ref_reason]


def test_prompts_of_every_bucket_equal_stepwise_full_forward(engine, params):
  rng = np.random.default_rng(8)
  lengths = [2, 9, 17, 33, 5, 20, 12, 36, 30, 3, 25, 39, 16]  # buckets 8, 16, 32 and 40
  prompts = [rng.integers(3, CFG.vocab_size, n).tolist() for n in lengths]
  max_new = [min(6, MAX_SEQ_LEN - n) for n in lengths]
  got = engine.generate(prompts, [SamplingParams(temperature=0.0, max_new_tokens=m)
                                  for m in max_new])
  ref_out, ref_logp, ref_reason = greedy_reference(params, prompts, max_new, [{EOS}] * len(lengths),
                                                   NGRAM, COUNT, MAX_SEQ_LEN)
  assert [c.output_ids for c in got] == ref_out
  assert [c.finish_reason for c in got] == ref_reason
  for c, logp in zip(got, ref_logp):
    np.testing.assert_allclose(c.logprobs, logp, atol=LOGPROB_ATOL)


def test_new_prompt_lengths_compile_nothing_after_warm_up(engine):
  prompt, seeded = [4, 5, 6, 7], SamplingParams(temperature=1.0, max_new_tokens=10, seed=42)
  before = engine.generate([prompt], seeded)[0]
  engine.warm_up()
  # Powers of two >= 8, capped at the 40 KV slots; each bucket traced once, whatever ran before.
  assert engine.prompt_buckets == [8, 16, 32, 40]
  assert engine.num_compilations == {"prefill": 4, "decode": 1}
  after = engine.generate([prompt], seeded)[0]
  assert (after.output_ids, after.logprobs) == (before.output_ids, before.logprobs)
  # Every prompt length the engine accepts, admitted in mixed groups as resumed rollouts are.
  prompts = [[3 + n % 50] * n for n in range(1, MAX_SEQ_LEN)]
  engine.generate(prompts, SamplingParams(max_new_tokens=1, seed=1))
  assert engine.num_compilations == {"prefill": 4, "decode": 1}


@pytest.mark.parametrize("max_seq_len,buckets", [
    (5, [5]), (9, [8]), (33, [8, 16, 32]), (40, [8, 16, 32, 40]), (65, [8, 16, 32, 64])])
def test_prompt_buckets_cover_every_accepted_length_once(params, max_seq_len, buckets):
  # Prompts hold 1..max_seq_len-1 tokens; buckets are powers of two >= 8, capped at max_seq_len.
  engine = RolloutEngine(CFG, params, max_batch=1, max_seq_len=max_seq_len)
  assert engine.prompt_buckets == buckets


def test_decode_steps_count_the_longest_sample_of_one_admission(engine):
  steps_before = engine.num_decode_steps
  got = engine.generate(random_prompts(MAX_BATCH, seed=9),
                        [SamplingParams(max_new_tokens=4 + 3 * i, ignore_eos=True, seed=i)
                         for i in range(MAX_BATCH)])
  # All rows start together, so the batch runs one step per token of its longest sample.
  assert engine.num_decode_steps - steps_before == max(len(c.output_ids) for c in got)
  assert max(len(c.output_ids) for c in got) > min(len(c.output_ids) for c in got)


def test_full_kv_cache_finishes_with_length(engine):
  prompts = random_prompts(3, seed=6)
  got = engine.generate(prompts, SamplingParams(max_new_tokens=100, ignore_eos=True, seed=3))
  for p, c in zip(prompts, got):
    assert len(p) + len(c.output_ids) == MAX_SEQ_LEN
    assert c.finish_reason == {"type": "length", "length": MAX_SEQ_LEN - len(p)}


FILTERS = [  # (temperature, top_p, top_k, min_p)
    (1.0, 1.0, -1, 0.0), (0.7, 1.0, 3, 0.0), (1.0, 0.6, -1, 0.0), (1.2, 1.0, -1, 0.25),
    (0.9, 0.8, 5, 0.05),
]


@pytest.fixture(scope="module")
def sampled(engine):
  prompts = random_prompts(len(FILTERS), seed=1)
  sampling = [SamplingParams(temperature=t, top_p=p, top_k=k, min_p=m, max_new_tokens=12, n=3,
                             seed=100 + i)
              for i, (t, p, k, m) in enumerate(FILTERS)]
  return prompts, engine.generate(prompts, sampling)


def test_n_samples_are_grouped_by_prompt(sampled):
  prompts, completions = sampled
  assert [c.prompt_ids for c in completions] == [p for p in prompts for _ in range(3)]
  assert all(len(c.output_ids) == len(c.logprobs) > 0 for c in completions)
  groups = [tuple(tuple(c.output_ids) for c in completions[3 * i:3 * i + 3]) for i in range(5)]
  assert all(len(set(g)) > 1 for g in groups), "samples of one prompt must differ"


def test_logprobs_equal_trainer_recomputation(sampled, params):
  prompts, completions = sampled
  seqs = [c.prompt_ids + c.output_ids for c in completions]
  for c, logits, (t, *_) in zip(completions, teacher_forced_logits(params, seqs, MAX_SEQ_LEN),
                                [f for f in FILTERS for _ in range(3)]):
    start = len(c.prompt_ids) - 1
    logp = log_softmax(logits[start:start + len(c.output_ids)] / t)
    np.testing.assert_allclose(c.logprobs, logp[np.arange(len(c.output_ids)), c.output_ids],
                               atol=LOGPROB_ATOL)


def test_filters_never_emit_outside_kept_set(sampled, params):
  prompts, completions = sampled
  seqs = [c.prompt_ids + c.output_ids for c in completions]
  checked = 0
  for c, logits, f in zip(completions, teacher_forced_logits(params, seqs, MAX_SEQ_LEN),
                          [f for f in FILTERS for _ in range(3)]):
    start = len(c.prompt_ids) - 1
    for i, token in enumerate(c.output_ids):
      kept = kept_set(logits[start + i], *f)
      assert token in kept
      checked += len(kept) < CFG.vocab_size
  assert checked > 100, "the filters must actually exclude tokens in most steps"


def _assert_frequencies_match(counts, probs):
  """Chi-square goodness of fit; bins with expected count < 5 are merged."""
  expected = probs * counts.sum()
  small = expected < 5
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  keep = exp > 0
  assert obs[~keep].sum() == 0, "sampled a token of zero probability"
  p_value = stats.chisquare(obs[keep], exp[keep]).pvalue
  assert p_value > P_VALUE_FLOOR, p_value


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.7)])
def test_first_token_frequencies_match_probabilities(engine, params, temperature, top_p):
  prompt = [5, 9, 17, 33]
  samples = 2400
  completions = engine.generate([prompt], SamplingParams(temperature=temperature, top_p=top_p,
                                                         max_new_tokens=1, n=samples, seed=7))
  counts = np.bincount([c.output_ids[0] for c in completions], minlength=CFG.vocab_size)
  logits = teacher_forced_logits(params, [prompt], MAX_SEQ_LEN)[0][-1]
  probs = np.exp(log_softmax(logits / temperature))
  kept = np.zeros(CFG.vocab_size, bool)
  kept[list(kept_set(logits, temperature, top_p, -1, 0.0))] = True
  probs = np.where(kept, probs, 0.0) / probs[kept].sum()
  assert probs.max() > 0.1, "a near-uniform distribution would make this test weak"
  _assert_frequencies_match(counts, probs)


def test_token_budget_aborts_and_partial_resume_continues_the_sample(engine):
  prompts = random_prompts(10, seed=2)
  sampling = [SamplingParams(temperature=1.0, max_new_tokens=20, seed=500 + i) for i in range(10)]
  full = engine.generate(prompts, sampling)
  budget = sum(len(c.output_ids) for c in full) // 2
  cut = engine.generate(prompts, sampling, token_budget=budget)
  assert sum(len(c.output_ids) for c in cut) == budget
  aborted = [i for i, c in enumerate(cut) if c.finish_reason["type"] == "abort"]
  assert aborted
  for c, f in zip(cut, full):
    assert c.output_ids == f.output_ids[:len(c.output_ids)]
    assert c.logprobs == pytest.approx(f.logprobs[:len(c.logprobs)], abs=LOGPROB_ATOL)
    if c.finish_reason["type"] != "abort":
      assert c.finish_reason == f.finish_reason and c.output_ids == f.output_ids
  resumed = engine.generate(
      [prompts[i] + cut[i].output_ids for i in aborted],
      [SamplingParams(temperature=1.0, max_new_tokens=20 - len(cut[i].output_ids), seed=500 + i)
       for i in aborted])
  for i, r in zip(aborted, resumed):
    assert cut[i].output_ids + r.output_ids == full[i].output_ids
    assert r.finish_reason["type"] == full[i].finish_reason["type"]


def test_should_abort_returns_streamed_partial_tokens(engine):
  streamed = {}

  def on_token(index, ids, logprobs):
    assert len(ids) == len(logprobs)
    streamed.setdefault(index, []).extend(ids)

  got = engine.generate(random_prompts(12, seed=3),
                        SamplingParams(temperature=1.0, max_new_tokens=30, ignore_eos=True),
                        should_abort=lambda: sum(map(len, streamed.values())) >= 10,
                        on_token=on_token)
  assert {i: c.output_ids for i, c in enumerate(got) if c.output_ids} == streamed
  assert any(c.finish_reason == {"type": "abort", "message": "aborted by the caller"} for c in got)
  assert not engine.has_work


def test_continuous_batching_refills_rows_while_a_long_sample_runs(engine):
  long_prompt, short_prompts = [7, 8, 9], random_prompts(20, seed=4)
  sampling = ([SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True)]
              + [SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True)] * 20)
  events = []
  got = engine.generate([long_prompt] + short_prompts, sampling,
                        on_token=lambda i, ids, _: events.extend([i] * len(ids)))
  assert len(got[0].output_ids) >= 10, "the long sample must outlast three waves of short ones"
  last_long = max(k for k, i in enumerate(events) if i == 0)
  last_short = max(k for k, i in enumerate(events) if i != 0)
  assert last_short < last_long, "short requests must finish while the long one still decodes"


def test_seeded_samples_do_not_depend_on_batch_company(engine):
  prompt, seeded = [4, 5, 6, 7], SamplingParams(temperature=1.0, max_new_tokens=10, seed=42)
  alone = engine.generate([prompt], seeded)[0]
  others = SamplingParams(temperature=1.0, max_new_tokens=16)
  mixed = engine.generate([[9, 9], prompt, [3, 4, 5]], [others, seeded, others])[1]
  assert alone.output_ids == mixed.output_ids and alone.logprobs == mixed.logprobs
  unseeded = engine.generate([prompt] * 2, SamplingParams(temperature=1.0, max_new_tokens=10))
  assert unseeded[0].output_ids != unseeded[1].output_ids


def test_weight_swap_changes_outputs_without_recompiling(engine, params):
  prompts = random_prompts(4, seed=5)
  greedy = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
  before = engine.generate(prompts, greedy)
  compiled = engine.num_compilations
  new_params = peaked_params(1)
  try:
    engine.update_weights(new_params, "v2")
    after = engine.generate(prompts, greedy)
  finally:
    engine.update_weights(params, "0")
  assert engine.num_compilations == compiled
  assert [c.output_ids for c in before] != [c.output_ids for c in after]
  expected, _, _ = greedy_reference(new_params, prompts, [10] * 4, [set()] * 4, NGRAM, COUNT,
                                    MAX_SEQ_LEN)
  assert [c.output_ids for c in after] == expected
  assert {c.weight_version for c in after} == {"v2"}


def test_engine_keeps_its_own_copy_of_weights_the_trainer_donates(engine, params):
  prompts = random_prompts(2, seed=7)
  greedy = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
  donated = peaked_params(0)  # equal to `params`, in buffers of its own
  try:
    engine.update_weights(donated, "0")
    for leaf in jax.tree.leaves(donated):
      leaf.delete()  # what a jitted train step with donate_argnums does to its inputs
    got = engine.generate(prompts, greedy)
  finally:
    engine.update_weights(params, "0")
  expected, _, _ = greedy_reference(params, prompts, [6] * 2, [set()] * 2, NGRAM, COUNT, MAX_SEQ_LEN)
  assert [c.output_ids for c in got] == expected


def test_update_weights_rejects_other_shapes(engine, params):
  bad = dict(params, lm_head={"kernel": params["lm_head"]["kernel"][:, :10]})
  with pytest.raises(ValueError, match="lm_head"):
    engine.update_weights(bad, "bad")


def test_bad_requests_name_the_prompt(engine):
  with pytest.raises(ValueError, match=r"prompts\[1\].*max_seq_len"):
    engine.generate([[3], [3] * MAX_SEQ_LEN], SamplingParams())
  with pytest.raises(ValueError, match=r"prompts\[0\].*outside"):
    engine.generate([[3, CFG.vocab_size]], SamplingParams())
  with pytest.raises(ValueError, match=r"prompts\[0\]: empty"):
    engine.generate([[]], SamplingParams())
  assert not engine.has_work


def test_zero_new_tokens_finishes_with_length_zero(engine):
  got = engine.generate([[3, 4]], SamplingParams(max_new_tokens=0, n=2))
  assert [(c.output_ids, c.finish_reason) for c in got] == [([], {"type": "length", "length": 0})] * 2


def test_prefix_sharing_prefills_each_prompt_once_and_samples_the_same(engine, params):
  # An RL group (k requests with one prompt, own seeds) and n samples of one request, more
  # requests than rows: later admissions share too.
  prompts = random_prompts(3, seed=11)
  group = [prompts[0]] * 4 + [prompts[1]] * 3
  sampling = [SamplingParams(temperature=1.0, max_new_tokens=10, seed=50 + i) for i in range(7)]
  sampling.append(SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, n=3, seed=9))
  unshared = RolloutEngine(CFG, params, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN,
                           eos_token_ids=(EOS,), repetition_ngram=NGRAM, repetition_count=COUNT,
                           chunk_steps=8, prefill_tokens=PREFILL_TOKENS, share_prefixes=False)
  before = engine.prefill_counts
  shared_out = engine.generate(group + [prompts[2]], sampling)
  counts = {k: v - before[k] for k, v in engine.prefill_counts.items()}
  unshared_out = unshared.generate(group + [prompts[2]], sampling)
  # Same programs, rows and seeds: the samples must match bit for bit, not just closely.
  assert [c.output_ids for c in shared_out] == [c.output_ids for c in unshared_out]
  np.testing.assert_array_equal(np.concatenate([c.logprobs for c in shared_out]),
                                np.concatenate([c.logprobs for c in unshared_out]))
  assert len({tuple(c.output_ids) for c in shared_out[:4]}) > 1, "own seeds: distinct samples"
  total = sum(len(p) for p in group) + 3 * len(prompts[2])
  assert unshared.prefill_counts["prompt_tokens"] == total
  assert unshared.prefill_counts["shared_tokens"] == 0
  assert counts["prompt_tokens"] + counts["shared_tokens"] == total
  # The first admission seats the whole group (FIFO, 8 rows): 3 of 4 and 2 of 3 prompts copied.
  assert counts["shared_tokens"] >= 3 * len(prompts[0]) + 2 * len(prompts[1])
