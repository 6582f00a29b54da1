"""Text corpora for the pretraining / cooldown / long-context stages: documents -> LM windows.

Documents are tokenized, each followed by eos, and laid end to end in one stream, which is cut
into windows of seq_len + 1 tokens (consecutive windows share one token). A window is one batch
row: `tokens`/`targets`, `segment_ids` per document (attention never crosses a document
boundary), `positions` counting from each document's start (RoPE sees in-document distances),
and `loss_mask` on every target of the same document as its input (nothing is predicted across
a boundary). The stream is held in memory (three int32 per token): a research-scale corpus.
"""
import json
import os
from typing import Sequence

import grain
import numpy as np

from kimi_jax.data import synthetic
from kimi_jax.data.epochs import EpochIterator, epoch_order
from kimi_jax.data.sources import (DataValidationError, NotUtf8, RowError, as_nonempty_text,
                                   text_lines)
from kimi_jax.sharding.processes import Processes, this_job

TEXT_FIELD = "text"


def _jsonl_documents(path: str) -> list[str]:
  documents, errors = [], []
  for line_number, line in text_lines(path):
    if isinstance(line, NotUtf8):
      errors.append(RowError(file=path, line=line_number, field="<text>", message=str(line)))
      continue
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or TEXT_FIELD not in row:
        raise ValueError(f"expected an object with a {TEXT_FIELD!r} key")
      documents.append(as_nonempty_text(row[TEXT_FIELD]))
    except ValueError as e:  # json.JSONDecodeError is a ValueError
      errors.append(RowError(file=path, line=line_number, field=TEXT_FIELD, message=str(e)))
  if errors:
    raise DataValidationError(errors)
  return documents


def _text_documents(path: str) -> list[str]:
  lines = [line for _, line in text_lines(path)]
  bad = [line for line in lines if isinstance(line, NotUtf8)]
  if bad:
    raise bad[0]
  return [block.strip() for block in "".join(lines).split("\n\n") if block.strip()]


def read_documents(path: str) -> list[str]:
  """Documents of a .jsonl file ({"text": ...} per line; every bad line is reported with its
  number) or a .txt file (documents separated by blank lines)."""
  readers = {".jsonl": _jsonl_documents, ".txt": _text_documents}
  suffix = os.path.splitext(path)[1]
  if suffix not in readers:
    raise ValueError(f"{path}: corpus files must be {sorted(readers)}, not {suffix!r}")
  documents = readers[suffix](path)
  if not documents:
    raise ValueError(f"{path}: no documents")
  return documents


class TokenStream:
  """Documents (token ids) laid end to end, each closed by eos, with per-token document index
  and in-document position."""

  def __init__(self, documents: Sequence[Sequence[int]], eos_id: int):
    if not documents:
      raise ValueError("no documents")
    closed = [list(doc) + [eos_id] for doc in documents]
    self.tokens = np.concatenate([np.asarray(d, np.int32) for d in closed])
    self.document = np.repeat(np.arange(len(closed), dtype=np.int32), [len(d) for d in closed])
    self.position = np.concatenate([np.arange(len(d), dtype=np.int32) for d in closed])

  def num_windows(self, seq_len: int) -> int:
    return (len(self.tokens) - 1) // seq_len

  def window(self, index: int, seq_len: int) -> dict[str, np.ndarray]:
    """Row `index`: stream tokens [index * seq_len, (index + 1) * seq_len] as input/target."""
    span = slice(index * seq_len, index * seq_len + seq_len + 1)
    tokens, document, position = self.tokens[span], self.document[span], self.position[span]
    return {"tokens": tokens[:-1], "targets": tokens[1:],
            "loss_mask": (document[1:] == document[:-1]).astype(np.float32),
            "segment_ids": document[:-1] - document[0] + 1, "positions": position[:-1]}


class CorpusBatches(grain.IterDataset):
  """Endless batches of windows; each epoch visits every window once in a (seed, epoch) order.

  Only this process's rows (windows) of each batch are built (`processes`, by default this job's).
  Iterator state: {"epoch", "offset"}, JSON-serialisable.
  """

  def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int,
               processes: Processes | None = None):
    super().__init__()
    if stream.num_windows(seq_len) < 1:
      raise ValueError(f"corpus of {len(stream.tokens)} tokens is shorter than one window of "
                       f"seq_len={seq_len} + 1")
    processes = processes or this_job()
    processes.rows(batch_size)  # fails here if the batch does not split over the processes
    self.stream, self.batch_size, self.seq_len, self.seed = stream, batch_size, seq_len, seed
    self.processes = processes

  def order(self, epoch: int) -> np.ndarray:
    return epoch_order(self.seed, epoch, self.stream.num_windows(self.seq_len))

  def __iter__(self) -> "CorpusBatchIterator":
    return CorpusBatchIterator(self)


class CorpusBatchIterator(EpochIterator):
  def __init__(self, dataset: CorpusBatches):
    super().__init__(dataset.stream.num_windows(dataset.seq_len), dataset.seed)
    self._ds = dataset

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    rows = [self._ds.stream.window(index, self._ds.seq_len)
            for index in self.take_rows(self._ds.batch_size, self._ds.processes)]
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


WORKSHEETS = "worksheets"


def worksheet_documents(corpus_config, task_config, seed: int) -> list[str]:
  """`num_documents + heldout_documents` worksheets (`synthetic.worksheet`) of
  min..max_problems problems each, drawn from the task's levels."""
  rng = np.random.default_rng([seed, len(WORKSHEETS)])
  sizes = rng.integers(corpus_config.min_problems, corpus_config.max_problems + 1,
                       size=corpus_config.num_documents + corpus_config.heldout_documents)
  return [synthetic.worksheet(rng, int(n), tuple(task_config.levels), task_config.max_operand)
          for n in sizes]


def corpus_documents(corpus_config, task_config, seed: int) -> tuple[list[str], list[str]]:
  """(training, held-out) documents of the `corpus` config section: synthetic worksheets or a
  file; the held-out ones are the last `heldout_documents`."""
  source = corpus_config.source
  if source == WORKSHEETS:
    documents = worksheet_documents(corpus_config, task_config, seed)
  else:
    documents = read_documents(source)
  if len(documents) <= corpus_config.heldout_documents:
    raise ValueError(f"config.corpus.source={source!r}: {len(documents)} documents, need more "
                     f"than corpus.heldout_documents={corpus_config.heldout_documents}")
  return documents[:-corpus_config.heldout_documents], documents[-corpus_config.heldout_documents:]
