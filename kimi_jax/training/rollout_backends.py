"""Where the RL loop's samples come from: the in-process engine or SGLang servers.

Both expose `generate(inputs, sampling) -> completions` and `sync(params, version)`; the loop
does not know which one it has. SGLang servers (real ones on GPU pods, or our own
`launch.serve`) receive weights as an HF safetensors directory + /update_weights_from_disk.
"""
import asyncio
import os
import shutil

from kimi_jax.checkpointing.hf import save_hf
from kimi_jax.rollout.engine import RolloutEngine
from kimi_jax.rollout.sglang_client import SGLangClient

BACKENDS = ("engine", "sglang")


class EngineBackend:
  def __init__(self, model_config, params, rollout_config, rl_config, eos_id, version: str):
    self.engine = RolloutEngine(model_config, params, max_batch=rollout_config.max_batch,
                                max_seq_len=rollout_config.max_seq_len, eos_token_ids=(eos_id,),
                                weight_version=version, repetition_ngram=rl_config.repetition_ngram,
                                repetition_count=rl_config.repetition_count)

  def generate(self, inputs, sampling):
    return self.engine.generate(inputs, sampling)

  def sync(self, params, version: str) -> None:
    self.engine.update_weights(params, version)

  def close(self) -> None:
    pass


class SGLangBackend:
  """SGLang's native HTTP API through `SGLangClient`, driven from the synchronous loop."""

  def __init__(self, model_config, tokenizer, urls, weights_dir: str):
    if not urls:
      raise ValueError("config.rollout.urls is empty: the sglang backend needs server URLs")
    self.model_config, self.tokenizer, self.weights_dir = model_config, tokenizer, weights_dir
    self._loop = asyncio.new_event_loop()
    self.client = SGLangClient(list(urls))

  def generate(self, inputs, sampling):
    return self._loop.run_until_complete(self.client.generate(inputs, sampling))

  def sync(self, params, version: str) -> None:
    """Write HF safetensors (+ tokenizer) for `version`, point every server at them, then drop
    the previous version's directory."""
    path = os.path.join(self.weights_dir, f"v{version}")
    save_hf(path, self.model_config, params, tokenizer=self.tokenizer)
    self._loop.run_until_complete(self.client.update_weights_from_disk(path, version))
    for name in os.listdir(self.weights_dir):
      if name != f"v{version}":
        shutil.rmtree(os.path.join(self.weights_dir, name), ignore_errors=True)

  def close(self) -> None:
    self._loop.run_until_complete(self.client.close())
    self._loop.close()


def build_backend(config, model_config, tokenizer, params, version: str, workdir: str):
  rollout = config.rollout
  if rollout.backend == "engine":
    return EngineBackend(model_config, params, rollout, config.rl, tokenizer.eos_id, version)
  if rollout.backend == "sglang":
    backend = SGLangBackend(model_config, tokenizer, rollout.urls,
                            os.path.join(workdir, "rollout_weights"))
    backend.sync(params, version)
    return backend
  raise ValueError(f"config.rollout.backend={rollout.backend!r}: expected one of {BACKENDS}")
