"""SGLang native /generate JSON <-> our request and completion types (DESIGN.md section 6).

One module holds the wire format so the server that speaks it and the client that reads it
cannot drift apart.
"""
import dataclasses
from typing import Callable

from kimi_jax.rollout.types import REPETITION_MATCH, Completion, SamplingParams

# SGLang sampling fields that only shape the returned text; accepted and ignored here.
_TEXT_ONLY_FIELDS = ("no_stop_trim", "skip_special_tokens", "spaces_between_special_tokens")
# SGLang penalties we do not implement: accepted only at their neutral values.
_NEUTRAL_FIELDS = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
                   "min_new_tokens": 0}
_SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "min_p", "max_new_tokens", "stop",
                    "stop_token_ids", "n", "ignore_eos", "sampling_seed"}


class RequestError(ValueError):
  """A malformed request; servers answer it with 400 {"error": {"message": str(error)}}."""


@dataclasses.dataclass
class GenerateRequest:
  """A parsed /generate body: one entry per prompt (each prompt yields `sampling[i].n` samples)."""

  prompts: list[list[int]]
  sampling: list[SamplingParams]
  rids: list[str]
  return_logprob: list[bool]
  stream: bool
  is_batch: bool
  image_data: list[list[str]] = dataclasses.field(default_factory=list)  # per prompt


def _per_prompt(value, count: int, field: str, default):
  if value is None:
    return [default] * count
  if isinstance(value, list):
    if len(value) != count:
      raise RequestError(f"'{field}' has {len(value)} entries for {count} prompts")
    return value
  return [value] * count


def sampling_from_json(fields, where: str = "sampling_params") -> SamplingParams:
  """SamplingParams from SGLang's `sampling_params` object (unknown fields are errors)."""
  if fields is None:
    fields = {}
  if not isinstance(fields, dict):
    raise RequestError(f"'{where}' must be an object, got {type(fields).__name__}")
  unknown = sorted(set(fields) - _SAMPLING_FIELDS - set(_TEXT_ONLY_FIELDS) - set(_NEUTRAL_FIELDS))
  if unknown:
    raise RequestError(f"'{where}': unsupported fields {unknown}")
  for name, neutral in _NEUTRAL_FIELDS.items():
    if fields.get(name, neutral) != neutral:
      raise RequestError(f"'{where}.{name}'={fields[name]!r}: only {neutral} is supported")
  if fields.get("stop"):
    raise RequestError(f"'{where}.stop': stop strings are not supported; use stop_token_ids")
  kwargs = {k: v for k, v in fields.items() if k in _SAMPLING_FIELDS - {"stop", "sampling_seed"}
            and v is not None}
  if fields.get("sampling_seed") is not None:
    kwargs["seed"] = fields["sampling_seed"]
  if "stop_token_ids" in kwargs:
    if not isinstance(kwargs["stop_token_ids"], list):
      raise RequestError(f"'{where}.stop_token_ids' must be a list of ints")
    kwargs["stop_token_ids"] = tuple(kwargs["stop_token_ids"])
  for name in ("max_new_tokens", "top_k", "n", "seed"):
    if name in kwargs and (isinstance(kwargs[name], bool) or not isinstance(kwargs[name], int)):
      raise RequestError(f"'{where}.{name}' must be an integer, got {kwargs[name]!r}")
  for name in ("temperature", "top_p", "min_p"):
    if name in kwargs and (isinstance(kwargs[name], bool)
                           or not isinstance(kwargs[name], (int, float))):
      raise RequestError(f"'{where}.{name}' must be a number, got {kwargs[name]!r}")
  try:
    return SamplingParams(**kwargs)
  except ValueError as error:
    raise RequestError(f"'{where}': {error}") from error


def sampling_to_json(sampling: SamplingParams) -> dict:
  fields = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
            "min_p": sampling.min_p, "max_new_tokens": sampling.max_new_tokens,
            "stop_token_ids": list(sampling.stop_token_ids), "n": sampling.n,
            "ignore_eos": sampling.ignore_eos}
  if sampling.seed is not None:
    fields["sampling_seed"] = sampling.seed
  return fields


def _token_ids(value, where: str) -> list[int]:
  if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in value):
    raise RequestError(f"'{where}' must be a list of token ids")
  return value


def _image_sources(value, where: str) -> list[str]:
  items = [value] if isinstance(value, str) else value
  if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
    raise RequestError(f"'{where}' must be an image (base64, data URL or file path) or a list "
                       "of them")
  if any(x.startswith(("http://", "https://")) for x in items):
    raise RequestError(f"'{where}': this server does not fetch image URLs; send base64 or a data "
                       "URL")
  return items


def parse_image_data(value, count: int, is_batch: bool) -> list[list[str]]:
  """SGLang's `image_data`: per prompt one image or a list (a batch gives one entry per
  prompt); null means none."""
  if value is None:
    return [[] for _ in range(count)]
  if not is_batch:
    return [_image_sources(value, "image_data")]
  if not isinstance(value, list) or len(value) != count:
    raise RequestError(f"'image_data' must be a list with one entry per prompt ({count})")
  return [[] if v is None else _image_sources(v, f"image_data[{i}]") for i, v in enumerate(value)]


def parse_generate_request(body, new_rid: Callable[[], str],
                           encode: Callable[[str], list[int]] | None) -> GenerateRequest:
  """Validate a /generate body; `encode` turns `text` into ids (None: text is refused)."""
  if not isinstance(body, dict):
    raise RequestError("request body must be a JSON object")
  if ("input_ids" in body) == ("text" in body):
    raise RequestError("give exactly one of 'input_ids' and 'text'")
  if "input_ids" in body:
    ids = body["input_ids"]
    is_batch = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
    prompts = ([_token_ids(p, f"input_ids[{i}]") for i, p in enumerate(ids)] if is_batch
               else [_token_ids(ids, "input_ids")])
  else:
    if encode is None:
      raise RequestError("'text' needs a tokenizer; this server has none, send 'input_ids'")
    text = body["text"]
    is_batch = isinstance(text, list)
    texts = text if is_batch else [text]
    if not all(isinstance(t, str) for t in texts):
      raise RequestError("'text' must be a string or a list of strings")
    prompts = [encode(t) for t in texts]
  if not prompts:
    raise RequestError("empty batch")
  count = len(prompts)
  raw_sampling = _per_prompt(body.get("sampling_params"), count, "sampling_params", {})
  sampling = [sampling_from_json(s, f"sampling_params[{i}]" if is_batch else "sampling_params")
              for i, s in enumerate(raw_sampling)]
  rid = body.get("rid")
  if not is_batch and isinstance(rid, list):
    raise RequestError("'rid' must be a string for a single prompt")
  rids = [new_rid() if r is None else str(r) for r in _per_prompt(rid, count, "rid", None)]
  if len(set(rids)) != len(rids):
    raise RequestError(f"'rid' values must be unique within a request: {rids}")
  return_logprob = _per_prompt(body.get("return_logprob"), count, "return_logprob", False)
  start = body.get("logprob_start_len")
  if start not in (None, -1) and any(return_logprob):
    raise RequestError(f"'logprob_start_len'={start}: input log-probs are not supported (use -1)")
  return GenerateRequest(prompts, sampling, rids, [bool(r) for r in return_logprob],
                         bool(body.get("stream", False)), is_batch,
                         parse_image_data(body.get("image_data"), count, is_batch))


def generate_request_json(prompt_ids: list[int], sampling: SamplingParams, rid: str,
                          return_logprob: bool = True, stream: bool = False) -> dict:
  return {"input_ids": list(prompt_ids), "sampling_params": sampling_to_json(sampling), "rid": rid,
          "return_logprob": return_logprob, "stream": stream}


def response_json(rid: str, prompt_ids, output_ids, logprobs, finish_reason: dict | None,
                  weight_version: str, e2e_latency: float, return_logprob: bool,
                  text: str | None) -> dict:
  """One sample's /generate answer (also each cumulative streaming chunk)."""
  meta = {"id": rid, "finish_reason": finish_reason, "prompt_tokens": len(prompt_ids),
          "completion_tokens": len(output_ids), "cached_tokens": 0,
          "weight_version": weight_version, "e2e_latency": e2e_latency}
  if return_logprob:
    meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(logprobs, output_ids)]
  answer = {"output_ids": list(output_ids), "meta_info": meta}
  if text is not None:
    answer["text"] = text
  return answer


def completion_from_response(answer: dict, prompt_ids: list[int]) -> Completion:
  """A Completion from one /generate answer (ours or a real SGLang server's).

  Token ids come from the log-prob triplets when present: SGLang's `output_ids` can omit the
  stop token, the triplets never do.
  """
  try:
    meta = answer["meta_info"]
    triplets = meta.get("output_token_logprobs")
    if triplets is not None:
      output_ids = [int(t[1]) for t in triplets]
      logprobs = [float(t[0]) for t in triplets]
    else:
      output_ids, logprobs = [int(t) for t in answer["output_ids"]], []
    finish_reason = meta["finish_reason"]
    version = meta.get("weight_version")
  except (KeyError, TypeError, IndexError, ValueError) as error:
    raise ValueError(f"not an SGLang /generate answer ({error!r}): {str(answer)[:300]}") from error
  matched = finish_reason.get("matched") if isinstance(finish_reason, dict) else None
  return Completion(list(prompt_ids), output_ids, logprobs, finish_reason,
                    repetition=matched == REPETITION_MATCH,
                    weight_version="" if version is None else str(version))
