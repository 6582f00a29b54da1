"""The rollout contract every sampler implements, and its two implementations.

`RolloutBackend` is what the RL loop, evaluation and curation call: the in-process
`RolloutEngine` (`EngineBackend`) and SGLang-API servers (`SGLangBackend`, real SGLang on GPU
pods or our own `launch.serve`) both implement it, as do the test fakes. SGLang servers receive
weights as an HF safetensors directory + /update_weights_from_disk. The processes of a
multi-process job each run their own engine on their own devices, or share one SGLang fleet.
"""
import asyncio
import os
import shutil
from typing import Protocol, Sequence, runtime_checkable

from kimi_jax.checkpointing.hf import save_hf
from kimi_jax.data import image_prompts, images as image_inputs
from kimi_jax.rollout.engine import RolloutEngine
from kimi_jax.rollout.sglang_client import SGLangClient
from kimi_jax.rollout.types import Completion, SamplingParams
from kimi_jax.sharding.processes import Processes, this_job

BACKENDS = ("engine", "sglang")


@runtime_checkable
class RolloutBackend(Protocol):
  """Samples completions from a policy whose weights the trainer pushes."""

  def generate(self, requests: Sequence[Sequence[int]], sampling: Sequence[SamplingParams],
               images: Sequence[Sequence[str]] | None = None) -> list[Completion]:
    """One completion per request (prompt token ids), in request order. `images`: per request
    its image sources (base64, data URL or path), one image pad run each in its ids (a single
    pad, expanded by the backend, or already of the image's length)."""

  def sync(self, params, version: str) -> None:
    """Serve `params` from now on, reported as `version` in every completion."""

  def release(self) -> None:
    """Free accelerator memory (weights, KV cache) while the trainer runs on the same chips."""

  def resume(self) -> None:
    """Take the memory back after `release`, the weights served before it included."""

  def close(self) -> None:
    """Stop for good (connections, event loops)."""


class EngineBackend:
  """`RolloutEngine` in this process."""

  def __init__(self, model_config, params, rollout_config, rl_config, eos_ids, version: str,
               image_processing: image_inputs.ImageProcessing = image_inputs.ImageProcessing()):
    self.image_processing = image_processing
    self.engine = RolloutEngine(model_config, params, max_batch=rollout_config.max_batch,
                                max_seq_len=rollout_config.max_seq_len,
                                eos_token_ids=tuple(eos_ids),
                                weight_version=version, repetition_ngram=rl_config.repetition_ngram,
                                repetition_count=rl_config.repetition_count)

  def generate(self, requests, sampling, images=None):
    if not images or not any(images):
      return self.engine.generate(requests, sampling)
    processed, expanded, prompt_images = {}, [], []
    for ids, sources in zip(requests, images):
      sources = tuple(sources or ())
      if sources and sources not in processed:  # the samples of a prompt share one object
        processed[sources] = image_inputs.preprocess(sources, self.image_processing)
      if sources:
        counts = image_prompts.image_token_counts(processed[sources],
                                                  self.image_processing.merge_size)
        ids = image_prompts.expand_image_pads(ids, self.engine.config.vision.image_token_id,
                                              counts)
      expanded.append(ids)
      prompt_images.append(processed.get(sources))
    return self.engine.generate(expanded, sampling, images=prompt_images)

  def sync(self, params, version: str) -> None:
    self.engine.update_weights(params, version)

  def release(self) -> None:
    self.engine.release_memory(keep_weights=False)  # `sync` brings the trainer's weights

  def resume(self) -> None:
    self.engine.resume_memory(["kv_cache"])

  def close(self) -> None:
    pass


class SGLangBackend:
  """SGLang's native HTTP API through `SGLangClient`, driven from the synchronous loop.

  The `processes` of a job (default: the JAX job's) share the fleet: each sends only the
  requests it is given. Weight syncs and memory calls act on the whole fleet, so process 0
  alone sends them (and writes the weights), once every process has reached the call, and no
  process goes on before it is done; every process must make these calls (collectives).
  """

  def __init__(self, model_config, tokenizer, urls, weights_dir: str,
               processes: Processes | None = None):
    if not urls:
      raise ValueError("config.rollout.urls is empty: the sglang backend needs server URLs")
    self.model_config, self.tokenizer, self.weights_dir = model_config, tokenizer, weights_dir
    self.processes = processes or this_job()
    self._loop = asyncio.new_event_loop()
    self.client = SGLangClient(list(urls))

  def generate(self, requests, sampling, images=None):
    return self._loop.run_until_complete(self.client.generate(requests, sampling, images=images))

  def _for_all_processes(self, action) -> None:
    """`action()` on process 0 after every process's requests so far, before any later one."""
    self.processes.barrier()
    if self.processes.is_main:
      action()
    self.processes.barrier()

  def sync(self, params, version: str) -> None:
    """Write HF safetensors (+ tokenizer) for `version`, point every server at them, then drop
    the previous version's directory. Only process 0 reads `params`."""
    self._for_all_processes(lambda: self._write_and_load(params, version))

  def _write_and_load(self, params, version: str) -> None:
    path = os.path.join(self.weights_dir, f"v{version}")
    save_hf(path, self.model_config, params, tokenizer=self.tokenizer)
    self._loop.run_until_complete(self.client.update_weights_from_disk(path, version))
    for name in os.listdir(self.weights_dir):
      if name != f"v{version}":
        shutil.rmtree(os.path.join(self.weights_dir, name), ignore_errors=True)

  def release(self) -> None:
    self._for_all_processes(
        lambda: self._loop.run_until_complete(self.client.release_memory_occupation()))

  def resume(self) -> None:
    self._for_all_processes(
        lambda: self._loop.run_until_complete(self.client.resume_memory_occupation()))

  def close(self) -> None:
    self._loop.run_until_complete(self.client.close())
    self._loop.close()


def build_backend(config, model_config, tokenizer, params, version: str,
                  workdir: str) -> RolloutBackend:
  """The backend `config.rollout.backend` names, serving `params` as `version`."""
  rollout = config.rollout
  if rollout.backend == "engine":
    return EngineBackend(model_config, params, rollout, config.rl, tokenizer.eos_ids, version,
                         image_inputs.run_image_processing(config))
  if rollout.backend == "sglang":
    backend = SGLangBackend(model_config, tokenizer, rollout.urls,
                            os.path.join(workdir, "rollout_weights"))
    backend.sync(params, version)
    return backend
  raise ValueError(f"config.rollout.backend={rollout.backend!r}: expected one of {BACKENDS}")
