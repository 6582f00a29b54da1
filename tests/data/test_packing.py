"""SFT tokenisation and packing: response-only loss, examples never see each other."""
import json

import jax
import numpy as np
import pytest

from kimi_jax.data.packing import (PLAIN, ChatTemplate, Example, PackedBatches,
                               encode_example, encode_prompt, pack_examples, plan_rows)
from kimi_jax.sharding.processes import Processes
from kimi_jax.data.synthetic import CHARSET, make_dataset, solve, target_response
from kimi_jax.data.tokenizer import char_tokenizer
from kimi_jax.model import ModelConfig, init_params
from kimi_jax.model.logprobs import token_logprobs
from tests.data.read_recorder import ReadRecorder

PAD = 0


class WordTokenizer:
  """Test double: one id per distinct whitespace-free character run seen so far."""
  bos_id, eos_id, pad_id = 1, 2, PAD

  def __init__(self):
    self.vocab = {}

  def encode(self, text):
    return [self.vocab.setdefault(ch, len(self.vocab) + 3) for ch in text]


def test_template_layout_and_response_only_mask():
  tok = WordTokenizer()
  template = ChatTemplate(prefix="<", suffix=">", add_bos=True)
  example = encode_example(tok, template, "ab", "cd")
  prompt_ids = [tok.bos_id] + tok.encode("<ab>")
  assert encode_prompt(tok, template, "ab") == prompt_ids
  assert example.tokens.tolist() == prompt_ids + tok.encode("cd") + [tok.eos_id]
  assert example.trained.tolist() == [False] * 5 + [True] * 3  # response and eos only
  plain = encode_example(tok, PLAIN, "ab", "")
  assert plain.tokens.tolist() == tok.encode("ab") + [tok.eos_id]
  assert plain.trained.tolist() == [False, False, True]


def test_template_errors():
  class NoBos(WordTokenizer):
    bos_id = None
  with pytest.raises(ValueError, match="tokenizer has no bos token"):
    encode_prompt(NoBos(), ChatTemplate(add_bos=True), "q")
  with pytest.raises(ValueError, match="empty prompt"):
    encode_prompt(WordTokenizer(), PLAIN, "")


def random_examples(rng, count, max_len):
  examples = []
  for _ in range(count):
    prompt_len, response_len = rng.integers(1, max_len // 2, size=2)
    tokens = rng.integers(3, 50, prompt_len + response_len).astype(np.int32)
    examples.append(Example(tokens, np.arange(len(tokens)) >= prompt_len))
  return examples


def next_fit_rows(lengths, seq_len):
  """Reference: row count of next-fit with length - 1 slots per example."""
  rows, free = 0, 0
  for length in lengths:
    if length - 1 > free:
      rows, free = rows + 1, seq_len
    free -= length - 1
  return rows


def unpack(batch):
  """Reconstruct every example from the packed arrays, checking the per-slot invariants."""
  examples = []
  for r in range(batch["tokens"].shape[0]):
    segments = batch["segment_ids"][r]
    used = np.flatnonzero(segments)
    assert np.all(segments[len(used):] == 0), "padding only at the end of a row"
    assert np.all(np.diff(segments[used]) >= 0) and segments[0] in (0, 1)
    for s in np.unique(segments[used]):
      slots = np.flatnonzero(segments == s)
      assert np.array_equal(slots, np.arange(slots[0], slots[-1] + 1)), "segment is contiguous"
      assert np.array_equal(batch["positions"][r, slots], np.arange(len(slots)))
      tokens = np.append(batch["tokens"][r, slots], batch["targets"][r, slots[-1]])
      # targets are the same example's next tokens: no target crosses into the next example
      assert np.array_equal(batch["targets"][r, slots], tokens[1:])
      examples.append((tokens, batch["loss_mask"][r, slots]))
    pad = segments == 0
    assert np.all(batch["loss_mask"][r, pad] == 0) and np.all(batch["tokens"][r, pad] == PAD)
  return examples


@pytest.mark.parametrize("seed", range(5))
def test_packing_round_trips_every_example(seed):
  rng = np.random.default_rng(seed)
  examples = random_examples(rng, 30, max_len=17)
  batch = pack_examples(examples, seq_len=16, pad_id=PAD)
  assert batch["tokens"].shape == (next_fit_rows(map(len, examples), 16), 16)
  assert {k: v.shape for k, v in batch.items()} == dict.fromkeys(batch, batch["tokens"].shape)
  recovered = unpack(batch)
  assert len(recovered) == len(examples)
  for (tokens, loss_mask), example in zip(recovered, examples):
    assert np.array_equal(tokens, example.tokens)
    assert np.array_equal(loss_mask, example.trained[1:])  # loss where the target is trained


def test_packed_logprobs_equal_unpacked():
  # The model sees a packed row exactly as it sees each example alone, so neither attention
  # nor the loss crosses an example boundary. float32, tiny model: differences are rounding.
  tolerance = 1e-5
  config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8)
  params = init_params(config, jax.random.key(0))
  examples = random_examples(np.random.default_rng(0), 7, max_len=13)
  packed = pack_examples(examples, seq_len=24, pad_id=PAD)
  assert packed["tokens"].shape[0] < len(examples)  # rows really hold several examples
  width = max(map(len, examples)) - 1
  alone = {"tokens": np.zeros((len(examples), width), np.int32),
           "targets": np.zeros((len(examples), width), np.int32)}
  for i, e in enumerate(examples):  # right padding is invisible to earlier tokens (causal)
    alone["tokens"][i, :len(e) - 1], alone["targets"][i, :len(e) - 1] = e.tokens[:-1], e.tokens[1:]
  logprobs = jax.jit(token_logprobs, static_argnums=0)
  logp_packed = np.asarray(logprobs(config, params, packed))
  logp_alone = np.asarray(logprobs(config, params, alone))
  i = 0
  for r in range(packed["tokens"].shape[0]):
    for s in np.unique(packed["segment_ids"][r][packed["segment_ids"][r] > 0]):
      slots = packed["segment_ids"][r] == s
      np.testing.assert_allclose(logp_packed[r, slots], logp_alone[i, :slots.sum()],
                                 atol=tolerance, rtol=0)
      i += 1
  assert i == len(examples)


def test_examples_that_do_not_fit_are_reported():
  examples = random_examples(np.random.default_rng(0), 3, max_len=8)
  too_long = Example(np.arange(3, 14, dtype=np.int32), np.ones(11, bool))
  with pytest.raises(ValueError, match="example 3: 11 tokens; a row of seq_len 8 takes 2..9"):
    pack_examples(examples + [too_long], seq_len=8, pad_id=PAD)
  with pytest.raises(ValueError, match="example 1: 11 tokens"):
    PackedBatches([examples[0], too_long], batch_size=2, seq_len=8, pad_id=PAD, seed=0)


def test_plan_rows_stops_at_row_budget():
  # slots per example: 3, 3, 3, 2, 4 with rows of 6 -> [0, 1] [2, 3] [4]
  assert plan_rows([4, 4, 4, 3, 5], seq_len=6) == [[0, 1], [2, 3], [4]]
  assert plan_rows([4, 4, 4, 3, 5], seq_len=6, num_rows=2) == [[0, 1], [2, 3]]


def test_packed_batches_cover_epochs_and_resume():
  examples = random_examples(np.random.default_rng(1), 11, max_len=9)
  dataset = PackedBatches(examples, batch_size=3, seq_len=12, pad_id=PAD, seed=4)
  it = iter(dataset)
  seen = []
  for _ in range(4):
    seen += [tuple(tokens) for tokens, _ in unpack(next(it))]
  state = json.loads(json.dumps(it.get_state()))
  # The stream is epoch 0's permutation, then epoch 1's, ...: every example once per epoch.
  stream = [tuple(examples[i].tokens) for e in range(10) for i in dataset.order(e)]
  assert seen == stream[:len(seen)] and len(seen) > len(examples)
  assert state == {"epoch": len(seen) // 11, "offset": len(seen) % 11}
  assert not np.array_equal(dataset.order(0), dataset.order(1))

  resumed = iter(dataset)
  resumed.set_state(state)
  for _ in range(3):
    expected, got = next(it), next(resumed)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("count", [2, 4])
def test_each_process_packs_only_its_rows_of_the_one_process_batch(count):
  examples = random_examples(np.random.default_rng(2), 40, max_len=9)
  index_of = {tuple(e.tokens): i for i, e in enumerate(examples)}
  assert len(index_of) == len(examples)
  whole = iter(PackedBatches(examples, batch_size=8, seq_len=12, pad_id=PAD, seed=3))
  recorders = [ReadRecorder(examples) for _ in range(count)]
  shares = [iter(PackedBatches(r, 8, 12, PAD, 3, Processes(i, count, None)))
            for i, r in enumerate(recorders)]
  for _ in range(6):  # past the end of epoch 0: 6 batches of 8 rows hold > 40 examples
    for recorder in recorders:
      recorder.reads.clear()
    expected = next(whole)
    parts = [next(it) for it in shares]
    for key in expected:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])
    per = 8 // count
    for i, recorder in enumerate(recorders):  # a process reads its own rows' examples only
      own = {k: v[i * per:(i + 1) * per] for k, v in expected.items()}
      assert sorted(recorder.reads) == sorted(index_of[tuple(tokens)] for tokens, _ in unpack(own))
  assert [it.get_state() for it in shares] == [whole.get_state()] * count


def test_a_batch_that_does_not_split_over_the_processes_is_refused():
  examples = random_examples(np.random.default_rng(0), 4, max_len=8)
  with pytest.raises(ValueError, match="6 batch rows do not split over 4 processes"):
    PackedBatches(examples, batch_size=6, seq_len=8, pad_id=PAD, seed=0,
                  processes=Processes(1, 4, None))


def test_synthetic_task_fits_the_demo_rows():
  tok = char_tokenizer(CHARSET)
  prompts = make_dataset(400, (1, 2, 3, 4), seed=0)
  examples = [encode_example(tok, PLAIN, p.question, target_response(solve(p.question)))
              for p in prompts]
  batch = next(iter(PackedBatches(examples, batch_size=8, seq_len=64, pad_id=tok.pad_id, seed=0)))
  text = tok.decode(batch["tokens"][0][batch["segment_ids"][0] == 1])
  assert text.split("=", 1)[0] + "=" in {p.question for p in prompts}
