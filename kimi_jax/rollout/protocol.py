"""SGLang native /generate JSON <-> our request and completion types.

One module holds the wire format so the server that speaks it and the client that reads it
cannot drift apart.
"""
import dataclasses
from typing import Callable

from kimi_jax.rollout.types import REPETITION_MATCH, Completion, SamplingParams

_INT_FIELDS = ("max_new_tokens", "top_k", "n", "sampling_seed", "min_new_tokens")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                 "presence_penalty")
_BOOL_FIELDS = ("ignore_eos", "no_stop_trim", "skip_special_tokens")
# Renamed on the way into SamplingParams.
_RENAMED = {"sampling_seed": "seed"}
# Accepted and without effect: spacing of special tokens in text (our tokenizers decode without
# added spaces) and custom logit-processor arguments (no processor runs here).
_IGNORED_FIELDS = ("spaces_between_special_tokens", "custom_params", "stream_interval")
# Constrained decoding is not implemented: accepted only when null or empty (the sglang frontend
# sends regex/json_schema null and stop_regex [] with every request).
_UNSUPPORTED_WHEN_SET = ("regex", "json_schema", "ebnf", "structural_tag", "stop_regex",
                         "logit_bias")
_KNOWN_FIELDS = (set(_INT_FIELDS) | set(_FLOAT_FIELDS) | set(_BOOL_FIELDS) | set(_IGNORED_FIELDS)
                 | set(_UNSUPPORTED_WHEN_SET) | {"stop", "stop_token_ids"})


class RequestError(ValueError):
  """A malformed request; servers answer it with 400 {"error": {"message": str(error)}}."""


@dataclasses.dataclass(frozen=True)
class LogprobRequest:
  """What one prompt's answers report beyond the sampled tokens' log-probs (SGLang's fields).

  start: first prompt position of `input_token_logprobs` (-1: none); top_n: alternatives per
  position (`input_top_logprobs`, `output_top_logprobs`); token_ids: ids whose log-probs every
  position reports (`*_token_ids_logprobs`); with_text: decode each token in the triplets.
  """

  start: int = -1
  top_n: int = 0
  token_ids: tuple[int, ...] | None = None
  with_text: bool = False

  @property
  def needs_scoring(self) -> bool:
    return self.start >= 0 or self.top_n > 0 or self.token_ids is not None


def _int_at_least(value, lowest: int, where: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
    raise RequestError(f"'{where}' must be an integer >= {lowest}, got {value!r}")
  return value


def _logprob_requests(body, prompts, is_batch: bool) -> list[LogprobRequest]:
  count = len(prompts)
  starts = _per_prompt(body.get("logprob_start_len"), count, "logprob_start_len", -1)
  tops = _per_prompt(body.get("top_logprobs_num"), count, "top_logprobs_num", 0)
  ids = body.get("token_ids_logprob")
  if not ids:  # SGLang: None and [] both mean none
    ids = [None] * count
  elif not (is_batch and all(isinstance(x, list) or x is None for x in ids)):
    ids = [ids] * count
  elif len(ids) != count:
    raise RequestError(f"'token_ids_logprob' has {len(ids)} entries for {count} prompts")
  with_text = body.get("return_text_in_logprobs", False)
  if not isinstance(with_text, bool):
    raise RequestError(f"'return_text_in_logprobs' must be true or false, got {with_text!r}")
  requests = []
  for i, (prompt, start, top, wanted) in enumerate(zip(prompts, starts, tops, ids)):
    at = lambda field: f"{field}[{i}]" if is_batch else field
    start = _int_at_least(start, -1, at("logprob_start_len"))
    if start >= len(prompt):
      raise RequestError(f"'{at('logprob_start_len')}'={start}: must be < the prompt's "
                         f"{len(prompt)} tokens")
    top = _int_at_least(top, 0, at("top_logprobs_num"))
    if wanted is not None:
      wanted = tuple(_token_ids(wanted, at("token_ids_logprob")))
    requests.append(LogprobRequest(start, top, wanted or None, with_text))
  return requests


@dataclasses.dataclass
class GenerateRequest:
  """A parsed /generate body: one entry per prompt (each prompt yields `sampling[i].n` samples).

  `rids[i]` names prompt i (abort matches it as a prefix); `sample_ids[i]` holds the `id` of
  each of its samples: the rid itself when n = 1, a fresh id per copy when n > 1 (SGLang).
  """

  prompts: list[list[int]]
  sampling: list[SamplingParams]
  rids: list[str]
  sample_ids: list[list[str]]
  return_logprob: list[bool]
  logprobs: list["LogprobRequest"]
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
  unknown = sorted(set(fields) - _KNOWN_FIELDS)
  if unknown:
    raise RequestError(f"'{where}': unsupported fields {unknown}")
  for name in _UNSUPPORTED_WHEN_SET:
    if fields.get(name):
      raise RequestError(f"'{where}.{name}'={fields[name]!r}: constrained decoding and logit "
                         "biases are not supported (send null or leave it out)")
  kwargs = {}
  for name in _INT_FIELDS:
    value = fields.get(name)
    if isinstance(value, float) and value.is_integer():  # AReaL sends top_k 1e8
      value = int(value)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
      raise RequestError(f"'{where}.{name}' must be an integer, got {value!r}")
    kwargs[name] = value
  for name in _FLOAT_FIELDS:
    value = fields.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
      raise RequestError(f"'{where}.{name}' must be a number, got {value!r}")
    kwargs[name] = value
  for name in _BOOL_FIELDS:
    if fields.get(name) is not None and not isinstance(fields[name], bool):
      raise RequestError(f"'{where}.{name}' must be true or false, got {fields[name]!r}")
    kwargs[name] = fields.get(name)
  stop = fields.get("stop")
  stop = [stop] if isinstance(stop, str) else stop
  if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
    raise RequestError(f"'{where}.stop' must be a string or a list of strings, got {stop!r}")
  kwargs["stop"] = None if stop is None else tuple(stop)
  stop_ids = fields.get("stop_token_ids")
  if stop_ids is not None and not isinstance(stop_ids, list):
    raise RequestError(f"'{where}.stop_token_ids' must be a list of ints")
  kwargs["stop_token_ids"] = None if stop_ids is None else tuple(stop_ids)
  kwargs = {_RENAMED.get(k, k): v for k, v in kwargs.items() if v is not None}
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
  defaults = SamplingParams()
  for name in ("stop", "min_new_tokens", "repetition_penalty", "frequency_penalty",
               "presence_penalty", "no_stop_trim", "skip_special_tokens"):
    if getattr(sampling, name) != getattr(defaults, name):
      value = getattr(sampling, name)
      fields[name] = list(value) if isinstance(value, tuple) else value
  return fields


def _token_ids(value, where: str) -> list[int]:
  if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in value):
    raise RequestError(f"'{where}' must be a list of token ids")
  return value


def image_sources(value, where: str) -> list[str]:
  """One image source (base64, data URL or file path) or a list of them; URLs are refused."""
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
    return [image_sources(value, "image_data")]
  if not isinstance(value, list) or len(value) != count:
    raise RequestError(f"'image_data' must be a list with one entry per prompt ({count})")
  return [[] if v is None else image_sources(v, f"image_data[{i}]") for i, v in enumerate(value)]


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
  if is_batch and isinstance(rid, str):  # SGLang expands a batch's string rid
    rid = [f"{rid}_{i}" for i in range(count)]
  rids = [new_rid() if r is None else str(r) for r in _per_prompt(rid, count, "rid", None)]
  if len(set(rids)) != len(rids):
    raise RequestError(f"'rid' values must be unique within a request: {rids}")
  sample_ids = [[r] if sp.n == 1 else [new_rid() for _ in range(sp.n)]
                for r, sp in zip(rids, sampling)]
  return_logprob = _per_prompt(body.get("return_logprob"), count, "return_logprob", False)
  return GenerateRequest(prompts, sampling, rids, sample_ids, [bool(r) for r in return_logprob],
                         _logprob_requests(body, prompts, is_batch),
                         bool(body.get("stream", False)), is_batch,
                         parse_image_data(body.get("image_data"), count, is_batch))


def generate_request_json(prompt_ids: list[int], sampling: SamplingParams, rid: str,
                          return_logprob: bool = True, stream: bool = False) -> dict:
  return {"input_ids": list(prompt_ids), "sampling_params": sampling_to_json(sampling), "rid": rid,
          "return_logprob": return_logprob, "stream": stream}


def response_json(rid: str, prompt_ids, output_ids, logprobs, finish_reason: dict | None,
                  weight_version: str, e2e_latency: float, return_logprob: bool,
                  text: str | None, logprob_fields: dict | None = None,
                  token_text: Callable[[int], str | None] = lambda token: None) -> dict:
  """One sample's /generate answer (also each cumulative streaming chunk).

  logprob_fields: the other `meta_info` log-prob fields (`input_token_logprobs`...);
  token_text: the text of the output triplets (None unless return_text_in_logprobs).
  """
  meta = {"id": rid, "finish_reason": finish_reason, "prompt_tokens": len(prompt_ids),
          "completion_tokens": len(output_ids), "cached_tokens": 0,
          "weight_version": weight_version, "e2e_latency": e2e_latency}
  if return_logprob:
    meta["output_token_logprobs"] = [[lp, t, token_text(t)] for lp, t in zip(logprobs, output_ids)]
    meta.update(logprob_fields or {})
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
