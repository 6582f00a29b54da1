"""Prompt loaders: every bad row reported with file/line/field, GSM8K and MATH answers, images."""
import base64
import io
import json
import os

import PIL.Image

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kimi_jax.data import sources
from kimi_jax.data.sources import (MATH, DataValidationError, Prompt, RowError, Schema,
                                   boxed_answer, gsm8k_answer, load_gsm8k, load_math,
                                   load_prompts, read_prompts)


def write_jsonl(path, lines):
  path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
  return str(path)


GOOD = {"question": "1+1?", "answer": "2", "id": "a", "difficulty": 1, "domain": "arith"}


def test_jsonl_every_bad_row_reported_with_file_line_field(tmp_path):
  path = write_jsonl(tmp_path / "set.jsonl", [
      GOOD,                                               # line 1 ok
      {"question": "q2", "answer": 5},                    # line 2 ok: integer answer, no id
      "{not json",                                        # line 3
      {"question": "q4"},                                 # line 4: answer missing
      {"question": "q5", "answer": "x", "difficulty": "hard"},  # line 5
      "",                                                 # line 6: blank, not a row
      {"question": "  ", "answer": "1", "domain": ["x"]},  # line 7: two bad fields
      {"question": "q8", "answer": "1", "id": "a"},       # line 8: duplicate id
      [1, 2],                                             # line 9: not an object
  ])
  prompts, errors = read_prompts(path)
  assert prompts == [Prompt(question="1+1?", answer="2", id="a", difficulty=1, domain="arith"),
                     Prompt(question="q2", answer="5", id="set-2")]
  assert [(e.file, e.line, e.field) for e in errors] == [
      (path, 3, "<json>"), (path, 4, "answer"), (path, 5, "difficulty"), (path, 7, "question"),
      (path, 7, "domain"), (path, 8, "id"), (path, 9, "<row>")]
  assert "first on line 1" in errors[5].message

  with pytest.raises(DataValidationError) as excinfo:
    load_prompts(path)
  assert excinfo.value.errors == errors
  message = str(excinfo.value)
  assert message.startswith("7 malformed row(s)")
  assert f"{path}:5: field 'difficulty'" in message


def test_parquet_rows_numbered_from_one(tmp_path):
  path = str(tmp_path / "set.parquet")
  pq.write_table(pa.Table.from_pylist([
      {"problem": "p1", "solution": "so \\boxed{\\frac{1}{2}}", "level": "Level 3",
       "type": "Algebra"},
      {"problem": "p2", "solution": "no box here", "level": "Level ?", "type": "Geometry"},
  ]), path)
  prompts, errors = read_prompts(path, MATH)
  assert prompts == [Prompt(question="p1", answer="\\frac{1}{2}", id="set-1", difficulty=3,
                            domain="Algebra")]
  assert errors == [RowError(path, 2, "solution", errors[0].message),
                    RowError(path, 2, "level", "expected 'Level N', got 'Level ?'")]
  assert "no \\boxed{} answer" in errors[0].message
  with pytest.raises(DataValidationError, match="set.parquet:2: field 'solution'"):
    load_math(path)


def test_unsupported_extension(tmp_path):
  with pytest.raises(ValueError, match="unsupported file type '.csv'"):
    read_prompts(str(tmp_path / "x.csv"))


def test_custom_schema_keys(tmp_path):
  path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "gold": "7", "uid": "u1"}])
  schema = Schema(question="prompt", answer="gold", id="uid")
  assert load_prompts(path, schema) == [Prompt(question="q", answer="7", id="u1")]


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are content
    ("first \\boxed{1} then \\boxed{x^{2}}", "x^{2}"),  # the last box wins
    ("$\\boxed 5$", "5"),
    ("\\fbox{3}", "3"),
    ("\\boxed{a \\\\}", "a \\\\"),  # "\\\\" is a LaTeX line break, the brace after it closes
    ("\\boxed{unbalanced", None),
    ("\\boxed{a\\}", None),  # only an escaped brace: never closed
    ("no answer", None),
])
def test_boxed_answer(text, expected):
  assert boxed_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("a\n#### 18", "18"), ("x #### 1,450,000 ", "1450000"), ("#### 1\n#### -2", "-2"),
    ("no marker 3", None), ("####   ", None)])
def test_gsm8k_answer(text, expected):
  assert gsm8k_answer(text) == expected


def test_gsm8k_shared_test_split():
  prompts = load_gsm8k()
  assert len(prompts) == 1319  # GSM8K's test split
  assert prompts[0].answer == "18" and prompts[0].question.startswith("Janet")
  assert prompts[2].answer == "70000"
  assert all(p.answer.lstrip("-").isdigit() for p in prompts)  # commas stripped everywhere
  assert len({p.id for p in prompts}) == 1319 and {p.domain for p in prompts} == {"math"}


def test_shared_data_path_env_override(tmp_path, monkeypatch):
  (tmp_path / "gsm8k").mkdir()
  write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "q", "answer": "r\n#### 4"}])
  monkeypatch.setenv(sources.SHARED_DATA_ENV, str(tmp_path))
  assert sources.shared_data_path("gsm8k") == os.path.join(str(tmp_path), "gsm8k")
  assert load_gsm8k() == [Prompt(question="q", answer="4", id="test-1", domain="math")]


def test_code_rows_tests_become_the_code_rewards_answer(tmp_path):
  from kimi_jax.rewards.code import parse_tests
  path = tmp_path / "code.jsonl"
  rows = [{"question": "Print a+b.", "tests": [{"input": "1 2\n", "output": "3\n"},
                                                 {"input": "5 5\n", "output": "10\n"}]},
          {"question": "Broken.", "tests": [{"input": "1"}]},
          {"question": "No tests.", "tests": []}]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  prompts, errors = sources.read_prompts(str(path), sources.CODE)
  assert parse_tests(prompts[0].answer) == [("1 2\n", "3\n"), ("5 5\n", "10\n")]
  assert [(e.line, e.field) for e in errors] == [(2, "tests"), (3, "tests")]
  assert "test 0" in errors[0].message and "non-empty" in errors[1].message


def test_rows_with_images(tmp_path):
  (tmp_path / "pics").mkdir()
  PIL.Image.new("RGB", (30, 20), "red").save(tmp_path / "pics" / "a.png")
  png = io.BytesIO()
  PIL.Image.new("L", (9, 7)).save(png, format="PNG")
  encoded = base64.b64encode(png.getvalue()).decode()
  (tmp_path / "not_image.txt").write_text("hello")
  path = write_jsonl(tmp_path / "vision.jsonl", [
      {"question": "q1", "answer": "1", "images": ["pics/a.png", encoded]},   # line 1 ok
      {"question": "q2", "answer": "2", "images": [f"data:image/png;base64,{encoded}"]},  # ok
      {"question": "q3", "answer": "3", "images": "pics/a.png"},              # line 3: not a list
      {"question": "q4", "answer": "4", "images": ["pics/a.png", "pics/b.png"]},  # 4: missing
      {"question": "q5", "answer": "5", "images": ["not_image.txt"]},         # 5: not an image
      {"question": "q6", "answer": "6", "images": [3]},                       # 6: not a string
      {"question": "q7", "answer": "7", "images": ["data:image/png;base64,@@"]},  # 7: bad base64
  ])
  prompts, errors = read_prompts(path)
  assert prompts == [
      Prompt(question="q1", answer="1", id="vision-1",
             images=(str(tmp_path / "pics" / "a.png"), encoded)),
      Prompt(question="q2", answer="2", id="vision-2", images=(f"data:image/png;base64,{encoded}",))]
  assert [(e.line, e.field) for e in errors] == [(line, "images") for line in range(3, 8)]
  messages = [e.message for e in errors]
  assert "expected a list" in messages[0]
  assert messages[1].startswith("image 1: pics/b.png: no such file")
  assert messages[2].startswith("image 0: ") and "not a decodable image" in messages[2]
  assert "expected a non-empty string" in messages[3]
  assert "invalid base64" in messages[4]
  with pytest.raises(DataValidationError, match=f"{path}:4: field 'images': image 1"):
    load_prompts(path)


def test_invalid_utf8_is_reported_with_file_line_and_column(tmp_path):
  path = tmp_path / "set.jsonl"
  path.write_bytes(json.dumps(GOOD).encode() + b'\n{"question": "caf\xe9?", "answer": "1"}\n'
                   + json.dumps({**GOOD, "id": "b"}).encode() + b"\n")
  prompts, errors = read_prompts(str(path))
  assert [p.id for p in prompts] == ["a", "b"]  # the lines around the bad one are still read
  assert [(e.file, e.line) for e in errors] == [(str(path), 2)]
  assert f"{path}:2: not UTF-8" in errors[0].message and "column 18" in errors[0].message
