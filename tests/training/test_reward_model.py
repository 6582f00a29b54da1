"""Value-head reward model: numpy BCE reference, parameter tree, sharding, learning."""
import string

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kimi_jax.data.tokenizer import char_tokenizer
from kimi_jax.model import ModelConfig, apply_lm, init_params
from kimi_jax.rewards.judge import RMExample
from kimi_jax.sharding.rules import make_mesh
from kimi_jax.training.reward_model import (ValueHeadRewardModel, final_hidden_states,
                                            init_rm_state, init_value_head, rm_batch, rm_input_ids,
                                            rm_logits, rm_loss, rm_probabilities, rm_step)
from kimi_jax.training.steps import jit_step

TOKENIZER = char_tokenizer(string.ascii_lowercase + string.digits + " +")
CFG = ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=4, head_dim=8)
# float32 forward/backward vs float64 numpy on O(1) values: 1e-5 relative.
F32_RTOL = 1e-5

# Jitted once here: eager op-by-op execution of the model is several times slower.
hidden_states = jax.jit(final_hidden_states, static_argnums=0)
logits_of = jax.jit(rm_logits, static_argnums=2)
loss_and_grads = jax.jit(jax.value_and_grad(rm_loss, has_aux=True), static_argnums=2)

EXAMPLES = [RMExample("1+2", "3", "three so 3"), RMExample("add two and two", "4", "5"),
            RMExample("9+0", "9", "it is 9")]
LABELS = [True, False, True]


def single_device_mesh():
  return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def rm_params(seed=0):
  lm_key, head_key = jax.random.split(jax.random.key(seed))
  return {"lm": jax.jit(init_params, static_argnums=0)(CFG, lm_key),
          "value_head": init_value_head(CFG, head_key)}


# ------------------------------------------------------------------------- input format


def test_rm_batch_layout_and_errors():
  batch = rm_batch(EXAMPLES, TOKENIZER, 32, LABELS)
  bos, eos, pad = TOKENIZER.bos_id, TOKENIZER.eos_id, TOKENIZER.pad_id
  expected = [bos, *TOKENIZER.encode("1+2"), eos, *TOKENIZER.encode("3"), eos,
              *TOKENIZER.encode("three so 3"), eos]
  assert batch["tokens"][0].tolist() == expected + [pad] * (32 - len(expected))
  lengths = [len(expected), 1 + 15 + 1 + 1 + 1 + 1 + 1, 1 + 3 + 1 + 1 + 1 + 7 + 1]
  np.testing.assert_array_equal(batch["last_index"], np.array(lengths) - 1)
  assert np.all(batch["tokens"][np.arange(3), batch["last_index"]] == eos)
  np.testing.assert_array_equal(batch["labels"], [1.0, 0.0, 1.0])
  assert "labels" not in rm_batch(EXAMPLES, TOKENIZER, 32)
  fits = len(rm_input_ids(EXAMPLES[0], TOKENIZER))
  rm_batch(EXAMPLES[:1], TOKENIZER, fits)
  with pytest.raises(ValueError, match=f"example 1: {fits + 1} tokens, more than seq_len={fits}"):
    rm_batch([EXAMPLES[0], RMExample("1+22", "3", "three so 3")], TOKENIZER, fits)
  with pytest.raises(ValueError, match="labels has 2 entries"):
    rm_batch(EXAMPLES, TOKENIZER, 32, LABELS[:2])


# ------------------------------------------------------------ loss and gradient vs numpy


def test_final_hidden_states_are_the_lm_hidden_states():
  params = rm_params()["lm"]
  tokens = rm_batch(EXAMPLES, TOKENIZER, 32)["tokens"]
  hidden_BxTxD = hidden_states(CFG, params, tokens)
  logits_BxTxV = np.asarray(hidden_BxTxD) @ np.asarray(params["lm_head"]["kernel"])
  # Same float32 matmul as the LM head, different blocking: 1e-5 relative, 1e-6 absolute.
  np.testing.assert_allclose(logits_BxTxV, jax.jit(apply_lm, static_argnums=0)(CFG, params, tokens), rtol=F32_RTOL, atol=1e-6)


def numpy_bce(params, batch):
  """(loss, d loss / d kernel, d loss / d bias, d loss / d last hidden) in float64."""
  hidden = np.asarray(hidden_states(CFG, params["lm"], batch["tokens"]), np.float64)
  rows = np.arange(len(hidden))
  last_BxD = hidden[rows, batch["last_index"]]
  kernel = np.asarray(params["value_head"]["kernel"], np.float64)
  z_B = last_BxD @ kernel + float(params["value_head"]["bias"])
  y_B = batch["labels"].astype(np.float64)
  loss = np.mean(np.logaddexp(0.0, z_B) - y_B * z_B)
  dz_B = (1.0 / (1.0 + np.exp(-z_B)) - y_B) / len(z_B)
  return loss, dz_B @ last_BxD, dz_B.sum(), dz_B[:, None] * kernel


def test_bce_loss_and_gradients_match_numpy():
  params = rm_params()
  batch = rm_batch(EXAMPLES, TOKENIZER, 32, LABELS)
  (loss, metrics), grads = loss_and_grads(params, batch, CFG)
  ref_loss, ref_dkernel, ref_dbias, ref_dlast_BxD = numpy_bce(params, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=F32_RTOL)
  np.testing.assert_allclose(grads["value_head"]["kernel"], ref_dkernel, rtol=F32_RTOL, atol=1e-7)
  np.testing.assert_allclose(grads["value_head"]["bias"], ref_dbias, rtol=F32_RTOL, atol=1e-7)
  logits_B = logits_of(params, batch, CFG)
  accuracy = np.mean((np.asarray(logits_B) > 0) == np.array(LABELS))
  assert float(metrics["accuracy"]) == pytest.approx(accuracy, rel=1e-6)  # float32 of a/3

  # LM gradient: the numpy cotangent placed at the last non-pad token only, pulled back
  # through the LM's hidden states.
  cotangent_BxTxD = np.zeros((len(EXAMPLES), 32, CFG.hidden_size), np.float32)
  cotangent_BxTxD[np.arange(len(EXAMPLES)), batch["last_index"]] = ref_dlast_BxD
  pull_back = jax.jit(lambda lm, ct: jax.vjp(
      lambda l: final_hidden_states(CFG, l, batch["tokens"]), lm)[1](ct)[0])
  ref_lm_grads = pull_back(params["lm"], jnp.asarray(cotangent_BxTxD))
  for got, want in zip(jax.tree.leaves(grads["lm"]), jax.tree.leaves(ref_lm_grads)):
    # Scale-relative: tiny-gradient entries carry float32 round-off of the largest ones.
    np.testing.assert_allclose(got, want, atol=F32_RTOL * float(np.abs(want).max()) + 1e-9)
  assert not np.any(np.asarray(grads["lm"]["lm_head"]["kernel"]))  # unembedding unused


def test_compiled_loss_skips_the_unembedding():
  hlo = jax.jit(jax.grad(lambda p, b: rm_loss(p, b, CFG)[0])).lower(
      rm_params(), rm_batch(EXAMPLES, TOKENIZER, 32, LABELS)).compile().as_text()
  dots = [line for line in hlo.splitlines() if " dot(" in line]
  assert any("layers_1/mlp" in line for line in dots)  # the metadata does name modules
  assert not any("lm_head" in line for line in dots)


def test_score_ignores_padding_and_reads_the_last_token():
  params = rm_params()
  short, long = rm_batch(EXAMPLES, TOKENIZER, 24), rm_batch(EXAMPLES, TOKENIZER, 40)
  garbage = long["tokens"].copy()
  for row, last in enumerate(long["last_index"]):
    garbage[row, last + 1:] = np.arange(garbage.shape[1] - last - 1) % CFG.vocab_size
  reference_B = np.asarray(logits_of(params, short, CFG))
  for batch in (long, {**long, "tokens": garbage}):
    # Same causal prefix, longer padded tail: only reduction blocking differs.
    np.testing.assert_allclose(logits_of(params, batch, CFG), reference_B, rtol=F32_RTOL, atol=1e-6)
  moved = {**short, "last_index": short["last_index"] - 1}
  assert np.all(np.abs(np.asarray(logits_of(params, moved, CFG)) - reference_B) > 1e-4)


# --------------------------------------------------------------- state, sharding, scoring


def test_rm_state_keeps_lm_params_unchanged_and_mirrors_shardings():
  lm_params = init_params(CFG, jax.random.key(3))
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  state, _ = init_rm_state(CFG, optax.adam(1e-3), mesh, lm_params, jax.random.key(4))
  assert set(state.params) == {"lm", "value_head"}
  assert jax.tree.structure(state.params["lm"]) == jax.tree.structure(lm_params)
  for got, want in zip(jax.tree.leaves(state.params["lm"]), jax.tree.leaves(lm_params)):
    np.testing.assert_array_equal(got, want)
  assert state.params["value_head"]["kernel"].shape == (CFG.hidden_size,)
  assert state.params["value_head"]["bias"].shape == ()
  gate = state.params["lm"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
  assert not gate.sharding.is_fully_replicated
  assert state.opt_state[0].mu["lm"]["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding == gate.sharding
  head = state.params["value_head"]["kernel"]
  assert state.opt_state[0].nu["value_head"]["kernel"].sharding == head.sharding


def two_steps(mesh):
  state, shardings = init_rm_state(CFG, optax.adam(1e-3), mesh, init_params(CFG, jax.random.key(0)),
                                   jax.random.key(1))
  step = jit_step(rm_step, mesh, shardings, config=CFG)
  batch = rm_batch(EXAMPLES + [RMExample("2+2", "4", "4")], TOKENIZER, 32, LABELS + [True])
  losses = []
  for _ in range(2):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params["value_head"])


def test_sharded_rm_step_equals_single_device():
  sharded_losses, sharded_head = two_steps(make_mesh(data=2, fsdp=2, tensor=2))
  single_losses, single_head = two_steps(single_device_mesh())
  # float32 with different reduction orders across 8 shards: 1e-5 relative.
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=F32_RTOL)
  np.testing.assert_allclose(sharded_head["kernel"], single_head["kernel"], rtol=1e-4, atol=1e-6)
  assert sharded_losses[1] < sharded_losses[0]


def test_value_head_rm_scores_in_padded_batches():
  mesh = single_device_mesh()
  state, shardings = init_rm_state(CFG, optax.adam(1e-3), mesh, init_params(CFG, jax.random.key(0)),
                                   jax.random.key(1))
  examples = EXAMPLES * 2 + EXAMPLES[:1]  # 7 examples: batches of 4 and 3 (+1 padding row)
  model = ValueHeadRewardModel(state, shardings, mesh, CFG, TOKENIZER, seq_len=32, batch_size=4)
  scores = model.score(examples)
  logits = logits_of(state.params, rm_batch(examples, TOKENIZER, 32), CFG)
  np.testing.assert_allclose(scores, jax.nn.sigmoid(logits), rtol=F32_RTOL)
  np.testing.assert_allclose(
      rm_probabilities(state, rm_batch(examples, TOKENIZER, 32), CFG), scores, rtol=F32_RTOL)
  assert model.score([]).shape == (0,)
  with pytest.raises(ValueError, match="batch_size=3 must be a multiple of data\\*fsdp=4"):
    ValueHeadRewardModel(state, shardings, make_mesh(data=2, fsdp=2, tensor=2), CFG, TOKENIZER,
                         seq_len=32, batch_size=3)


# ------------------------------------------------------------------------------ learning

def answer_check_data(rng, n, held_out):
  """Random 3-letter questions, reference and response single digits, label = they are equal
  (half of them). Held-out questions are those whose character codes sum to 0 mod 4, so they
  are never seen in training; a grader ignoring either digit scores 0.5."""
  examples, labels = [], []
  while len(examples) < n:
    question = "".join(rng.choice(list(string.ascii_lowercase), 3))
    if (sum(map(ord, question)) % 4 == 0) != held_out:
      continue
    reference = int(rng.integers(10))
    correct = bool(rng.random() < 0.5)
    answer = reference if correct else rng.choice([d for d in range(10) if d != reference])
    examples.append(RMExample(question, str(reference), str(answer)))
    labels.append(correct)
  return examples, labels


@pytest.mark.slow
def test_value_head_rm_learns_answer_checking():
  num_steps, batch_size, seq_len = 800, 64, 16
  mesh = single_device_mesh()
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 5e-3, 50, num_steps))
  state, shardings = init_rm_state(CFG, tx, mesh, init_params(CFG, jax.random.key(0)),
                                   jax.random.key(7))
  step = jit_step(rm_step, mesh, shardings, config=CFG)
  rng = np.random.default_rng(10)
  for _ in range(num_steps):
    examples, labels = answer_check_data(rng, batch_size, held_out=False)
    state, _ = step(state, rm_batch(examples, TOKENIZER, seq_len, labels))
  held_out, labels = answer_check_data(np.random.default_rng(1), 256, held_out=True)
  scores = ValueHeadRewardModel(state, shardings, mesh, CFG, TOKENIZER, seq_len, 64).score(held_out)
  accuracy = np.mean((scores > 0.5) == np.array(labels))
  # Chance is 0.5 (std 0.03 over 256 examples); seeds 0-7 of this setup reached 0.96-1.0.
  assert accuracy >= 0.9, accuracy
