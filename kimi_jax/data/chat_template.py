"""Jinja2 chat templates rendered the way Hugging Face transformers renders them.

A checkpoint's `tokenizer_config.json` (or `chat_template.jinja`) carries a Jinja2 template that
turns a list of `{"role", "content"}` messages into the model's prompt text. transformers compiles
it in an immutable sandbox with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension,
a `tojson` filter that does not HTML-escape, and the globals `raise_exception`, `strftime_now`;
the special tokens (`bos_token`, `eos_token`, ...) and any extra keyword (`enable_thinking`, ...)
are template variables. The rendered text is then tokenized WITHOUT adding special tokens.
"""
import datetime
import functools
import json

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
  """The template raised (`raise_exception`) or could not be compiled."""


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  try:
    return env.from_string(source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ChatTemplateError(f"chat template line {e.lineno}: {e.message}") from e


class JinjaChatTemplate:
  """A checkpoint's chat template plus the special tokens it may reference."""

  def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
    self.source = source
    self.special_tokens = dict(special_tokens or {})
    self._template = compile_template(source)

  def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
    """Prompt text for `messages`; `kwargs` (e.g. enable_thinking=False) reach the template."""
    for i, message in enumerate(messages):
      if not isinstance(message, dict) or "role" not in message:
        raise ChatTemplateError(f"messages[{i}]: expected a dict with 'role' and 'content'")
    try:
      return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   tools=None, documents=None,
                                   **{**self.special_tokens, **kwargs})
    except jinja2.exceptions.TemplateError as e:
      raise ChatTemplateError(f"chat template: {e}") from e
