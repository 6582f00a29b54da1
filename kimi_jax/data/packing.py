"""SFT examples: chat-template tokenisation, response-only loss masks and sequence packing.

Template: an example's tokens are
    [bos if template.add_bos] + encode(prefix + question + suffix)  |  encode(response) + [eos]
and only the tokens right of '|' are trained on. `encode_prompt` gives the left part alone, so
rollouts must use it to see prompts exactly as SFT did.

Packing (next-fit, in stream order): an example of L tokens fills L - 1 slots of a row, inputs
tokens[:-1] and targets tokens[1:], so a target never belongs to another example. Per slot:
segment_ids 1, 2, ... numbers the examples of a row (0 = padding), positions restart at 0 for
each example, loss_mask is 1 where the target is a trained token. The model's attention mask
(same segment, earlier position) then keeps examples apart.
"""
import dataclasses
from typing import Iterable, Sequence

import grain
import numpy as np

from kimi_jax.data.epochs import EpochIterator, epoch_order
from kimi_jax.sharding.processes import Processes, this_job


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """Text put around the question (e.g. a chat model's user/assistant markers)."""
  prefix: str = ""
  suffix: str = ""
  add_bos: bool = False


PLAIN = ChatTemplate()


@dataclasses.dataclass(frozen=True)
class Example:
  tokens: np.ndarray  # int32 [L]
  trained: np.ndarray  # bool [L]: response and eos tokens

  def __len__(self) -> int:
    return len(self.tokens)


def encode_prompt(tokenizer, template: ChatTemplate, question: str) -> list[int]:
  """Token ids of the templated prompt, the start of every example and rollout."""
  if template.add_bos and tokenizer.bos_id is None:
    raise ValueError("template.add_bos is set but the tokenizer has no bos token")
  bos = [tokenizer.bos_id] if template.add_bos else []
  ids = bos + tokenizer.encode(template.prefix + question + template.suffix)
  if not ids:
    raise ValueError("empty prompt: nothing to condition the response on")
  return ids


def example_from_ids(tokenizer, prompt_ids: list[int], response: str) -> Example:
  """Prompt ids | response ids + eos, only the right part trained."""
  completion = tokenizer.encode(response) + [tokenizer.eos_id]
  return Example(np.array(prompt_ids + completion, np.int32),
                 np.array([False] * len(prompt_ids) + [True] * len(completion)))


def encode_example(tokenizer, template: ChatTemplate, question: str, response: str) -> Example:
  return example_from_ids(tokenizer, encode_prompt(tokenizer, template, question), response)


def _slots(index: int, length: int, seq_len: int) -> int:
  if not 2 <= length <= seq_len + 1:
    raise ValueError(f"example {index}: {length} tokens; a row of seq_len {seq_len} takes "
                     f"2..{seq_len + 1}")
  return length - 1


def plan_rows(lengths: Iterable[int], seq_len: int, num_rows: int | None = None) -> list[list[int]]:
  """Next-fit: consecutive example indices per row, each example using length - 1 slots.

  Stops before the first example that does not fit once `num_rows` rows exist (reads at most
  one length past the last placed example).
  """
  rows, used = [], seq_len
  for index, length in enumerate(lengths):
    slots = _slots(index, length, seq_len)
    if used + slots > seq_len:
      if len(rows) == num_rows:
        break
      rows.append([])
      used = 0
    rows[-1].append(index)
    used += slots
  return rows


def pack(examples: Sequence[Example], rows: list[list[int]], seq_len: int,
         pad_id: int) -> dict[str, np.ndarray]:
  """Arrays [len(rows), seq_len]: tokens, targets, loss_mask, segment_ids, positions."""
  shape = (len(rows), seq_len)
  batch = {"tokens": np.full(shape, pad_id, np.int32), "targets": np.full(shape, pad_id, np.int32),
           "loss_mask": np.zeros(shape, np.float32), "segment_ids": np.zeros(shape, np.int32),
           "positions": np.zeros(shape, np.int32)}
  for r, row in enumerate(rows):
    start = 0
    for segment, index in enumerate(row, start=1):
      example = examples[index]
      end = start + len(example) - 1
      batch["tokens"][r, start:end] = example.tokens[:-1]
      batch["targets"][r, start:end] = example.tokens[1:]
      batch["loss_mask"][r, start:end] = example.trained[1:]
      batch["segment_ids"][r, start:end] = segment
      batch["positions"][r, start:end] = np.arange(end - start)
      start = end
  return batch


def pack_examples(examples: Sequence[Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """All of `examples`, in order, packed into as few rows as next-fit needs."""
  return pack(examples, plan_rows(map(len, examples), seq_len), seq_len, pad_id)


class PackedBatches(grain.IterDataset):
  """Endless packed SFT batches; each epoch visits the examples in a fresh (seed, epoch) order.

  Every process plans the whole batch of `batch_size` rows from the example lengths and packs
  only its own rows (`processes`, by default this job's): it reads no other example.
  Iterator state: {"epoch", "offset"} of the next example, JSON-serialisable.
  """

  def __init__(self, examples: Sequence[Example], batch_size: int, seq_len: int, pad_id: int,
               seed: int, processes: Processes | None = None):
    super().__init__()
    if not examples:
      raise ValueError("no SFT examples")
    self.lengths = [len(example) for example in examples]
    for index, length in enumerate(self.lengths):
      _slots(index, length, seq_len)
    processes = processes or this_job()
    processes.rows(batch_size)  # fails here if the batch does not split over the processes
    self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
    self.pad_id, self.seed, self.processes = pad_id, seed, processes

  def order(self, epoch: int) -> np.ndarray:
    return epoch_order(self.seed, epoch, len(self.examples))

  def __iter__(self) -> "PackedBatchIterator":
    return PackedBatchIterator(self)


class PackedBatchIterator(EpochIterator):
  def __init__(self, dataset: PackedBatches):
    super().__init__(len(dataset.examples), dataset.seed)
    self._ds = dataset

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    ds, window = self._ds, []

    def lengths():
      for index in self.upcoming():
        window.append(index)
        yield ds.lengths[index]

    rows = plan_rows(lengths(), ds.seq_len, ds.batch_size)
    own = [[window[i] for i in row] for row in rows[ds.processes.rows(ds.batch_size)]]
    self.advance(sum(map(len, rows)))
    return pack(ds.examples, own, ds.seq_len, ds.pad_id)
