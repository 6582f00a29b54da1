"""Load and export Hugging Face checkpoints (config.json + *.safetensors) for our LM.

Qwen2, Llama and Qwen3 causal LMs map one tensor to one parameter: HF linear weights are
[out, in], ours [in, out]. Exported directories load in transformers and SGLang.
"""
import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.flax import save_file

from kimi_jax.model.config import ModelConfig
from kimi_jax.model.transformer import init_params

HF_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
}
_ARCH_TO_HF = {v: k for k, v in HF_ARCHITECTURES.items()}
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint directory that does not match what the model needs."""


def _rope_theta(hf: dict, path: str) -> float:
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise CheckpointError(f"{path}: rope_type {rope_type!r} is not supported (only 'default')")
  return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict, path: str = "config.json") -> ModelConfig:
  """ModelConfig from a parsed HF config.json."""
  archs = hf.get("architectures") or []
  known = [a for a in archs if a in HF_ARCHITECTURES]
  if not known:
    raise CheckpointError(f"{path}: field 'architectures'={archs} names no supported "
                          f"architecture; supported: {sorted(HF_ARCHITECTURES)}")
  arch = HF_ARCHITECTURES[known[0]]
  for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
    if field not in hf:
      raise CheckpointError(f"{path}: missing required field {field!r}")
  num_heads = hf["num_attention_heads"]
  eos = hf.get("eos_token_id")
  return ModelConfig(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
      architecture=arch,
      rope_theta=_rope_theta(hf, path),
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      qkv_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
      qk_norm=arch == "qwen3",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=hf.get("max_position_embeddings", 4096),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=eos[0] if isinstance(eos, list) else eos,
  )


def config_to_hf(config: ModelConfig) -> dict:
  """HF config.json content for `config` (readable by transformers 4.x and 5.x)."""
  hf = {
      "architectures": [_ARCH_TO_HF[config.architecture]],
      "model_type": config.architecture,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
      "tie_word_embeddings": config.tie_embeddings,
      "max_position_embeddings": config.max_position_embeddings,
      "bos_token_id": config.bos_token_id,
      "eos_token_id": config.eos_token_id,
      "torch_dtype": config.param_dtype,
      "use_cache": True,
  }
  if config.architecture in ("llama", "qwen3"):
    hf["attention_bias"] = config.qkv_bias
  if config.architecture == "llama":
    hf["mlp_bias"] = False
  return hf


def _hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
  """HF tensor name for one of our param paths, and whether it is a transposed kernel."""
  if path == ("embed_tokens", "embedding"):
    return "model.embed_tokens.weight", False
  if path == ("final_norm", "scale"):
    return "model.norm.weight", False
  if path == ("lm_head", "kernel"):
    return "lm_head.weight", True
  layer = path[0].split("_")[1]
  module = {"attn": "self_attn", "mlp": "mlp", "input_norm": "input_layernorm",
            "post_attn_norm": "post_attention_layernorm"}[path[1]]
  parts = [f"model.layers.{layer}", module] + list(path[2:-1])
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
  return ".".join(parts + [leaf]), path[-1] == "kernel"


def _expected_shapes(config: ModelConfig) -> dict:
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  return {path: s.shape for path, s in traverse_util.flatten_dict(shapes).items()}


def _tensor_files(path: str) -> dict[str, str]:
  """tensor name -> safetensors file, from the index when the checkpoint is sharded."""
  index = os.path.join(path, _INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index}: missing 'weight_map'")
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  single = os.path.join(path, _SINGLE_FILE)
  if not os.path.exists(single):
    raise CheckpointError(f"{path}: neither {_SINGLE_FILE} nor {_INDEX_FILE} found")
  with safe_open(single, framework="flax") as f:
    return {name: single for name in f.keys()}


def load_hf_config(path: str) -> ModelConfig:
  """The ModelConfig of an HF directory's config.json."""
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise CheckpointError(f"{path}: no config.json")
  with open(config_path) as f:
    return config_from_hf(json.load(f), config_path)


def load_hf(path: str, dtype=None):
  """Read an HF directory -> (ModelConfig, params). Params are host-resident jax arrays."""
  config = load_hf_config(path)
  expected = _expected_shapes(config)
  files = _tensor_files(path)
  wanted = {_hf_name(p)[0]: p for p in expected}
  if config.tie_embeddings:
    files.pop("lm_head.weight", None)  # some exporters write the tied copy too
  missing = sorted(set(wanted) - set(files))
  unexpected = sorted(n for n in set(files) - set(wanted) if "rotary_emb" not in n)
  if missing or unexpected:
    raise CheckpointError(f"{path}: tensors missing {missing[:10]} (of {len(missing)}), "
                          f"unexpected {unexpected[:10]} (of {len(unexpected)})")
  flat = {}
  by_file: dict[str, list[str]] = {}
  for name, file in files.items():
    by_file.setdefault(file, []).append(name)
  for file, names in by_file.items():
    with safe_open(file, framework="flax") as f:
      for name in names:
        ours = wanted[name]
        tensor = f.get_tensor(name)
        tensor = tensor.T if _hf_name(ours)[1] else tensor
        if tensor.shape != expected[ours]:
          raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)} "
                                f"(as ours), expected {expected[ours]}")
        flat[ours] = tensor.astype(dtype or config.param_dtype)
  return config, traverse_util.unflatten_dict(flat)


def config_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
  """Names of the ModelConfig fields where `a` and `b` differ."""
  return [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def save_hf(path: str, config: ModelConfig, params, max_shard_bytes: int = 4 << 30,
            dtype=None, tokenizer=None) -> None:
  """Write config.json + safetensors (sharded with an index above `max_shard_bytes`), and the
  tokenizer's files when one is given (anything with `.save(directory)`)."""
  os.makedirs(path, exist_ok=True)
  if tokenizer is not None:
    tokenizer.save(path)
  flat = traverse_util.flatten_dict(params)
  tensors = {}
  for ours, value in flat.items():
    name, transpose = _hf_name(ours)
    value = np.asarray(jax.device_get(value))
    value = jnp.asarray(value.T if transpose else value, dtype or config.param_dtype)
    tensors[name] = value
  total = sum(v.nbytes for v in tensors.values())
  num_shards = max(1, math.ceil(total / max_shard_bytes))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(config), f, indent=2)
  if num_shards == 1:
    save_file(tensors, os.path.join(path, _SINGLE_FILE), metadata={"format": "pt"})
    return
  shards: list[dict] = [{} for _ in range(num_shards)]
  sizes = [0] * num_shards
  for name in sorted(tensors, key=lambda n: -tensors[n].nbytes):  # greedy balance
    i = sizes.index(min(sizes))
    shards[i][name] = tensors[name]
    sizes[i] += tensors[name].nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
    save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
    weight_map.update({name: file for name in shard})
  with open(os.path.join(path, _INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
