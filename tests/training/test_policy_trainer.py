"""PolicyTrainer wiring: S_ref is pi_theta_i's log-probs from the loss's own program (an exactly
inert tau term at theta = theta_i), the optimizer restarts every iteration, and the minibatch
steps train on the rewards the registry gave the rollouts."""
import dataclasses

import jax
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from experiments.rl_arith import get_config
from kimi_jax.data import synthetic
from kimi_jax.data.samplers import PromptSampler, make_strategy
from kimi_jax.model import ModelConfig
from kimi_jax.model.logprobs import token_logprobs
from kimi_jax.rollout.partial import PartialRolloutBuffer
from kimi_jax.rollout.types import Completion, SamplingParams, stop_reason
from kimi_jax.sharding.rules import make_mesh
from kimi_jax.training import rl
from kimi_jax.training.scoring import RowFacts
from kimi_jax.training.setup import build_basics
from kimi_jax.training.state import init_train_state
from kimi_jax.training.steps import keep_params
from tests.training.test_rl_layout import one_slice_minibatches

CFG = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
K, GROUPS, T = 4, 4, 12  # 4 groups of 4 samples, two minibatches of two groups


def rl_config(tau=0.5, epochs=2):
  return ConfigDict(dict(loss="mirror_descent", tau=tau, baseline="mean", length_normalize=False,
                         clip_eps=0.2, k=K, groups_per_minibatch=2, epochs=epochs,
                         prompts_per_iteration=GROUPS, batch_slices=1))


def minibatches(batch, groups_per_minibatch=2, pack=True):
  """The batch's minibatches as the RL loop lays them out (2x2x2 mesh: 4 batch shards)."""
  return one_slice_minibatches(batch, K, groups_per_minibatch, pack, row_multiple=4)


def make_batch(seed: int, rewards_B=None):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, CFG.vocab_size, (K * GROUPS, T + 1)).astype(np.int32)
  mask = np.zeros((K * GROUPS, T), np.float32)
  for row, length in enumerate(rng.integers(2, T - 3, K * GROUPS)):
    mask[row, 3:3 + length] = 1.0  # a 4-token prompt, then the response
  if rewards_B is None:
    rewards_B = rng.integers(0, 2, K * GROUPS).astype(np.float32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
          "rewards": np.asarray(rewards_B, np.float32),
          "group_ids": np.repeat(np.arange(GROUPS), K).astype(np.int32)}


def trainer_and_state(tx, config):
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  state, shardings = init_train_state(CFG, tx, mesh, jax.random.key(0))
  return rl.PolicyTrainer(mesh, shardings, CFG, config, keep_params), state


class RecordingGrads:
  """Wraps the trainer's gradient program and keeps every minibatch it was called with."""

  def __init__(self, grads):
    self.grads, self.calls = grads, []

  def __call__(self, state, minibatch):
    self.calls.append({k: np.array(v) for k, v in minibatch.items()})
    return self.grads(state, minibatch)


def host_tree(tree):
  return jax.tree.leaves(jax.tree.map(np.asarray, jax.device_get(tree)))


def test_zero_advantage_at_theta_i_gives_exactly_zero_gradient_even_at_large_tau():
  """Equal rewards in every group (zero advantage) and theta = theta_i: the only force is the
  tau term, whose gradient must be exactly 0, so even SGD at lr 1 leaves every weight as is."""
  trainer, state = trainer_and_state(optax.sgd(1.0), rl_config(tau=50.0))
  before = host_tree(state.params)
  state, metrics = trainer.train(state, minibatches(make_batch(0, rewards_B=np.ones(K * GROUPS))))
  assert metrics["grad_norm"] == 0.0 and metrics["log_ratio"] == 0.0
  for got, want in zip(host_tree(state.params), before):
    np.testing.assert_array_equal(got, want)


def test_reference_is_the_pre_update_log_probs_computed_once():
  """Minibatches run longest groups first. The first is trained at pi_theta_i and is its own
  reference pass (`ref_is_own`); the second gets one reference pass before any update; epoch 2
  reuses both references."""
  trainer, state = trainer_and_state(optax.sgd(0.5), rl_config())
  recorder = trainer.grads = RecordingGrads(trainer.grads)
  batch = make_batch(1)
  params_before = jax.device_get(state.params)
  state, metrics = trainer.train(state, minibatches(batch))
  # One reference pass (ref_logp still zero), then 2 epochs x 2 minibatch steps.
  assert len(recorder.calls) == 1 + 4 and metrics["updates"] == 4
  assert not recorder.calls[0]["ref_logp"].any()
  assert [c["ref_is_own"].tolist() for c in recorder.calls] == [
      [False] * 8, [True] * 8, [False] * 8, [False] * 8, [False] * 8]
  ends_G = (batch["loss_mask"] * np.arange(1, T + 1)).max(axis=1).reshape(GROUPS, K).max(axis=1)
  order_B = np.concatenate([np.arange(g * K, (g + 1) * K) for g in np.argsort(-ends_G,
                                                                              kind="stable")])
  assert not np.array_equal(order_B, np.arange(K * GROUPS))  # a reordering to get right
  before_BxT = np.asarray(token_logprobs(CFG, params_before, batch)) * batch["loss_mask"]
  after_BxT = np.asarray(token_logprobs(CFG, jax.device_get(state.params), batch)) * batch["loss_mask"]
  first, second = order_B[:8], order_B[8:]
  for call, rows in zip(recorder.calls, [second, first, second, first, second]):
    width = call["loss_mask"].shape[1]
    # Token rows are packed: each row's tokens up to its last loss token gather back intact.
    ends = (call["loss_mask"] * np.arange(1, width + 1)).max(axis=1).astype(int)
    for row, end in zip(rows, ends):
      got = call["tokens"].reshape(-1)[call["unpack_index"][list(rows).index(row), :end]]
      np.testing.assert_array_equal(got, batch["tokens"][row, :end])
    np.testing.assert_array_equal(call["loss_mask"], batch["loss_mask"][rows, :width])
    if not call["ref_is_own"].any() and call is not recorder.calls[0]:
      # Another program (plain forward, unsharded) rounds differently: 1e-5 on values ~ -4.
      np.testing.assert_allclose(call["ref_logp"], before_BxT[rows, :width], atol=1e-5, rtol=0)
  # Control: the policy did move, so post-update log-probs would have failed the check above.
  assert np.abs(after_BxT - before_BxT).max() > 1e-2


def test_own_reference_pass_equals_a_separate_one_bit_for_bit():
  """The first minibatch's update with `ref_is_own` gives the gradients and metrics of the same
  program fed the log-probs of a separate reference pass at the same params."""
  trainer, state = trainer_and_state(optax.sgd(0.5), rl_config())
  [batch] = minibatches(make_batch(4), groups_per_minibatch=GROUPS)
  own = trainer.grads(state, {**batch, "ref_is_own": np.ones(K * GROUPS, bool)})
  separate = trainer.grads(state, {**batch, "ref_is_own": np.zeros(K * GROUPS, bool)})
  ref_logp = np.asarray(separate[1]["logp_BxT"])
  fed = trainer.grads(state, {**batch, "ref_logp": ref_logp,
                              "ref_is_own": np.zeros(K * GROUPS, bool)})
  for got, want in zip(host_tree(own), host_tree(fed)):
    np.testing.assert_array_equal(got, want)
  # Control: with the zero reference the tau term pulls, so the gradients differ.
  assert any(np.abs(a - b).max() > 0 for a, b in zip(host_tree(own[0]), host_tree(separate[0])))


def test_packed_rows_give_the_unpacked_loss_gradients_and_log_probs():
  """Trajectories packed side by side (own segments and positions) must train exactly like one
  per row; float32 sums in another order: 1e-5 on log-probs ~ -4, gradients ~ 1e-1."""
  trainer, state = trainer_and_state(optax.sgd(0.5), rl_config())
  wide = lambda x: np.concatenate([x, np.zeros((K * GROUPS, 2 * T), x.dtype)], axis=1)
  batch = {k: wide(v) if v.ndim == 2 else v for k, v in make_batch(5).items()}  # 3T wide
  [packed] = minibatches(batch, groups_per_minibatch=GROUPS)
  [unpacked] = minibatches(batch, groups_per_minibatch=GROUPS, pack=False)
  assert packed["tokens"].shape[0] < K * GROUPS  # something was packed
  got_grads, got = trainer.grads(state, packed)
  want_grads, want = trainer.grads(state, unpacked)
  np.testing.assert_allclose(got["logp_BxT"], want["logp_BxT"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(got["loss"], want["loss"], atol=1e-5, rtol=1e-5)
  for g, w in zip(host_tree(got_grads), host_tree(want_grads)):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)
  # Control: without segment boundaries a trajectory would see the ones packed before it.
  leaky = {**packed, "segment_ids": np.ones_like(packed["segment_ids"]),
           "positions": np.broadcast_to(np.arange(packed["tokens"].shape[1]),
                                        packed["tokens"].shape)}
  assert np.abs(np.asarray(trainer.grads(state, leaky)[1]["logp_BxT"])
                - np.asarray(want["logp_BxT"])).max() > 1e-3


def test_optimizer_state_is_fresh_at_every_iteration_with_adam():
  """Iteration 2 from the trained state must equal iteration 2 from the same params with a
  newly initialised Adam state (moments and count), and differ from carrying the old one."""
  tx = optax.adam(1e-2)
  trainer, state = trainer_and_state(tx, rl_config(epochs=1))
  state, _ = trainer.train(state, minibatches(make_batch(2)))
  assert int(state.opt_state[0].count) == 2
  carried_mu = host_tree(state.opt_state[0].mu)
  placement = jax.tree.map(lambda leaf: leaf.sharding, state.opt_state)
  fresh = state.replace(step=state.step.copy(),
                        params=jax.tree.map(lambda p: p.copy(), state.params),
                        opt_state=jax.device_put(tx.init(state.params), placement))
  reset_run, _ = trainer.train(state, minibatches(make_batch(3)))
  assert int(reset_run.opt_state[0].count) == 2  # two updates, not four
  reference, _ = trainer.train(fresh, minibatches(make_batch(3)))
  for got, want in zip(host_tree(reset_run.params), host_tree(reference.params)):
    np.testing.assert_array_equal(got, want)
  assert any(np.abs(m).max() > 0 for m in carried_mu)  # the reset had work to do


class ScriptedArithBackend:
  """Answers each arithmetic prompt with the worked solution (correct) or a bare wrong answer,
  by request seed: lengths and correctness differ within each group."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def generate(self, requests, sampling, images=None):
    del images  # text prompts only
    out = []
    for ids, params in zip(requests, sampling):
      question = self.tokenizer.decode(ids)
      problem = synthetic.solve(question)
      text = (synthetic.target_response(problem) if params.seed % 3 else
              f"{synthetic.ANSWER_MARKER}{int(problem.answer) + 1}")
      output = self.tokenizer.encode(text) + [self.tokenizer.eos_id]
      out.append(Completion(list(ids), output, [-0.5] * len(output),
                            stop_reason(self.tokenizer.eos_id)))
    return out

  def sync(self, params, version):
    pass


def test_minibatch_steps_train_on_the_registry_rewards(tmp_path, monkeypatch):
  config = get_config("smoke")
  with config.unlocked():
    config.rl.length_penalty.update(weight=0.5, warmup_iterations=0)
  task, tokenizer, model_config, mesh = build_basics(config, str(tmp_path))
  tx = optax.sgd(1e-3)
  state, shardings = init_train_state(model_config, tx, mesh, jax.random.key(0))
  trainer = rl.PolicyTrainer(mesh, shardings, model_config, config.rl, keep_params)
  recorder = trainer.grads = RecordingGrads(trainer.grads)
  sampler = iter(PromptSampler(task.train, make_strategy(config.sampler),
                               config.rl.prompts_per_iteration, config.seed))
  sampling = SamplingParams(temperature=1.0, stop_token_ids=(tokenizer.eos_id,))
  sent, allgather = [], rl.multihost.allgather_objects
  monkeypatch.setattr(rl.multihost, "allgather_objects",
                      lambda obj: sent.append(obj) or allgather(obj))
  state, metrics = rl.rl_iteration(state, 0, trainer, ScriptedArithBackend(tokenizer), sampling,
                                   sampler, PartialRolloutBuffer(), task, tokenizer, config,
                                   str(tmp_path))
  # Expected rewards from the rule itself (k1.5 2.3.3), group by group of the training steps.
  train_calls = recorder.calls[len(recorder.calls) // 2:]  # after one reference pass each
  num_groups = 0
  for call in train_calls:
    for g in np.unique(call["group_ids"]):
      rows = [r for r in np.flatnonzero(call["group_ids"] == g) if call["loss_mask"][r].any()]
      if not rows:
        continue  # a padding group
      num_groups += 1
      graded = []
      for r in rows:
        end = int(np.flatnonzero(call["loss_mask"][r])[-1]) + 1  # packed rows: gather back
        tokens = call["tokens"].reshape(-1)[call["unpack_index"][r, :end]]
        text = tokenizer.decode([t for t in tokens if t != tokenizer.pad_id])
        question, response = text.split("=", 1)
        ids = tokenizer.encode(response) + [tokenizer.eos_id]
        graded.append((synthetic.is_correct(response, synthetic.solve(question + "=").answer),
                       len(ids), call["rewards"][r]))
      lo, hi = min(n for _, n, _ in graded), max(n for _, n, _ in graded)
      for correct, n, reward in graded:
        lam = 0.0 if hi == lo else 0.5 - (n - lo) / (hi - lo)
        want = float(correct) + 0.5 * (lam if correct else min(0.0, lam))
        assert reward == pytest.approx(want, abs=1e-6)
  assert num_groups == config.rl.prompts_per_iteration
  assert 0 < metrics["accuracy"] < 1
  # What a process sends the others: per-row facts and counts (and the KL metric's sums), never
  # token ids or text.
  [(facts, buffered, new_tokens), kl_sums] = sent
  assert isinstance(facts, RowFacts) and len(facts) == num_groups * config.rl.k
  assert all(np.shape(getattr(facts, f.name)) == (len(facts),)
             for f in dataclasses.fields(RowFacts))
  assert isinstance(buffered, int) and isinstance(new_tokens, int)
  assert [type(x) for x in kl_sums] == [np.float64, int]
