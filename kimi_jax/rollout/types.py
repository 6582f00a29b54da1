"""Request and result types shared by the engine, the server and the SGLang client.

Field names and meanings follow SGLang's native API.
"""
import dataclasses
import math
import operator

STOP, LENGTH, ABORT = "stop", "length", "abort"
# A sample stopped by the repeated n-gram detector finishes with type "stop" and this "matched"
# value (SGLang has no such reason; a stop string never collides because ours are token ids).
REPETITION_MATCH = "repetition"
INT32_LIMIT = 2**31
SEED_LIMIT = 2**64


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Per-request sampling settings, with SGLang's names, defaults and validity rules."""

  temperature: float = 1.0  # 0 = greedy
  top_p: float = 1.0
  top_k: int = -1  # -1 = all
  min_p: float = 0.0
  max_new_tokens: int = 128
  stop_token_ids: tuple[int, ...] = ()
  n: int = 1
  seed: int | None = None
  ignore_eos: bool = False
  stop: tuple[str, ...] = ()  # stop strings, matched in the decoded output
  min_new_tokens: int = 0  # stop ids (and stop strings) are suppressed before this many tokens
  repetition_penalty: float = 1.0  # output tokens seen: logit / p if > 0 else logit * p
  frequency_penalty: float = 0.0  # logit -= f * count in output
  presence_penalty: float = 0.0  # logit -= p * (count in output > 0)
  no_stop_trim: bool = False  # keep the matched stop string in the returned text
  skip_special_tokens: bool = True  # for the returned text

  def __post_init__(self):
    def require(ok, field, why):
      if not ok:
        raise ValueError(f"SamplingParams.{field}={getattr(self, field)!r}: {why}")

    require(self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)")
    require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
    require(self.top_k == -1 or self.top_k >= 1, "top_k", "must be -1 (all) or >= 1")
    require(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
    require(self.max_new_tokens >= 0, "max_new_tokens", "must be >= 0")
    require(self.n >= 1, "n", "must be >= 1")
    require(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens",
            "must be in [0, max_new_tokens]")
    require(0 < self.repetition_penalty <= 2, "repetition_penalty", "must be in (0, 2]")
    require(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]")
    require(-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]")
    stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
    require(all(isinstance(s, str) and s for s in stop), "stop", "must be non-empty strings")
    object.__setattr__(self, "stop", stop)
    try:
      stop_ids = tuple(operator.index(t) for t in self.stop_token_ids)
    except TypeError:
      stop_ids = (-1,)
    require(all(t >= 0 for t in stop_ids), "stop_token_ids", "must be non-negative ints")
    object.__setattr__(self, "stop_token_ids", stop_ids)
    # Every int below becomes an int32 device value; every float must be a real number.
    for field in ("max_new_tokens", "top_k", "n"):
      require(getattr(self, field) < INT32_LIMIT, field, "must be < 2**31")
    require(all(t < INT32_LIMIT for t in stop_ids), "stop_token_ids", "must be < 2**31")
    require(self.seed is None or -SEED_LIMIT < self.seed < SEED_LIMIT, "seed",
            "must fit in 64 bits")
    for field in ("temperature", "top_p", "min_p"):
      require(math.isfinite(getattr(self, field)), field, "must be finite")


@dataclasses.dataclass
class Completion:
  """One sample: the tokens after the prompt and their rollout log-probs.

  `logprobs[i]` is log_softmax(logits / T)[output_ids[i]] before top-k/top-p/min-p filtering
  (SGLang's definition; T = 1 for greedy). `output_ids` keeps the stop token, if any.
  `finish_reason` is {"type": "stop", "matched": id | stop string | "repetition"}, {"type": "length",
  "length": N} or {"type": "abort", "message": str}.
  """

  prompt_ids: list[int]
  output_ids: list[int]
  logprobs: list[float]
  finish_reason: dict
  repetition: bool = False
  weight_version: str = "0"


def stop_reason(matched) -> dict:
  return {"type": STOP, "matched": matched}


def length_reason(length: int) -> dict:
  return {"type": LENGTH, "length": length}


def abort_reason(message: str) -> dict:
  return {"type": ABORT, "message": message}
