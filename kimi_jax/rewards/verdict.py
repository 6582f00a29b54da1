"""Strict parsing of the JSON verdict that ends a chain-of-thought judge's reply.

The verdict is the JSON object that closes at the last '}' of the text; its start is the
leftmost '{' from which one JSON object decodes to exactly that '}', so braces in the
reasoning before it (LaTeX, sets, earlier drafts of a verdict) do not matter. Text after the
last '}' is ignored unless it opens a '{' (a verdict cut off by the token limit). The object
must be exactly {"correct": <JSON boolean>}: no other field, no repeated key. Anything else
raises `VerdictError` whose `reason` is one of `VERDICT_ERRORS`.
"""
import json

NO_JSON = "no_json"  # the text has no '}'
UNTERMINATED = "unterminated_json"  # a '{' opens after the last '}'
MALFORMED = "malformed_json"  # no JSON object ends at the last '}'
WRONG_FIELDS = "wrong_fields"  # keys are not exactly one "correct"
NON_BOOLEAN = "non_boolean"  # "correct" is not true/false
VERDICT_ERRORS = (NO_JSON, UNTERMINATED, MALFORMED, WRONG_FIELDS, NON_BOOLEAN)

VERDICT_FIELD = "correct"


class VerdictError(ValueError):
  """A reply without a valid verdict; `reason` is one of VERDICT_ERRORS."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason


def _last_object_pairs(text: str) -> list[tuple[str, object]]:
  """Key/value pairs, in order and with repeats, of the object closing at the last '}'."""
  end = text.rfind("}")
  if end < 0:
    raise VerdictError(NO_JSON, "no JSON object in the reply")
  if "{" in text[end:]:
    raise VerdictError(UNTERMINATED, f"'{{' after the last '}}': {text[end:][:80]!r}")
  decoder = json.JSONDecoder(object_pairs_hook=list)
  start = text.find("{")
  while 0 <= start < end:
    try:
      pairs, stop = decoder.raw_decode(text, start)
      if stop == end + 1:
        return pairs
    except json.JSONDecodeError:
      pass
    start = text.find("{", start + 1)
  raise VerdictError(MALFORMED, f"no JSON object ends at the last '}}': {text[:end + 1][-80:]!r}")


def parse_verdict(text: str) -> bool:
  """The boolean of the final {"correct": ...} object of `text` (rules in the module doc)."""
  pairs = _last_object_pairs(text)
  keys = [key for key, _ in pairs]
  if keys != [VERDICT_FIELD]:
    raise VerdictError(WRONG_FIELDS, f"verdict keys {keys}, expected [{VERDICT_FIELD!r}]")
  value = pairs[0][1]
  if not isinstance(value, bool):
    raise VerdictError(NON_BOOLEAN, f"{VERDICT_FIELD!r} is {value!r}, expected true or false")
  return value
