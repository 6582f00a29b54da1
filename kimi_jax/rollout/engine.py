"""In-process rollout engine: KV-cached batched sampling with continuous batching.

The host keeps a FIFO of requests and a table of which request occupies which batch row. Each
`step` admits queued requests into free rows and then runs a chunk of decode steps on device;
the chunk returns early once enough rows are free to be worth refilling, so one long sample
never idles the batch. Admitted prompts are prefilled longest first by programs of one shape
per length bucket (a power of two, capped at max_seq_len; rows = a token budget / bucket), the
rows a program's longest prompts leave free taken by the next-longest: a new prompt length, such
as a partial rollout resumed from prompt + earlier segments, never compiles a new program, and
short prompts are not padded to the longest one admitted with them. Requests admitted together
with the same prompt (the n samples of a prompt, the k trajectories of an RL group) share its
prefill: the prompt runs through the model once and its rows copy the KV cache. Weights are a
jit argument: swapping them keeps every compiled program.

Prompts may carry images (`submit(..., images=...)`, a vision-language model only): their ids
hold one image pad token per LM token of each image, and a program holding any such prompt
runs the vision tower once per distinct image (requests share a prefill only when they share
their images object; patches padded to a power of two: one program per prompt bucket and patch
bucket).
"""
import collections
import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import flax
import jax
import numpy as np

from kimi_jax.data.images import ProcessedImages
from kimi_jax.model import ModelConfig
from kimi_jax.model.mrope import image_token_counts, mrope_positions
from kimi_jax.model.vision import vision_layout
from kimi_jax.model.vlm import check_images
from kimi_jax.rollout import batch_state, scoring
from kimi_jax.rollout.batch_state import (ROW_FULL, ROW_REPEATED, ROW_RUNNING, ROW_STOPPED,
                                         Admission)
from kimi_jax.rollout.types import (REPETITION_MATCH, Completion, SamplingParams, abort_reason,
                                    length_reason, stop_reason)

__all__ = ["Completion", "RolloutEngine", "SamplingParams", "Update"]

_NO_BUDGET = 2 ** 30
# What `release_memory` can drop from the device (SGLang's memory-occupation tags).
MEMORY_TAGS = ("kv_cache", "weights")
_MIN_PROMPT_BUCKET = 8
_MIN_PATCH_BUCKET = 64


class Update(NamedTuple):
  """New tokens of one request from one `step`; `completion` is set once it has finished."""

  uid: int
  new_ids: list[int]
  new_logprobs: list[float]
  completion: Completion | None


@dataclasses.dataclass
class _Request:
  uid: int
  prompt_ids: list[int]
  sampling: SamplingParams
  sample_index: int
  seed: int
  stop_ids: tuple[int, ...]
  images: ProcessedImages | None = None
  output_ids: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)


def _specs(params) -> dict:
  return {jax.tree_util.keystr(p): (np.shape(x), np.result_type(x))
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _delete(tree) -> None:
  for x in jax.tree_util.tree_leaves(tree):
    x.delete()


def _memory_tags(tags) -> tuple[str, ...]:
  tags = MEMORY_TAGS if tags is None else tuple(tags)
  unknown = sorted(set(tags) - set(MEMORY_TAGS))
  if unknown:
    raise ValueError(f"'tags': unknown memory tags {unknown}; expected some of {MEMORY_TAGS}")
  return tags


def _bucket(n: int, minimum: int, cap: int) -> int:
  """Smallest power of two >= max(n, minimum), capped (bounds the number of compilations)."""
  return min(cap, 1 << (max(n, minimum) - 1).bit_length())


def _plain_tree(params):
  return flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else params


class RolloutEngine:
  """Samples completions from our LM; see `generate` (batch API) and `submit`/`step` (serving).

  Args:
    config, params: the model.
    max_batch: rows decoded together (fixed shape).
    max_seq_len: KV slots per row: prompt + output tokens must fit. A row that fills its slots
      finishes with finish reason "length".
    eos_token_ids: stop every request unless it sets `ignore_eos`.
    weight_version: reported in every completion; changed by `update_weights`.
    repetition_ngram, repetition_count: stop a sample whose last ngram*count tokens are one
      loop of period <= ngram (finish reason {"type": "stop", "matched": "repetition"},
      `Completion.repetition`). 0 disables.
    chunk_steps: decode steps per device program (host round-trip).
    prefill_tokens: padded prompt tokens per prefill program: a program of length bucket T
      prefills max(1, min(max_batch, prefill_tokens // T)) distinct prompts, so there is one
      prefill program per bucket (`warm_up` compiles them all).
    share_prefixes: prefill a prompt once for all requests admitted with it (False: once per
      request; the samples are the same either way).
    refill_rows: a chunk ends early once this many rows are free and requests wait
      (default max_batch // 8, at least 1).
    max_stop_ids: stop ids per request (stop_token_ids + eos), a fixed device shape.
    seed: draws the seeds of requests that give none.
    detokenize: token ids -> text; needed by requests with `stop` strings, which are matched
      on the host in the decoded output after each chunk (the sample ends at the token that
      completes the match, finish reason {"type": "stop", "matched": <string>}).
    device: where params and the batch live (default: this process's first device).
  """

  def __init__(self, config: ModelConfig, params, *, max_batch: int, max_seq_len: int,
               eos_token_ids: Sequence[int] = (), weight_version: str = "0",
               repetition_ngram: int = 0, repetition_count: int = 0, chunk_steps: int = 16,
               prefill_tokens: int = 2048, refill_rows: int | None = None, max_stop_ids: int = 8,
               share_prefixes: bool = True, seed: int = 0,
               detokenize: Callable[[list[int]], str] | None = None, device=None):
    if max_batch < 1:
      raise ValueError(f"max_batch={max_batch}: must be >= 1")
    if max_seq_len < 2:
      raise ValueError(f"max_seq_len={max_seq_len}: must be >= 2 (a prompt token and an output)")
    if repetition_ngram < 0 or (repetition_ngram > 0) != (repetition_count >= 2):
      raise ValueError(f"repetition_ngram={repetition_ngram}, repetition_count={repetition_count}: "
                       "use ngram >= 1 with count >= 2, or ngram = 0 to disable")
    if chunk_steps < 1:
      raise ValueError(f"chunk_steps={chunk_steps}: must be >= 1")
    if prefill_tokens < 1:
      raise ValueError(f"prefill_tokens={prefill_tokens}: must be >= 1")
    self.config = config
    self.max_batch = max_batch
    self.max_seq_len = max_seq_len
    self.prefill_tokens = prefill_tokens
    self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
    self.weight_version = str(weight_version)
    self.refill_rows = refill_rows or max(1, max_batch // 8)
    self.max_stop_ids = max_stop_ids
    self.share_prefixes = share_prefixes
    self.detokenize = detokenize
    self.seed = seed
    self._device = device or jax.local_devices()[0]
    self._params = self._own_copy(params)
    self._param_specs = _specs(self._params)
    self._host_params = None  # the weights while released with a host copy
    self._state = self._fresh_state()
    self._traces = collections.Counter()
    self._decode_steps = 0
    self._prefill_counts = collections.Counter(programs=0, prompt_tokens=0, shared_tokens=0)
    stopping = dict(ngram=repetition_ngram, count=repetition_count)
    self._prefill = self._jit("prefill", functools.partial(batch_state.prefill, config))
    self._prefill_images = self._jit("prefill_images",
                                     functools.partial(batch_state.prefill_images, config))
    self._decode = self._jit("decode", functools.partial(
        batch_state.decode_chunk, config, num_steps=chunk_steps, **stopping))
    self._reset_rows = jax.jit(functools.partial(batch_state.reset_rows, config, max_stop_ids),
                               donate_argnums=(0,))
    self._score = jax.jit(functools.partial(scoring.token_scores, config),
                          static_argnames=("top_k",))
    self._seed_rng = np.random.default_rng(seed)
    self._queue: collections.deque[_Request] = collections.deque()
    self._rows: list[_Request | None] = [None] * max_batch
    self._release_B = np.zeros(max_batch, bool)
    self._finished_at_submit: list[Update] = []
    self._next_uid = 0

  def _fresh_state(self) -> batch_state.BatchState:
    return jax.device_put(batch_state.init_batch_state(
        self.config, self.max_batch, self.max_seq_len, self.max_stop_ids), self._device)

  def _jit(self, name: str, fn: Callable):
    def counted(*args):
      self._traces[name] += 1  # runs only while tracing, i.e. once per compilation
      return fn(*args)
    counted.__name__ = counted.__qualname__ = name  # the program's name in profiles, HLO dumps
    return jax.jit(counted, donate_argnums=(1,))

  @property
  def num_compilations(self) -> dict[str, int]:
    """Programs traced so far, by name ("prefill" per bucket, "decode" once)."""
    return dict(self._traces)

  @property
  def num_decode_steps(self) -> int:
    """Decode steps run so far; each samples one token for every active row."""
    return self._decode_steps

  @property
  def prefill_counts(self) -> dict[str, int]:
    """Prefill programs run, prompt tokens run through the model, and prompt tokens whose KV
    cache was copied from an identical prompt admitted with them (prefix sharing)."""
    return dict(self._prefill_counts)

  @property
  def prompt_buckets(self) -> list[int]:
    """Padded prompt lengths of the prefill programs: every prompt length maps to one."""
    s = self.max_seq_len
    lengths = [1 << i for i in range(s.bit_length()) if 1 << i < s] + [s - 1]
    return sorted({self._prompt_bucket(n) for n in lengths})

  def _prompt_bucket(self, length: int) -> int:
    return _bucket(length, _MIN_PROMPT_BUCKET, self.max_seq_len)

  def _prefill_rows(self, bucket: int) -> int:
    return max(1, min(self.max_batch, self.prefill_tokens // bucket))

  def warm_up(self) -> None:
    """Compile every program the engine runs (a prefill per prompt bucket, decode) up front.

    The programs run on padding rows only (prefill) or for zero steps (decode): no state changes.
    """
    for bucket in self.prompt_buckets:
      self._state = self._prefill(self._params, self._state, self._admission(bucket, []))
    self._state, _ = self._decode(self._params, self._state, np.zeros(self.max_batch, bool),
                                  np.int32(0), np.int32(self.max_batch + 1))

  @property
  def num_running(self) -> int:
    return sum(r is not None for r in self._rows)

  @property
  def num_queued(self) -> int:
    return len(self._queue)

  @property
  def num_tokens(self) -> int:
    """Tokens (prompt + output) held in the KV cache by running requests."""
    return sum(len(r.prompt_ids) + len(r.output_ids) for r in self._rows if r is not None)

  @property
  def has_work(self) -> bool:
    return bool(self._queue or self.num_running or self._finished_at_submit)

  def update_weights(self, params, weight_version: str) -> None:
    """Swap in new parameters (same tree, shapes and dtypes); nothing recompiles.

    Every row without a running request is reset (KV cache included): nothing computed with
    the old weights reaches a later request. Requests paused in place keep their rows.
    """
    new = _plain_tree(params)
    old_specs, new_specs = self._param_specs, _specs(new)
    if old_specs != new_specs:
      diff = sorted(k for k in old_specs.keys() | new_specs.keys()
                    if old_specs.get(k) != new_specs.get(k))
      raise ValueError(f"update_weights: params differ from the engine's in {diff[:5]} "
                       f"(ours {[old_specs.get(k) for k in diff[:5]]}, "
                       f"given {[new_specs.get(k) for k in diff[:5]]})")
    if self._params is not None:
      _delete(self._params)
    self._params = self._own_copy(new)
    self._host_params = None
    self.weight_version = str(weight_version)
    if self._state is not None:  # None: released, and resumed empty
      self._state = self._reset_rows(self._state, np.array([r is None for r in self._rows]))

  def reset(self, message: str) -> list[Update]:
    """Abort every request (reason `message`) and rebuild the batch state from scratch.

    For recovery after a failed step: the device state may be half-updated or, if the failed
    program had been handed the state, deleted.
    """
    updates = self._finished_at_submit + self.abort(None, message)
    self._finished_at_submit = []
    self._release_B = np.zeros(self.max_batch, bool)
    self._state = self._fresh_state()
    return updates

  def score(self, token_ids: Sequence[int], temperature: float = 1.0, top_n: int = 0,
            ids: Sequence[int] = ()) -> tuple[np.ndarray, ...]:
    """Position t's next-token log-probs under the served weights, for t < len(token_ids):
    (logp of token_ids[t + 1] [T] (last entry meaningless), top-`top_n` log-probs and ids
    [T, top_n], log-probs of `ids` [T, len(ids)]). Padded shapes are powers of two, so few
    programs compile."""
    if self.released:
      raise ValueError(f"engine memory {list(self.released)} is released: resume it first")
    t = len(token_ids)
    bad = [i for i in list(token_ids) + list(ids) if not 0 <= i < self.config.vocab_size]
    if bad or not 0 < t <= self.max_seq_len:
      raise ValueError(f"score: {t} tokens (max_seq_len {self.max_seq_len}), ids outside "
                       f"[0, {self.config.vocab_size}): {bad[:5]}")
    tokens = np.zeros(self._prompt_bucket(t), np.int32)
    tokens[:t] = token_ids
    padded_ids = np.zeros(_bucket(len(ids), 1, 1 << 30), np.int32)
    padded_ids[:len(ids)] = ids
    top_k = min(self.config.vocab_size, _bucket(top_n, 1, 1 << 30))
    next_logp, top_logp, top_ids, ids_logp = jax.device_get(self._score(
        self._params, tokens, np.float32(temperature if temperature > 0 else 1.0), padded_ids,
        top_k=top_k))
    return next_logp[:t], top_logp[:t, :top_n], top_ids[:t, :top_n], ids_logp[:t, :len(ids)]

  # ---- hybrid deployment: give the device to a trainer between rollouts ----

  @property
  def released(self) -> tuple[str, ...]:
    """Memory tags currently off the device."""
    return tuple(t for t, held in zip(MEMORY_TAGS, (self._state, self._params)) if held is None)

  @property
  def device_bytes(self) -> int:
    """Bytes of device memory the engine holds (weights + KV cache and batch state)."""
    held = [t for t in (self._params, self._state) if t is not None]
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(held))

  def release_memory(self, tags: Sequence[str] = MEMORY_TAGS, *, keep_weights: bool = True):
    """Free the device buffers of `tags` (an idle engine only); compiled programs are kept.

    keep_weights: copy the weights to host memory first so `resume_memory` restores them;
      without it the weights come back through `update_weights` (which also resumes them).
    """
    tags = _memory_tags(tags)
    if self.has_work:
      raise ValueError("release_memory_occupation needs an idle engine: "
                       f"{self.num_running} running, {self.num_queued} queued")
    if "kv_cache" in tags and self._state is not None:
      _delete(self._state)
      self._state = None
    if "weights" in tags and self._params is not None:
      self._host_params = jax.device_get(self._params) if keep_weights else None
      _delete(self._params)
      self._params = None

  def resume_memory(self, tags: Sequence[str] = MEMORY_TAGS) -> None:
    """Put the buffers of released `tags` back on the device (the KV cache starts empty)."""
    tags = _memory_tags(tags)
    if "weights" in tags and self._params is None:
      if self._host_params is None:
        raise ValueError("resume_memory_occupation: the weights were released without a host "
                         "copy; load new ones with update_weights")
      self._params = jax.device_put(self._host_params, self._device)
      self._host_params = None
    if "kv_cache" in tags and self._state is None:
      self._state = self._fresh_state()

  def _own_copy(self, params):
    """A private copy on our device: the trainer may donate (delete) the buffers it passed."""
    return jax.device_put(_plain_tree(params), self._device, may_alias=False)

  # ---- serving API: submit / step / abort ----

  def submit(self, prompts: Sequence[Sequence[int]],
             sampling: SamplingParams | Sequence[SamplingParams],
             images: Sequence[ProcessedImages | None] | None = None) -> list[int]:
    """Queue `n` samples per prompt; returns their ids grouped [p0 x n, p1 x n, ...].

    images: per prompt, its preprocessed images (None or empty: none) in the order of its
      image pad runs.
    """
    per_prompt = ([sampling] * len(prompts) if isinstance(sampling, SamplingParams)
                  else list(sampling))
    if len(per_prompt) != len(prompts):
      raise ValueError(f"sampling: {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
    if self.released:
      raise ValueError(f"engine memory {list(self.released)} is released: resume it first")
    checked = [self._check_prompt(i, p) for i, p in enumerate(prompts)]
    images = [None] * len(prompts) if images is None else list(images)
    if len(images) != len(prompts):
      raise ValueError(f"images: {len(images)} entries for {len(prompts)} prompts")
    images = [self._check_images(i, ids, im) for i, (ids, im) in enumerate(zip(checked, images))]
    for i, sp in enumerate(per_prompt):
      if sp.stop and self.detokenize is None:
        raise ValueError(f"sampling[{i}].stop: stop strings need a tokenizer; this engine has "
                         "none (use stop_token_ids)")
    stops = [self._stop_ids(i, sp) for i, sp in enumerate(per_prompt)]
    uids = []
    for prompt_ids, prompt_images, sp, stop_ids in zip(checked, images, per_prompt, stops):
      seed = int(self._seed_rng.integers(2 ** 63)) if sp.seed is None else int(sp.seed)
      for j in range(sp.n):
        request = _Request(self._next_uid, prompt_ids, sp, j, seed, stop_ids, prompt_images)
        self._next_uid += 1
        uids.append(request.uid)
        if sp.max_new_tokens == 0:
          self._finished_at_submit.append(Update(request.uid, [], [],
                                                 self._complete(request, length_reason(0))))
        else:
          self._queue.append(request)
    return uids

  def _check_prompt(self, index: int, prompt) -> list[int]:
    ids = [int(t) for t in prompt]
    if not ids:
      raise ValueError(f"prompts[{index}]: empty prompt")
    bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
    if bad:
      raise ValueError(f"prompts[{index}]: token ids {bad[:5]} outside [0, {self.config.vocab_size})")
    if len(ids) >= self.max_seq_len:
      raise ValueError(f"prompts[{index}]: {len(ids)} tokens leave no room for output in "
                       f"max_seq_len={self.max_seq_len}")
    return ids

  def _check_images(self, index: int, ids: list[int],
                    images: ProcessedImages | None) -> ProcessedImages | None:
    """The prompt's images if it has any; a ValueError unless they match its image pads."""
    vision = self.config.vision
    has_images = images is not None and len(images.image_grid_thw) > 0
    if vision is None:
      if has_images:
        raise ValueError(f"prompts[{index}]: images given, but the model has no vision tower")
      return None
    if not has_images:
      images = ProcessedImages(np.zeros((0, vision.patch_features), np.float32),
                               np.zeros((0, 3), np.int64))
    try:
      check_images(self.config, np.asarray([ids]), images.pixel_values, images.image_grid_thw)
    except ValueError as e:
      raise ValueError(f"prompts[{index}]: {e}") from e
    if ids[-1] == vision.image_token_id:
      raise ValueError(f"prompts[{index}]: ends with an image token; end it with text (e.g. "
                       "<|vision_end|>)")
    return images if has_images else None

  def _stop_ids(self, index: int, sp: SamplingParams) -> tuple[int, ...]:
    ids = tuple(dict.fromkeys(sp.stop_token_ids + (() if sp.ignore_eos else self.eos_token_ids)))
    outside = [t for t in sp.stop_token_ids if t >= self.config.vocab_size]
    if outside:
      raise ValueError(f"sampling[{index}].stop_token_ids: {outside[:5]} outside the vocabulary "
                       f"[0, {self.config.vocab_size})")
    if len(ids) > self.max_stop_ids:
      raise ValueError(f"sampling[{index}].stop_token_ids: {len(ids)} stop ids (with eos) exceed "
                       f"max_stop_ids={self.max_stop_ids}")
    return ids

  def abort(self, uids: Sequence[int] | None = None, message: str = "aborted") -> list[Update]:
    """Finish the given (default: all) unfinished requests with reason "abort", tokens so far."""
    wanted = None if uids is None else set(uids)
    hit = lambda r: r is not None and (wanted is None or r.uid in wanted)
    updates = [Update(r.uid, [], [], self._complete(r, abort_reason(message)))
               for r in self._queue if hit(r)]
    self._queue = collections.deque(r for r in self._queue if not hit(r))
    for row, request in enumerate(self._rows):
      if hit(request):
        updates.append(Update(request.uid, [], [], self._complete(request, abort_reason(message))))
        self._rows[row] = None
        self._release_B[row] = True
    return updates

  def step(self, token_budget: int | None = None) -> list[Update]:
    """Admit waiting requests, run one decode chunk; emit at most `token_budget` tokens."""
    budget = _NO_BUDGET if token_budget is None else token_budget
    updates, self._finished_at_submit = self._finished_at_submit, []
    free_rows = [i for i, r in enumerate(self._rows) if r is None]
    admit = min(len(free_rows), len(self._queue), budget)
    if admit:
      self._prefill_requests(free_rows[:admit], [self._queue.popleft() for _ in range(admit)])
    if self.num_running and budget > 0:
      exit_when_free = (min(self.refill_rows, len(self._queue)) if self._queue
                        else self.max_batch + 1)
      self._state, emitted = self._decode(self._params, self._state, self._release_B,
                                          np.int32(budget), np.int32(exit_when_free))
      self._release_B = np.zeros(self.max_batch, bool)
      updates += self._absorb(emitted)
    return updates

  def _prefill_requests(self, rows: list[int], requests: list[_Request]) -> None:
    """Seat `requests` in `rows` and prefill their distinct prompts longest first.

    Each program is shaped by the bucket of its longest prompt and filled with the next-longest
    ones, so no program runs padding rows while shorter prompts wait for one of their own.
    """
    for row, request in zip(rows, requests):
      self._rows[row] = request
      self._release_B[row] = False
    by_prompt: dict = {}
    for seat in sorted(zip(rows, requests), key=lambda seat: -len(seat[1].prompt_ids)):
      key = ((tuple(seat[1].prompt_ids), id(seat[1].images)) if self.share_prefixes
             else seat[1].uid)
      by_prompt.setdefault(key, []).append(seat)
    groups = list(by_prompt.values())
    while groups:
      bucket = self._prompt_bucket(len(groups[0][0][1].prompt_ids))
      count = self._prefill_rows(bucket)
      admission = self._admission(bucket, groups[:count])
      prompt_images = [group[0][1].images for group in groups[:count]]
      if any(im is not None for im in prompt_images):
        self._state = self._prefill_images(self._params, self._state, admission,
                                           self._image_admission(admission, prompt_images))
      else:
        self._state = self._prefill(self._params, self._state, admission)
      for group in groups[:count]:
        self._prefill_counts["prompt_tokens"] += len(group[0][1].prompt_ids)
        self._prefill_counts["shared_tokens"] += (len(group) - 1) * len(group[0][1].prompt_ids)
      self._prefill_counts["programs"] += 1
      groups = groups[count:]

  def _admission(self, bucket: int, groups: list[list[tuple[int, _Request]]]) -> Admission:
    """Device arrays of one prefill program: one prompt row per group of (row, request) seats
    with that prompt; request rows past the seats are padding (dropped)."""
    u, r = self._prefill_rows(bucket), self.max_batch
    seated = [seat for group in groups for seat in group]
    rows, requests = [row for row, _ in seated], [q for _, q in seated]
    prompts = np.zeros((u, bucket), np.int32)
    lengths = np.ones(u, np.int32)
    for i, group in enumerate(groups):
      prompt_ids = group[0][1].prompt_ids
      prompts[i, :len(prompt_ids)] = prompt_ids
      lengths[i] = len(prompt_ids)
    stop_ids = np.full((r, self.max_stop_ids), -1, np.int32)
    for i, q in enumerate(requests):
      stop_ids[i, :len(q.stop_ids)] = q.stop_ids
    column = lambda values, dtype: np.array(values + [0] * (r - len(values)), dtype)
    sp = [q.sampling for q in requests]
    return Admission(
        rows_R=column(rows, np.int32) + np.where(np.arange(r) < len(rows), 0, self.max_batch),
        source_R=column([i for i, group in enumerate(groups) for _ in group], np.int32),
        num_rows=np.int32(len(rows)), prompts_UxT=prompts, lengths_U=lengths,
        max_new_R=column([s.max_new_tokens for s in sp], np.int32),
        temperature_R=column([s.temperature for s in sp], np.float32),
        top_p_R=column([s.top_p for s in sp], np.float32),
        top_k_R=column([s.top_k for s in sp], np.int32),
        min_p_R=column([s.min_p for s in sp], np.float32),
        seed_lo_R=column([q.seed & 0xFFFFFFFF for q in requests], np.uint32),
        seed_hi_R=column([(q.seed >> 32) & 0xFFFFFFFF for q in requests], np.uint32),
        sample_index_R=column([q.sample_index for q in requests], np.uint32),
        stop_ids_RxJ=stop_ids, min_new_R=column([s.min_new_tokens for s in sp], np.int32),
        repetition_R=np.array([s.repetition_penalty for s in sp] + [1.0] * (r - len(sp)),
                              np.float32),
        frequency_R=column([s.frequency_penalty for s in sp], np.float32),
        presence_R=column([s.presence_penalty for s in sp], np.float32))

  def _image_admission(self, admission: Admission,
                       images: list[ProcessedImages | None]) -> batch_state.ImageAdmission:
    """The distinct images of the program's prompt rows (`images`: per row, in order), patches
    padded to a power of two, with the vision layout, the embedding row of every image token
    and the M-RoPE positions of the prompts."""
    vision = self.config.vision
    with_images = [im for im in images if im is not None]
    distinct, first_row, index = [], {}, []
    for im in with_images:
      if id(im) not in first_row:
        first_row[id(im)] = sum(int(image_token_counts(vision, d.image_grid_thw).sum())
                                for d in distinct)
        distinct.append(im)
      tokens = int(image_token_counts(vision, im.image_grid_thw).sum())
      index.append(first_row[id(im)] + np.arange(tokens))
    pixel_values = np.concatenate([im.pixel_values for im in distinct])
    num_patches = _bucket(len(pixel_values), _MIN_PATCH_BUCKET, 1 << 62)
    padded = np.zeros((num_patches, pixel_values.shape[1]), np.float32)
    padded[:len(pixel_values)] = pixel_values
    layout = vision_layout(vision, np.concatenate([im.image_grid_thw for im in distinct]),
                           num_patches)
    embed_index = np.zeros(admission.prompts_UxT.size, np.int32)
    index = np.concatenate(index)
    embed_index[:len(index)] = index
    positions, deltas = mrope_positions(vision, admission.prompts_UxT,
                                        np.concatenate([im.image_grid_thw for im in with_images]),
                                        admission.lengths_U)
    return batch_state.ImageAdmission(padded, layout.hw_positions_Ox2, layout.frame_ids_O,
                                      layout.window_ids_O, embed_index, positions, deltas)

  def _absorb(self, emitted: batch_state.Emitted) -> list[Update]:
    """Append a decode chunk's tokens to their requests; complete the requests that finished."""
    tokens_IxB, logprobs_IxB, emitted_IxB, finish_B = jax.device_get(emitted)
    self._decode_steps += int(emitted_IxB.any(axis=1).sum())  # every step emits for some row
    updates = []
    for row, request in enumerate(self._rows):
      if request is None:
        continue
      mask_I = emitted_IxB[:, row]
      new_ids = tokens_IxB[mask_I, row].tolist()
      new_logprobs = logprobs_IxB[mask_I, row].tolist()
      code = int(finish_B[row])
      stop_at = self._stop_string_end(request, new_ids)
      if stop_at is not None:  # the device row ran on past the match: release it
        new_ids, new_logprobs = new_ids[:stop_at[0]], new_logprobs[:stop_at[0]]
        self._release_B[row] = code == ROW_RUNNING
      request.output_ids += new_ids
      request.logprobs += new_logprobs
      completion = None
      if stop_at is not None:
        completion = self._complete(request, stop_reason(stop_at[1]))
        self._rows[row] = None
      elif code != ROW_RUNNING:
        completion = self._complete(request, self._finish_reason(code, request),
                                    repetition=code == ROW_REPEATED)
        self._rows[row] = None
      if new_ids or completion:
        updates.append(Update(request.uid, new_ids, new_logprobs, completion))
    return updates

  def _stop_string_end(self, request: _Request, new_ids: list[int]) -> tuple[int, str] | None:
    """(tokens of `new_ids` kept, matched string) if a stop string completes in `new_ids`.

    The earliest completing token wins; no match counts before min_new_tokens outputs.
    """
    stops = request.sampling.stop
    if not stops or not new_ids:
      return None
    ids = request.output_ids + new_ids
    if not any(s in self.detokenize(ids) for s in stops):
      return None
    first = max(len(request.output_ids), request.sampling.min_new_tokens - 1)
    for end in range(first + 1, len(ids) + 1):
      text = self.detokenize(ids[:end])
      for s in stops:
        if s in text:
          return end - len(request.output_ids), s
    return None

  @staticmethod
  def _finish_reason(code: int, request: _Request) -> dict:
    if code == ROW_STOPPED:
      return stop_reason(request.output_ids[-1])
    if code == ROW_REPEATED:
      return stop_reason(REPETITION_MATCH)
    assert code == ROW_FULL, code
    return length_reason(len(request.output_ids))

  def _complete(self, request: _Request, finish_reason: dict,
                repetition: bool = False) -> Completion:
    return Completion(request.prompt_ids, request.output_ids, request.logprobs, finish_reason,
                      repetition=repetition, weight_version=self.weight_version)

  # ---- batch API ----

  def generate(self, prompts: Sequence[Sequence[int]],
               sampling: SamplingParams | Sequence[SamplingParams], *,
               token_budget: int | None = None, should_abort: Callable[[], bool] | None = None,
               on_token: Callable[[int, list[int], list[float]], None] | None = None,
               images: Sequence[ProcessedImages | None] | None = None) -> list[Completion]:
    """Sample completions, grouped [p0 x n, p1 x n, ...].

    token_budget: output tokens for the whole call; once spent, unfinished samples come back
      with finish reason "abort" and their tokens so far (resume them from prompt + output).
    should_abort: polled between decode chunks; True aborts every unfinished sample.
    on_token(index, new_ids, new_logprobs): called as tokens arrive (index into the result).
    images: per prompt, as in `submit`.
    """
    if self.has_work:
      raise RuntimeError("generate() needs an idle engine; this one is serving submitted requests")
    uids = self.submit(prompts, sampling, images)
    index = {uid: i for i, uid in enumerate(uids)}
    results: list[Completion | None] = [None] * len(uids)
    spent = 0
    while self.has_work:
      if should_abort is not None and should_abort():
        updates = self.abort(message="aborted by the caller")
      elif token_budget is not None and spent >= token_budget:
        updates = self.abort(message=f"token budget of {token_budget} spent")
      else:
        updates = self.step(None if token_budget is None else token_budget - spent)
      for update in updates:
        spent += len(update.new_ids)
        if on_token is not None and update.new_ids:
          on_token(index[update.uid], update.new_ids, update.new_logprobs)
        if update.completion is not None:
          results[index[update.uid]] = update.completion
    return results
