"""Prompt sampler: frequencies follow the weights, feedback, curricula, state, multi-host."""
import json

import grain
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from scipy import stats

from kimi_jax.data.samplers import (Curriculum, GradualSchedule, Prioritized, PromptSampler,
                                    SwitchSchedule, Uniform, make_strategy)
from kimi_jax.data.sources import Prompt

# Every statistical check below would fail with probability <= ALPHA for a random seed; the
# seeds are fixed, so the tests are deterministic.
ALPHA = 1e-4


def prompts_with_levels(levels):
  return [Prompt(question=f"q{i}", answer=str(i), id=f"p{i}", difficulty=level)
          for i, level in enumerate(levels)]


def sampler(prompts, strategy, batch=16, seed=0, **kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return PromptSampler(prompts, strategy, batch, seed, **kw)


def draw_counts(iterator, prompts, steps):
  counts = dict.fromkeys((p.id for p in prompts), 0)
  for _ in range(steps):
    for p in next(iterator):
      counts[p.id] += 1
  return np.array([counts[p.id] for p in prompts])


def set_success(iterator, prompts, success):
  """First visit sets s_i to the visit's mean reward exactly."""
  iterator.update([p.id for p in prompts], success)


SUCCESS = np.linspace(0.0, 0.9, 10)
LEVELS = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
EPS = 0.05


@pytest.mark.parametrize("strategy, expected_weights", [
    (Uniform(), np.ones(10)),
    (Prioritized(EPS), (1 - SUCCESS) + EPS),
    # after the switch only levels >= 3, each weighted by its priority
    (Curriculum(SwitchSchedule(switch_step=0, hard_level=3), Prioritized(EPS)),
     ((1 - SUCCESS) + EPS) * (np.array(LEVELS) >= 3)),
])
def test_frequencies_follow_weights(strategy, expected_weights):
  prompts = prompts_with_levels(LEVELS)
  it = iter(sampler(prompts, strategy, batch=16, seed=3))
  set_success(it, prompts, SUCCESS)
  counts = draw_counts(it, prompts, steps=1500)
  expected = counts.sum() * expected_weights / expected_weights.sum()
  drawable = expected > 0
  assert np.all(counts[~drawable] == 0)
  chi2 = np.sum((counts[drawable] - expected[drawable]) ** 2 / expected[drawable])
  assert chi2 < stats.chi2.ppf(1 - ALPHA, df=drawable.sum() - 1)


def test_prompt_solved_mid_run_is_drawn_less():
  prompts = prompts_with_levels([1] * 20)
  it = iter(sampler(prompts, Prioritized(EPS), batch=8, seed=1))
  steps, draws = 400, 400 * 8
  before = draw_counts(it, prompts, steps)[0]
  it.update(["p0"] * 4, [1.0] * 4)  # p0 solved by all 4 samples
  after = draw_counts(it, prompts, steps)[0]
  p_before = 1 / 20  # all weights equal
  p_after = EPS / (19 * (1 + EPS) + EPS)
  for count, p in ((before, p_before), (after, p_after)):
    low, high = stats.binom.interval(1 - ALPHA, draws, p)
    assert low <= count <= high
  assert after < before


def test_success_table_update_rule():
  prompts = prompts_with_levels([1, 1])
  ema, mean = iter(sampler(prompts, Uniform(), ema_rate=0.25)), iter(sampler(prompts, Uniform()))
  visits = [[1.0, 1.0], [0.0], [1.0, 0.0], [1.0], [0.0]]  # samples of p0 per update call
  for rewards in visits:
    for it in (ema, mean):
      it.update(["p0"] * len(rewards), rewards)
  # a_v = max(1/v, 0.25): s = 1 -> 0.5 -> 0.5 -> 0.625 -> 0.46875
  assert ema.table.success_P[0] == pytest.approx(0.46875, abs=1e-15)
  assert mean.table.success_P[0] == pytest.approx(np.mean([1.0, 0.0, 0.5, 1.0, 0.0]), abs=1e-15)
  assert list(mean.table.visits_P) == [5, 0] and mean.table.success_P[1] == 0.0


def test_update_rejects_bad_feedback():
  it = iter(sampler(prompts_with_levels([1, 1]), Uniform()))
  with pytest.raises(ValueError, match=r"rewards must lie in \[0, 1\]"):
    it.update(["p0"], [1.5])
  with pytest.raises(ValueError, match=r"rewards must lie in \[0, 1\]"):
    it.update(["p0"], [np.nan])
  with pytest.raises(KeyError, match="nope"):
    it.update(["nope"], [1.0])
  with pytest.raises(ValueError, match="2 prompt ids but 1 rewards"):
    it.update(["p0", "p1"], [1.0])


def test_gradual_curriculum_never_draws_above_current_level():
  prompts = prompts_with_levels([1, 2, 3, 4] * 25)
  it = iter(sampler(prompts, Curriculum(GradualSchedule(start_level=1, steps_per_level=5)),
                    batch=32))
  highest_seen = {}
  for step in range(25):
    current = 1 + step // 5
    drawn = max(p.difficulty for p in next(it))
    assert drawn <= current
    highest_seen[current] = max(highest_seen.get(current, 0), drawn)
  assert highest_seen == {1: 1, 2: 2, 3: 3, 4: 4, 5: 4}  # the schedule does advance


def test_switch_curriculum_uniform_then_hard_only():
  prompts = prompts_with_levels([1, 2, 3, 4] * 25)
  it = iter(sampler(prompts, Curriculum(SwitchSchedule(switch_step=5, hard_level=3)), batch=32))
  before = {p.difficulty for _ in range(5) for p in next(it)}
  after = {p.difficulty for _ in range(5) for p in next(it)}
  assert before == {1, 2, 3, 4} and after == {3, 4}


def test_curriculum_needs_difficulties_and_drawable_levels():
  no_level = [Prompt(question="q", answer="1", id="a")]
  with pytest.raises(ValueError, match="needs a difficulty on every prompt"):
    sampler(no_level, Curriculum(GradualSchedule(1, 1)))
  it = iter(sampler(prompts_with_levels([1, 2]), Curriculum(SwitchSchedule(0, hard_level=9))))
  with pytest.raises(ValueError, match="step 0: Curriculum gives no drawable prompt"):
    next(it)


def test_make_strategy_from_config():
  assert make_strategy({"strategy": "uniform"}) == Uniform()
  assert make_strategy({"strategy": "prioritized", "epsilon": 0.1}) == Prioritized(0.1)
  assert make_strategy({"strategy": "switch_curriculum", "switch_step": 24, "hard_level": 3}) == (
      Curriculum(SwitchSchedule(24, 3), Uniform()))
  assert make_strategy({"strategy": "gradual_curriculum", "start_level": 1, "steps_per_level": 10,
                        "base": "prioritized", "epsilon": 0.05}) == (
      Curriculum(GradualSchedule(1, 10), Prioritized(0.05)))
  with pytest.raises(ValueError, match="unknown 'greedy'"):
    make_strategy({"strategy": "greedy"})
  with pytest.raises(ValueError, match="sampler.base: unknown 'prioritised'"):
    make_strategy({"strategy": "gradual_curriculum", "start_level": 1, "steps_per_level": 10,
                   "base": "prioritised"})
  with pytest.raises(ValueError, match="needs config field 'hard_level'"):
    make_strategy({"strategy": "switch_curriculum", "switch_step": 24})


def feedback(iterator, batch, step):
  """Deterministic scripted rewards, the same for every iterator they are given to."""
  rewards = [float((int(p.id[1:]) * 7 + step) % 3 == 0) for p in batch]
  iterator.update([p.id for p in batch], rewards)


def run(iterator, steps, first_step=0):
  batches = []
  for step in range(first_step, first_step + steps):
    batch = next(iterator)
    feedback(iterator, batch, step)
    batches.append([p.id for p in batch])
  return batches


def test_state_round_trip_reproduces_next_batches():
  data = sampler(prompts_with_levels([1, 2, 3] * 20), Prioritized(EPS), batch=8, ema_rate=0.3)
  original = iter(data)
  run(original, 5)
  state = json.loads(json.dumps(original.get_state()))
  restored = iter(data)
  restored.set_state(state)
  expected = run(original, 10, first_step=5)
  assert run(restored, 10, first_step=5) == expected
  assert run(iter(data), 10, first_step=5) != expected  # the state is what made them equal


def test_state_rejects_other_prompt_set():
  state = iter(sampler(prompts_with_levels([1, 2]), Uniform())).get_state()
  with pytest.raises(ValueError, match="saved for another prompt set"):
    iter(sampler(prompts_with_levels([1, 2, 3]), Uniform())).set_state(state)


@pytest.mark.parametrize("sampler_args", ["grain_handler", "json"])
def test_orbax_checkpoint_with_params(tmp_path, sampler_args):
  data = sampler(prompts_with_levels([1, 2, 3] * 20), Prioritized(EPS), batch=8, ema_rate=0.3)
  original = iter(data)
  run(original, 5)
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}
  save, restore = {
      "grain_handler": (grain.checkpoint.CheckpointSave(original),
                        grain.checkpoint.CheckpointRestore(iter(data))),
      "json": (ocp.args.JsonSave(original.get_state()), ocp.args.JsonRestore()),
  }[sampler_args]
  with ocp.CheckpointManager(tmp_path, item_names=("params", "sampler")) as manager:
    manager.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(params), sampler=save))
    manager.wait_until_finished()
  with ocp.CheckpointManager(tmp_path, item_names=("params", "sampler")) as manager:
    out = manager.restore(5, args=ocp.args.Composite(params=ocp.args.StandardRestore(params),
                                                      sampler=restore))
  for name in params:
    np.testing.assert_array_equal(out["params"][name], params[name])
    assert out["params"][name].dtype == params[name].dtype
  restored = out["sampler"]
  if sampler_args == "json":
    restored = iter(data)
    restored.set_state(out["sampler"])
  assert run(restored, 10, first_step=5) == run(original, 10, first_step=5)


def test_process_slices_cover_the_global_batch():
  prompts = prompts_with_levels([1, 2] * 30)
  make = lambda index, count: iter(sampler(prompts, Prioritized(EPS), batch=12, seed=7,
                                           process_index=index, process_count=count))
  reference, hosts = make(0, 1), [make(0, 2), make(1, 2)]
  for step in range(6):
    global_batch = next(reference)
    slices = [next(host) for host in hosts]
    assert [len(s) for s in slices] == [6, 6]
    assert slices[0] + slices[1] == global_batch
    for it in [reference] + hosts:  # rewards are all-gathered: every host sees the global batch
      feedback(it, global_batch, step)


def test_bad_process_layout():
  prompts = prompts_with_levels([1, 2])
  with pytest.raises(ValueError, match="not a positive multiple of process_count 4"):
    sampler(prompts, Uniform(), batch=6, process_count=4)
  with pytest.raises(ValueError, match=r"prompt ids are not unique: \['p0'\]"):
    sampler(prompts + prompts[:1], Uniform())
  with pytest.raises(ValueError, match=r"process_index 2 not in \[0, 2\)"):
    sampler(prompts, Uniform(), batch=6, process_index=2, process_count=2)


def test_domain_mix_gives_each_domain_its_share():
  from kimi_jax.data.samplers import DomainMix, mix_domains
  prompts = ([Prompt(question=f"m{i}", answer="1", id=f"m{i}", domain="math") for i in range(10)]
             + [Prompt(question=f"c{i}", answer="1", id=f"c{i}", domain="code") for i in range(90)])
  strategy = mix_domains(Prioritized(0.05), prompts, {"math": 3.0, "code": 1.0})
  assert isinstance(strategy, DomainMix)
  success_N = np.linspace(0, 1, 100)
  w_N = strategy.weights(success_N, np.full(100, -1), step=0)
  share = w_N[:10].sum() / w_N.sum()
  np.testing.assert_allclose(share, 0.75, rtol=1e-12)  # exact by construction
  # Within a domain the base strategy's ratios are kept.
  base_N = Prioritized(0.05).weights(success_N, None, 0)
  np.testing.assert_allclose(w_N[10:] / w_N[10], base_N[10:] / base_N[10], rtol=1e-12)
  draws = iter(PromptSampler(prompts, strategy, 64, seed=0))
  math_frac = np.mean([p.domain == "math" for _ in range(50) for p in next(draws)])
  assert abs(math_frac - 0.75) < 0.03  # 3200 draws: ~4 standard deviations


def test_single_domain_is_left_alone_and_unweighted_domains_are_named():
  from kimi_jax.data.samplers import mix_domains
  prompts = [Prompt(question="q", answer="1", id="a", domain="math"),
             Prompt(question="q", answer="1", id="b", domain="vision")]
  uniform = Uniform()
  assert mix_domains(uniform, prompts, {"math": 1.0}) is uniform
  with pytest.raises(ValueError, match=r"domain\(s\) \['vision'\]"):
    mix_domains(uniform, prompts, {"math": 1.0, "code": 1.0})
