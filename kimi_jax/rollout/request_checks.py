"""What the rollout server checks before input reaches the engine, and how it writes JSON.

- Bodies: strict UTF-8 JSON; nesting too deep for the parser, and NaN / Infinity (not JSON),
  are request errors, not server errors.
- Flags (`stream`, `return_logprob`, `abort_all`...) must be JSON booleans: "false" is a string,
  and coercing it would turn it into True.
- Limits from the served model: the context length, samples per request.
- Weights: every tensor finite.
- Answers: JSON never carries a bare NaN or Infinity (non-finite floats become null).
"""
import json
import math
from typing import Any

import jax
import numpy as np

from kimi_jax.rollout.protocol import GenerateRequest, RequestError


def _reject_constant(name: str):
  raise RequestError(f"request body is not valid JSON: {name} is not a JSON number")


def parse_json_body(raw: bytes) -> dict:
  """The JSON object in a request body; RequestError for anything else."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as error:
    raise RequestError(f"request body is not UTF-8: {error}") from error
  try:
    body = json.loads(text, parse_constant=_reject_constant)
  except json.JSONDecodeError as error:
    raise RequestError(f"request body is not valid JSON: {error}") from error
  except RecursionError as error:
    raise RequestError("request body is not valid JSON: nested too deeply") from error
  if not isinstance(body, dict):
    raise RequestError("request body must be a JSON object")
  return body


def flag(body: dict, field: str) -> bool:
  """`body[field]` as a JSON boolean (absent or null: False)."""
  value = body.get(field)
  if value is not None and not isinstance(value, bool):
    raise RequestError(f"'{field}' must be true or false, got {value!r}")
  return bool(value)


def check_generate_flags(body: dict) -> None:
  """`stream` a boolean; `return_logprob` a boolean or a list of booleans."""
  flag(body, "stream")
  value = body.get("return_logprob")
  values = value if isinstance(value, list) else [value]
  if not all(v is None or isinstance(v, bool) for v in values):
    raise RequestError(f"'return_logprob' must be true or false (or a list of them), "
                       f"got {value!r}")


def _explicit_max_new_tokens(body: dict, count: int) -> list[bool]:
  """Per prompt: did the request itself set max_new_tokens (SGLang checks only those)?"""
  raw = body.get("sampling_params")
  per_prompt = raw if isinstance(raw, list) else [raw] * count
  return [isinstance(s, dict) and s.get("max_new_tokens") is not None for s in per_prompt]


def check_fits(body: dict, request: GenerateRequest, context_length: int,
               max_samples: int) -> None:
  """Prompts and requested outputs fit `context_length`; at most `max_samples` samples."""
  samples = sum(sp.n for sp in request.sampling)
  if samples > max_samples:
    raise RequestError(f"'sampling_params.n': the request asks for {samples} samples; this "
                       f"server answers at most {max_samples} per request")
  where = (lambda i: f"[{i}]") if request.is_batch else (lambda i: "")
  explicit = _explicit_max_new_tokens(body, len(request.prompts))
  for i, (prompt, sp) in enumerate(zip(request.prompts, request.sampling)):
    if len(prompt) >= context_length:
      raise RequestError(
          f"'input_ids{where(i)}': {len(prompt)} prompt tokens leave no room for output in "
          f"context_length={context_length} (the smaller of the engine's max_seq_len and the "
          "model's max_position_embeddings)")
    if explicit[i] and len(prompt) + sp.max_new_tokens > context_length:
      raise RequestError(
          f"'sampling_params{where(i)}.max_new_tokens'={sp.max_new_tokens}: with "
          f"{len(prompt)} prompt tokens this exceeds context_length={context_length} "
          f"(at most {context_length - len(prompt)} new tokens fit)")


def non_finite_tensor(params) -> str | None:
  """Path of the first tensor holding a NaN or an infinity; None if all are finite."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not np.all(np.isfinite(np.asarray(leaf, np.float32))):
      return jax.tree_util.keystr(path)
  return None


def _finite(value: Any) -> Any:
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  return value


def dumps(value: Any) -> str:
  """JSON text of `value` in which NaN and infinities are null (plain json writes `NaN`)."""
  try:
    return json.dumps(value, allow_nan=False)
  except ValueError:
    return json.dumps(_finite(value), allow_nan=False)
