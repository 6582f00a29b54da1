"""Prompt sets from JSONL and Parquet files, validated row by row.

A row maps onto `Prompt` through a `Schema` (which key holds which field, and how the answer and
difficulty are parsed). Every malformed row becomes a `RowError` naming file, line and field;
`read_prompts` returns (prompts, errors) and `load_prompts` raises one `DataValidationError`
listing all of them, so no row is ever dropped silently. For Parquet the "line" is the 1-based
row number.

A row may carry `images`: a list of image file paths (relative ones are resolved against the
data file's directory) or base64 strings / `data:image/...;base64,` URLs; each must decode as an
image header. They reach `Prompt.images` (paths made absolute) and the model sees them before
the question text.

Answer formats: GSM8K ("... #### 1,234" -> "1234"), MATH (the last \\boxed{...} of the
solution, nested braces allowed), plain `answer`, and code (`tests: [{input, output}]`, stored
as the JSON pairs the code reward reads).
"""
import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Callable

import pyarrow.parquet as pq

from kimi_jax.data import images as image_inputs

SHARED_DATA_ENV = "KIMI_JAX_SHARED_DATA"
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prompt:
  """One RL prompt: the question, its reference answer and optional curriculum labels."""
  question: str
  answer: str
  id: str
  difficulty: int | None = None
  domain: str | None = None
  images: tuple[str, ...] = ()  # absolute file paths, base64 strings or data URLs


@dataclasses.dataclass(frozen=True)
class RowError:
  file: str
  line: int  # 1-based line (JSONL) or row (Parquet)
  field: str
  message: str

  def __str__(self) -> str:
    return f"{self.file}:{self.line}: field {self.field!r}: {self.message}"


class DataValidationError(ValueError):
  """Raised by `load_prompts`; `.errors` holds every bad row."""

  def __init__(self, errors: list[RowError]):
    self.errors = errors
    super().__init__(f"{len(errors)} malformed row(s):\n" + "\n".join(map(str, errors)))


def as_text(value: Any) -> str:
  """A string, or an integer written as one (answers are often numbers in JSON)."""
  if isinstance(value, str):
    return value
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  raise ValueError(f"expected a string, got {type(value).__name__} {value!r}")


def as_nonempty_text(value: Any) -> str:
  text = as_text(value)
  if not text.strip():
    raise ValueError("empty")
  return text


def as_int(value: Any) -> int:
  if isinstance(value, int) and not isinstance(value, bool):
    return value
  raise ValueError(f"expected an integer, got {type(value).__name__} {value!r}")


def gsm8k_answer(text: str) -> str | None:
  """The number after the last "####", thousands separators removed; None if absent."""
  _, marker, tail = text.rpartition("####")
  answer = tail.strip().replace(",", "")
  return answer if marker and answer else None


def _braced(text: str) -> str | None:
  """Content of the brace group opening `text`; escaped braces (\\{, \\}) are content."""
  depth, i = 0, 0
  while i < len(text):
    if text[i] == "\\":
      i += 2
      continue
    depth += {"{": 1, "}": -1}.get(text[i], 0)
    if depth == 0:
      return text[1:i]
    i += 1
  return None


def boxed_answer(text: str) -> str | None:
  """Content of the last \\boxed{...} (or \\fbox{...}); None if absent or unbalanced.

  Braces nest. The brace-less form `\\boxed 5` yields the token after the space.
  """
  start, command = max((text.rfind(c), c) for c in ("\\boxed", "\\fbox"))
  if start < 0:
    return None
  rest = text[start + len(command):]
  if rest.startswith("{"):
    return _braced(rest)
  token = re.match(r"\s+([^\s$]+)", rest)
  return token.group(1) if token else None


def _required(extract: Callable[[str], str | None], what: str) -> Callable[[Any], str]:
  def parse(value: Any) -> str:
    answer = extract(as_text(value))
    if answer is None:
      raise ValueError(f"no {what} answer in {value!r:.80}")
    return answer
  return parse


def math_level(value: Any) -> int:
  """MATH's "Level 3" -> 3."""
  text = as_text(value)
  number = text.removeprefix("Level").strip()
  if not number.isdigit():
    raise ValueError(f"expected 'Level N', got {text!r}")
  return int(number)


@dataclasses.dataclass(frozen=True)
class Schema:
  """Which row key feeds each Prompt field and how it is parsed (parsers raise ValueError).

  Optional keys (id, difficulty, domain, images) may be absent or null in a row; a row without an id
  gets "<file stem>-<line>".
  """
  question: str = "question"
  answer: str = "answer"
  id: str = "id"
  difficulty: str = "difficulty"
  domain: str = "domain"
  images: str = "images"
  parse_answer: Callable[[Any], str] = as_text
  parse_difficulty: Callable[[Any], int] = as_int


def code_tests(value: Any) -> str:
  """Code rows' `tests: [{"input": ..., "output": ...}, ...]` as the code reward's answer: a JSON
  list of [stdin, expected stdout] pairs."""
  if not isinstance(value, list) or not value:
    raise ValueError(f"expected a non-empty list of {{input, output}} objects, got {value!r:.80}")
  pairs = []
  for i, test in enumerate(value):
    if not (isinstance(test, dict) and isinstance(test.get("input"), str)
            and isinstance(test.get("output"), str)):
      raise ValueError(f"test {i}: expected {{\"input\": str, \"output\": str}}, got {test!r:.80}")
    pairs.append([test["input"], test["output"]])
  return json.dumps(pairs)


GSM8K = Schema(parse_answer=_required(gsm8k_answer, "'#### N'"))
CODE = Schema(answer="tests", parse_answer=code_tests)
MATH = Schema(question="problem", answer="solution", difficulty="level", domain="type",
              parse_answer=_required(boxed_answer, "\\boxed{}"), parse_difficulty=math_level)


def _image(item: Any, base_dir: str) -> str:
  """A file path (made absolute) or base64 / data-URL string that decodes as an image header."""
  if not isinstance(item, str) or not item.strip():
    raise ValueError(f"expected a non-empty string, got {type(item).__name__} {item!r:.40}")
  path = os.path.join(base_dir, item)
  if not item.startswith("data:") and len(item) < 4096 and os.path.isfile(path):
    item = os.path.abspath(path)
  image_inputs.check_encoded_image(item)
  return item


def image_list(base_dir: str) -> Callable[[Any], tuple[str, ...]]:
  """Parser of a row's `images`: a list of paths (relative to `base_dir`) or base64 strings."""
  def parse(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
      raise ValueError(f"expected a list of image paths or base64 strings, got "
                       f"{type(value).__name__}")
    parsed = []
    for i, item in enumerate(value):
      try:
        parsed.append(_image(item, base_dir))
      except ValueError as e:
        raise ValueError(f"image {i}: {e}") from e
    return tuple(parsed)
  return parse


def _field_parsers(schema: Schema, base_dir: str):
  """(Prompt field, row key, parser, required) for each field."""
  return (("question", schema.question, as_nonempty_text, True),
          ("answer", schema.answer, schema.parse_answer, True),
          ("id", schema.id, as_text, False),
          ("difficulty", schema.difficulty, schema.parse_difficulty, False),
          ("domain", schema.domain, as_text, False),
          ("images", schema.images, image_list(base_dir), False))


def _row_to_prompt(row: Any, schema: Schema, default_id: str,
                   base_dir: str) -> tuple[Prompt | None, list]:
  """(prompt, []) or (None, [(row key, message), ...])."""
  if not isinstance(row, dict):
    return None, [("<row>", f"expected a JSON object, got {type(row).__name__}")]
  problems, values = [], {}
  for name, key, parse, required in _field_parsers(schema, base_dir):
    if row.get(key) is None:
      if required:
        problems.append((key, "missing"))
      continue
    try:
      values[name] = parse(row[key])
    except ValueError as e:
      problems.append((key, str(e)))
  if problems:
    return None, problems
  values.setdefault("id", default_id)
  return Prompt(**values), []


class NotUtf8(ValueError):
  """One line of a text file that is not UTF-8; the other lines are still read."""


def text_lines(path: str):
  """(line number, text) of every line of a UTF-8 file; a line that does not decode comes as a
  NotUtf8 error naming the file, line and column instead of its text."""
  with open(path, "rb") as f:
    for line_number, raw in enumerate(f, start=1):
      try:
        yield line_number, raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield line_number, NotUtf8(f"{path}:{line_number}: not UTF-8 ({e.reason} at column "
                                   f"{e.start + 1})")


def _jsonl_rows(path: str):
  for line_number, line in text_lines(path):
    if isinstance(line, NotUtf8):
      yield line_number, line
    elif line.strip():
      try:
        yield line_number, json.loads(line)
      except json.JSONDecodeError as e:
        yield line_number, e


def _parquet_rows(path: str):
  yield from enumerate(pq.read_table(path).to_pylist(), start=1)


_READERS = {".jsonl": _jsonl_rows, ".parquet": _parquet_rows}


def read_rows(path: str):
  """(line, row) of every row of a .jsonl or .parquet file; a JSONL line that is not JSON
  yields its json.JSONDecodeError as the row."""
  suffix = pathlib.Path(path).suffix
  if suffix not in _READERS:
    raise ValueError(f"{path}: unsupported file type {suffix!r} (expected one of {list(_READERS)})")
  return _READERS[suffix](path)


def prompts_from_rows(numbered_rows, path: str,
                      schema: Schema = Schema()) -> tuple[list[Prompt], list[RowError]]:
  """Valid prompts of (line, row) pairs read from `path`, and an error for every other row."""
  stem = pathlib.Path(path).stem
  base_dir = os.path.dirname(os.path.abspath(path))
  prompts, errors, first_line_of_id = [], [], {}
  for line, row in numbered_rows:
    if isinstance(row, json.JSONDecodeError):
      errors.append(RowError(path, line, "<json>", f"invalid JSON: {row.msg}"))
      continue
    if isinstance(row, NotUtf8):
      errors.append(RowError(path, line, "<text>", str(row)))
      continue
    prompt, problems = _row_to_prompt(row, schema, f"{stem}-{line}", base_dir)
    errors.extend(RowError(path, line, field, message) for field, message in problems)
    if prompt is None:
      continue
    if prompt.id in first_line_of_id:
      first = first_line_of_id[prompt.id]
      errors.append(RowError(path, line, schema.id, f"duplicate id {prompt.id!r} (first on line {first})"))
      continue
    first_line_of_id[prompt.id] = line
    prompts.append(prompt)
  return prompts, errors


def read_prompts(path: str, schema: Schema = Schema()) -> tuple[list[Prompt], list[RowError]]:
  """All valid prompts of a .jsonl or .parquet file, and an error for every other row."""
  return prompts_from_rows(read_rows(path), path, schema)


def load_prompts(path: str, schema: Schema = Schema()) -> list[Prompt]:
  """Like `read_prompts`, but any malformed row raises a DataValidationError listing all."""
  prompts, errors = read_prompts(path, schema)
  if errors:
    raise DataValidationError(errors)
  return prompts


def shared_data_path(relative: str) -> str:
  """<repo>/../shared/data/`relative`, or under $KIMI_JAX_SHARED_DATA when set."""
  root = os.environ.get(SHARED_DATA_ENV) or str(_REPO_ROOT.parent / "shared" / "data")
  return os.path.join(root, relative)


def load_gsm8k(path: str | None = None) -> list[Prompt]:
  """GSM8K rows {"question", "answer": "...#### N"}; defaults to the shared test split."""
  prompts = load_prompts(path or shared_data_path("gsm8k/test.jsonl"), GSM8K)
  return [dataclasses.replace(p, domain=p.domain or "math") for p in prompts]


def load_math(path: str) -> list[Prompt]:
  """MATH rows {"problem", "solution" with \\boxed{}, "level": "Level N", "type"}."""
  return load_prompts(path, MATH)
