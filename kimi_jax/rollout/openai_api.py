"""OpenAI-compatible /v1/completions and /v1/chat/completions <-> our requests and samples.

Field names and defaults follow OpenAI's API with SGLang's extensions (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids, skip_special_tokens, no_stop_trim).
Chat prompts are the checkpoint's chat template rendered over `messages`, tokenized without
special tokens (what transformers' `apply_chat_template` gives). Fields that change results and
are not implemented (logit_bias, tools, structured response_format) get a 400 naming them;
other fields are ignored, as SGLang's request models do.
"""
import dataclasses
import time
import uuid
from typing import Callable

from kimi_jax.data.image_prompts import IMAGE_PLACEHOLDER
from kimi_jax.rollout.protocol import (LogprobRequest, RequestError, image_sources,
                                       sampling_from_json)
from kimi_jax.rollout.types import SamplingParams

# OpenAI or SGLang name -> SamplingParams field (the /generate spelling).
_SAMPLING_NAMES = {"temperature": "temperature", "top_p": "top_p", "n": "n", "stop": "stop",
                   "seed": "sampling_seed", "presence_penalty": "presence_penalty",
                   "frequency_penalty": "frequency_penalty", "top_k": "top_k", "min_p": "min_p",
                   "repetition_penalty": "repetition_penalty", "min_tokens": "min_new_tokens",
                   "ignore_eos": "ignore_eos", "stop_token_ids": "stop_token_ids",
                   "skip_special_tokens": "skip_special_tokens", "no_stop_trim": "no_stop_trim"}
_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


@dataclasses.dataclass
class OpenAIRequest:
  """A parsed completions / chat body: one prompt per entry, `n` samples each."""

  prompts: list[list[int]]
  sampling: list[SamplingParams]
  logprobs: LogprobRequest  # top_n alternatives per output token when logprobs are asked
  return_logprob: bool
  stream: bool
  include_usage: bool
  model: str
  image_data: list[list[str]] = dataclasses.field(default_factory=list)  # per prompt


def _refuse_unsupported(body: dict) -> None:
  if body.get("logit_bias"):
    raise RequestError("'logit_bias' is not supported (send null or {})")
  if body.get("tools") or body.get("functions"):
    raise RequestError("'tools': tool calls are not supported")
  response_format = body.get("response_format")
  if isinstance(response_format, dict) and response_format.get("type", "text") != "text":
    raise RequestError(f"'response_format'={response_format!r}: only type 'text' is supported")


def _sampling(body: dict, max_tokens, prompt_len: int, context: int) -> SamplingParams:
  fields = {native: body[name] for name, native in _SAMPLING_NAMES.items()
            if body.get(name) is not None}
  if max_tokens is None:  # SGLang: the rest of the context
    max_tokens = context - prompt_len
  fields["max_new_tokens"] = max_tokens
  try:
    return sampling_from_json(fields, "request")
  except RequestError as error:  # name the OpenAI field, not the /generate one
    message = str(error)
    for name, native in _SAMPLING_NAMES.items():
      message = message.replace(f"'request.{native}'", f"'{name}'")
    raise RequestError(message.replace("'request.max_new_tokens'", "'max_tokens'")) from error


def _common(body, prompts, max_tokens, context: int, logprobs: LogprobRequest,
            return_logprob: bool) -> OpenAIRequest:
  _refuse_unsupported(body)
  if not prompts:
    raise RequestError("'prompt' is empty")
  options = body.get("stream_options") or {}
  return OpenAIRequest(prompts, [_sampling(body, max_tokens, len(p), context) for p in prompts],
                       logprobs, return_logprob, bool(body.get("stream", False)),
                       bool(options.get("include_usage", False)), str(body.get("model") or ""))


def parse_completion_request(body: dict, encode: Callable[[str], list[int]] | None,
                             context: int) -> OpenAIRequest:
  """/v1/completions: `prompt` is a string, a list of strings, token ids or lists of them."""
  prompt = body.get("prompt")
  if isinstance(prompt, str):
    prompt = [prompt]
  if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
    prompt = [prompt]
  if not isinstance(prompt, list):
    raise RequestError("'prompt' must be a string, a list of strings or token ids")
  prompts = []
  for i, p in enumerate(prompt):
    if isinstance(p, str):
      if encode is None:
        raise RequestError("'prompt' text needs a tokenizer; this server has none, send ids")
      prompts.append(encode(p))
    elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
      prompts.append(p)
    else:
      raise RequestError(f"'prompt'[{i}] must be a string or a list of token ids")
  if body.get("echo"):
    raise RequestError("'echo' is not supported")
  top_n = body.get("logprobs")
  if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0):
    raise RequestError(f"'logprobs' must be null or an integer >= 0, got {top_n!r}")
  return _common(body, prompts, body.get("max_tokens", 16), context,
                 LogprobRequest(top_n=top_n or 0, with_text=True), top_n is not None)


def parse_chat_request(body: dict, render: Callable[[list], str] | None,
                       encode: Callable[[str], list[int]] | None, context: int) -> OpenAIRequest:
  """/v1/chat/completions: `messages` through the chat template."""
  if render is None or encode is None:
    raise RequestError("chat completions need a tokenizer with a chat template; this server "
                       "has none")
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise RequestError("'messages' must be a non-empty list of {role, content} objects")
  images, flat = [], []
  for i, message in enumerate(messages):
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
      raise RequestError(f"'messages'[{i}] must be an object with a 'role'")
    flat.append({**message, "content": _flat_content(message.get("content"), i, images)})
  logprobs = body.get("logprobs")
  top_n = body.get("top_logprobs") or 0
  if not isinstance(logprobs, (bool, type(None))):
    raise RequestError(f"'logprobs' must be true or false, got {logprobs!r}")
  if isinstance(top_n, bool) or not isinstance(top_n, int) or not 0 <= top_n <= 20:
    raise RequestError(f"'top_logprobs' must be an integer in [0, 20], got {top_n!r}")
  if top_n and not logprobs:
    raise RequestError("'top_logprobs' needs 'logprobs': true")
  max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
  parsed = _common(body, [encode(render(flat))], max_tokens, context,
                   LogprobRequest(top_n=top_n, with_text=True), bool(logprobs))
  return dataclasses.replace(parsed, image_data=[images])


def _flat_content(content, index: int, images: list[str]):
  """A message's content as text: a list of parts becomes its text parts with one image
  placeholder per `image_url` part (whose URL joins `images`), as SGLang feeds templates."""
  if isinstance(content, (str, type(None))):
    return content
  where = f"'messages'[{index}].content"
  if not isinstance(content, list):
    raise RequestError(f"{where} must be a string or a list of parts")
  text = []
  for j, part in enumerate(content):
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
      text.append(part["text"])
    elif kind == "image_url" and isinstance(part.get("image_url"), dict):
      images.extend(image_sources(part["image_url"].get("url"), f"{where}[{j}].image_url.url"))
      text.append(IMAGE_PLACEHOLDER)
    else:
      raise RequestError(f"{where}[{j}]: expected {{\"type\": \"text\", \"text\": ...}} or "
                         f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}")
  return "".join(text)


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(completion_reason: dict | None) -> str | None:
  return None if completion_reason is None else _FINISH[completion_reason["type"]]


def matched_stop(completion_reason: dict | None):
  return None if completion_reason is None else completion_reason.get("matched")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(triplets: list, top: list | None, text_offset: int = 0) -> dict:
  """/v1/completions `logprobs` from SGLang triplets [logprob, id, text] (+ top per token)."""
  tokens = [t for _, _, t in triplets]
  offsets, at = [], text_offset
  for token in tokens:
    offsets.append(at)
    at += len(token)
  return {"tokens": tokens, "token_logprobs": [lp for lp, _, _ in triplets],
          "top_logprobs": None if top is None else [{t: lp for lp, _, t in alts} for alts in top],
          "text_offset": offsets}


def chat_logprobs(triplets: list, top: list | None) -> dict:
  """/v1/chat/completions `logprobs.content` from SGLang triplets (+ top per token)."""
  entry = lambda lp, text: {"token": text, "logprob": lp, "bytes": list(text.encode())}
  return {"content": [dict(entry(lp, text), top_logprobs=[
      entry(alp, atext) for alp, _, atext in (top[j] if top else [])])
      for j, (lp, _, text) in enumerate(triplets)]}


def envelope(kind: str, request_id: str, model: str, choices: list, **extra) -> dict:
  return {"id": request_id, "object": kind, "created": int(time.time()), "model": model,
          "choices": choices, **extra}
