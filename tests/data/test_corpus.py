"""Corpus windows: every token is a target exactly once, nothing crosses a document, state resumes."""
import json

import numpy as np
import pytest

from kimi_jax.data.corpus import CorpusBatches, TokenStream, read_documents
from kimi_jax.sharding.processes import Processes
from kimi_jax.data.sources import DataValidationError

EOS = 99


def documents(seed=0, n=7):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(0, 50, size=int(rng.integers(1, 30)))) for _ in range(n)]


def test_windows_cover_the_stream_and_respect_documents():
  docs = documents()
  stream = TokenStream(docs, EOS)
  seq_len = 8
  flat = [t for d in docs for t in d + [EOS]]
  owner = [i for i, d in enumerate(docs) for _ in range(len(d) + 1)]
  offset = [p for d in docs for p in range(len(d) + 1)]
  targets = []
  for w in range(stream.num_windows(seq_len)):
    row = stream.window(w, seq_len)
    start = w * seq_len
    np.testing.assert_array_equal(row["tokens"], flat[start:start + seq_len])
    np.testing.assert_array_equal(row["targets"], flat[start + 1:start + seq_len + 1])
    np.testing.assert_array_equal(row["positions"], offset[start:start + seq_len])
    for i in range(seq_len):
      same_doc = owner[start + i] == owner[start + i + 1]
      assert row["loss_mask"][i] == float(same_doc)  # never predict across a boundary
      for j in range(seq_len):  # equal segment id <=> same document
        assert (row["segment_ids"][i] == row["segment_ids"][j]) == (owner[start + i] ==
                                                                   owner[start + j])
    targets += [t for t, m in zip(row["targets"], row["loss_mask"]) if m]
  # Every within-document target of the covered stream is trained exactly once.
  covered = stream.num_windows(seq_len) * seq_len
  expected = [flat[k + 1] for k in range(covered) if owner[k] == owner[k + 1]]
  assert targets == expected


def test_batches_visit_every_window_per_epoch_and_resume_exactly():
  stream = TokenStream(documents(n=20), EOS)
  dataset = CorpusBatches(stream, batch_size=3, seq_len=8, seed=5)
  num_windows = stream.num_windows(8)
  it = iter(dataset)
  seen = []
  for _ in range(-(-num_windows // 3)):
    batch = next(it)
    seen += [tuple(row) for row in batch["tokens"]]
  all_windows = {tuple(stream.window(w, 8)["tokens"]) for w in range(num_windows)}
  assert set(seen[:num_windows]) == all_windows
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]
  fresh = iter(dataset)
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_each_process_builds_its_rows_of_the_one_process_batch():
  stream = TokenStream(documents(n=20), EOS)
  whole = iter(CorpusBatches(stream, batch_size=4, seq_len=8, seed=5))
  halves = [iter(CorpusBatches(stream, 4, 8, 5, Processes(i, 2, None))) for i in range(2)]
  for _ in range(stream.num_windows(8) // 4 + 2):  # into the second epoch
    expected, parts = next(whole), [next(it) for it in halves]
    for key in expected:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])
      assert parts[0][key].shape[0] == 2


def test_read_documents_reports_bad_lines(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_text('{"text": "a b"}\n{"txt": "x"}\n\nnot json\n{"text": ""}\n{"text": "ok"}\n')
  with pytest.raises(DataValidationError) as info:
    read_documents(str(path))
  lines = [e.line for e in info.value.errors]
  assert lines == [2, 4, 5] and all(e.field == "text" for e in info.value.errors)
  assert f"{path}:2" in str(info.value)
  text = tmp_path / "c.txt"
  text.write_text("first doc\nstill first\n\n\nsecond\n")
  assert read_documents(str(text)) == ["first doc\nstill first", "second"]
  with pytest.raises(ValueError, match="corpus files must be"):
    read_documents(str(tmp_path / "c.csv"))


def test_invalid_utf8_in_a_corpus_names_file_and_line(tmp_path):
  jsonl = tmp_path / "c.jsonl"
  jsonl.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n{"text": "b"}\n')
  with pytest.raises(DataValidationError) as info:
    read_documents(str(jsonl))
  assert [e.line for e in info.value.errors] == [2]
  assert f"{jsonl}:2: not UTF-8" in str(info.value)
  text = tmp_path / "c.txt"
  text.write_bytes(b"first doc\n\nsecond\nsecond \xc3\n")
  with pytest.raises(ValueError, match=f"{text}:4: not UTF-8"):
    read_documents(str(text))


def test_too_short_corpus_is_refused():
  with pytest.raises(ValueError, match="shorter than one window"):
    CorpusBatches(TokenStream([[1, 2]], EOS), batch_size=1, seq_len=8, seed=0)
