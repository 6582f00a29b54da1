"""Load and export Hugging Face checkpoints (config.json + *.safetensors) for our LM and VLM.

Qwen2, Llama and Qwen3 causal LMs and the Qwen2-VL / Qwen2.5-VL vision-language models map one
tensor to one parameter: HF linear weights are [out, in], ours [in, out]; HF's patch-embedding
Conv3d weight [D, C, T, P, P] is our dense kernel [C*T*P*P, D]. Exported directories load in
transformers and SGLang. VLM tensors are written with the names transformers 5 saves
(`model.layers.*`, `visual.*`); its in-memory names (`model.language_model.*`,
`model.visual.*`) are read too.
"""
import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.flax import save_file

from kimi_jax.model.config import ModelConfig, VisionConfig
from kimi_jax.model.transformer import init_params

HF_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
}
_ARCH_TO_HF = {v: k for k, v in HF_ARCHITECTURES.items()}
HF_VLM_ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}
_VLM_TO_HF = {v: k for k, v in HF_VLM_ARCHITECTURES.items()}
# Token ids a Qwen2-VL config.json carries at top level, with transformers' defaults.
_VLM_TOKEN_IDS = {"image_token_id": 151655, "video_token_id": 151656,
                  "vision_start_token_id": 151652, "vision_end_token_id": 151653}
_VLM_NAME_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint directory that does not match what the model needs."""


def _rope(hf: dict, path: str, default_theta: float,
          allowed=("default",)) -> tuple[float, tuple[int, ...] | None]:
  """(rope_theta, mrope_section or None); rope types outside `allowed` are refused."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in allowed:
    raise CheckpointError(f"{path}: rope_type {rope_type!r} is not supported (only {allowed})")
  section = rope.get("mrope_section")
  theta = float(rope.get("rope_theta", hf.get("rope_theta", default_theta)))
  return theta, None if section is None else tuple(section)


def _require_fields(hf: dict, fields, path: str, where: str = "") -> None:
  for field in fields:
    if field not in hf:
      raise CheckpointError(f"{path}: missing required field {where}{field!r}")


def _decoder_fields(hf: dict, arch: str, path: str, where: str = "") -> dict:
  """ModelConfig fields of a decoder config (a causal LM's config.json or a VLM's text part)."""
  _require_fields(hf, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads"), path, where)
  num_heads = hf["num_attention_heads"]
  eos = hf.get("eos_token_id")
  return dict(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
      architecture=arch,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      qkv_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
      qk_norm=arch == "qwen3",
      max_position_embeddings=hf.get("max_position_embeddings", 4096),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=eos[0] if isinstance(eos, list) else eos,
  )


def _vision_from_hf(hf: dict, vision_arch: str, path: str) -> VisionConfig:
  """VisionConfig from a VLM config.json's `vision_config` and top-level token ids."""
  if not isinstance(hf.get("vision_config"), dict):
    raise CheckpointError(f"{path}: missing required field 'vision_config'")
  v = hf["vision_config"]
  where = "vision_config."
  theta, _ = _rope(v, path, 10000.0, allowed=("axial", "default"))
  common = dict(architecture=vision_arch, depth=v.get("depth", 32), num_heads=v.get("num_heads", 16),
                patch_size=v.get("patch_size", 14), temporal_patch_size=v.get("temporal_patch_size", 2),
                spatial_merge_size=v.get("spatial_merge_size", 2), in_channels=v.get("in_channels", 3),
                rope_theta=theta, **{k: hf.get(k, d) for k, d in _VLM_TOKEN_IDS.items()})
  if vision_arch == "qwen2_vl":
    _require_fields(v, ("embed_dim", "hidden_size"), path, where)
    width = v["embed_dim"]
    return VisionConfig(hidden_size=width, intermediate_size=int(width * v.get("mlp_ratio", 4)),
                        out_hidden_size=v["hidden_size"],
                        hidden_act=v.get("hidden_act", "quick_gelu"), **common)
  _require_fields(v, ("hidden_size", "intermediate_size", "out_hidden_size"), path, where)
  return VisionConfig(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                      out_hidden_size=v["out_hidden_size"], hidden_act=v.get("hidden_act", "silu"),
                      window_size=v.get("window_size", 112),
                      fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
                      tokens_per_second=v.get("tokens_per_second", 4), **common)


def _vlm_config_from_hf(hf: dict, vision_arch: str, path: str) -> ModelConfig:
  text = hf.get("text_config") or hf  # transformers < 4.52 wrote the text fields at top level
  where = "text_config." if "text_config" in hf else ""
  if text.get("use_sliding_window"):
    raise CheckpointError(f"{path}: {where}use_sliding_window=true is not supported")
  theta, section = _rope(text, path, 1000000.0, allowed=("default", "mrope"))
  if section is None:
    raise CheckpointError(f"{path}: missing required field {where}rope_parameters.mrope_section")
  tie = bool(hf.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
  fields = _decoder_fields(text, "qwen2", path, where)
  fields["head_dim"] = fields["hidden_size"] // fields["num_heads"]  # fixed so in Qwen2-VL
  try:
    return ModelConfig(**fields, rope_theta=theta, tie_embeddings=tie, mrope_section=section,
                       vision=_vision_from_hf(hf, vision_arch, path))
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from e


def config_from_hf(hf: dict, path: str = "config.json") -> ModelConfig:
  """ModelConfig from a parsed HF config.json."""
  archs = hf.get("architectures") or []
  vlm = [a for a in archs if a in HF_VLM_ARCHITECTURES]
  if vlm:
    return _vlm_config_from_hf(hf, HF_VLM_ARCHITECTURES[vlm[0]], path)
  known = [a for a in archs if a in HF_ARCHITECTURES]
  if not known:
    raise CheckpointError(f"{path}: field 'architectures'={archs} names no supported "
                          f"architecture; supported: "
                          f"{sorted(HF_ARCHITECTURES) + sorted(HF_VLM_ARCHITECTURES)}")
  theta, _ = _rope(hf, path, 10000.0)
  return ModelConfig(**_decoder_fields(hf, HF_ARCHITECTURES[known[0]], path), rope_theta=theta,
                     tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def _vision_to_hf(vision: VisionConfig) -> dict:
  rope = {"rope_type": "axial", "rope_theta": vision.rope_theta}
  common = {"depth": vision.depth, "num_heads": vision.num_heads, "hidden_act": vision.hidden_act,
            "patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
            "spatial_merge_size": vision.spatial_merge_size, "in_channels": vision.in_channels,
            "rope_parameters": rope}
  if vision.architecture == "qwen2_vl":
    if vision.intermediate_size % vision.hidden_size:
      raise ValueError(f"VisionConfig.intermediate_size={vision.intermediate_size}: Qwen2-VL "
                       f"stores it as a multiple (mlp_ratio) of hidden_size={vision.hidden_size}")
    return {"model_type": "qwen2_vl_vision", "embed_dim": vision.hidden_size,
            "hidden_size": vision.out_hidden_size,
            "mlp_ratio": vision.intermediate_size // vision.hidden_size, **common}
  return {"model_type": "qwen2_5_vl_vision", "hidden_size": vision.hidden_size,
          "intermediate_size": vision.intermediate_size,
          "out_hidden_size": vision.out_hidden_size, "window_size": vision.window_size,
          "fullatt_block_indexes": list(vision.fullatt_block_indexes),
          "tokens_per_second": vision.tokens_per_second, **common}


def _vlm_config_to_hf(config: ModelConfig) -> dict:
  """Qwen2-VL / Qwen2.5-VL config.json as transformers 5 writes it (text and vision nested)."""
  vision = config.vision
  if (config.architecture != "qwen2" or not config.qkv_bias or config.qk_norm
      or config.head_dim * config.num_heads != config.hidden_size):
    raise ValueError("a Qwen2-VL decoder is qwen2 with qkv_bias, no qk_norm and head_dim == "
                     f"hidden_size / num_heads; got {config}")
  text = {
      "model_type": f"{vision.architecture}_text",
      **_decoder_to_hf(config),
      "rope_parameters": {"rope_type": "default", "mrope_section": list(config.mrope_section),
                          "rope_theta": config.rope_theta},
  }
  return {
      "architectures": [_VLM_TO_HF[vision.architecture]],
      "model_type": vision.architecture,
      "text_config": text,
      "vision_config": _vision_to_hf(vision),
      "tie_word_embeddings": config.tie_embeddings,
      "dtype": config.param_dtype,
      **{k: getattr(vision, k) for k in _VLM_TOKEN_IDS},
  }


def _decoder_to_hf(config: ModelConfig) -> dict:
  """The decoder's config.json fields shared by the text LMs and a VLM's text config."""
  return {
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "hidden_act": "silu",
      "rms_norm_eps": config.rms_norm_eps,
      "max_position_embeddings": config.max_position_embeddings,
      "bos_token_id": config.bos_token_id,
      "eos_token_id": config.eos_token_id,
      "use_cache": True,
  }


def config_to_hf(config: ModelConfig) -> dict:
  """HF config.json content for `config` (readable by transformers 4.x and 5.x; a VLM's by
  transformers >= 4.52, which reads nested text and vision configs)."""
  if config.vision is not None:
    return _vlm_config_to_hf(config)
  hf = {
      "architectures": [_ARCH_TO_HF[config.architecture]],
      "model_type": config.architecture,
      **_decoder_to_hf(config),
      "head_dim": config.head_dim,
      "rope_theta": config.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
      "tie_word_embeddings": config.tie_embeddings,
      "torch_dtype": config.param_dtype,
  }
  if config.architecture in ("llama", "qwen3"):
    hf["attention_bias"] = config.qkv_bias
  if config.architecture == "llama":
    hf["mlp_bias"] = False
  return hf


_PATCH_EMBED = ("visual", "patch_embed", "kernel")


def _hf_name(path: tuple[str, ...]) -> str:
  """HF tensor name for one of our param paths."""
  if path == ("embed_tokens", "embedding"):
    return "model.embed_tokens.weight"
  if path == ("final_norm", "scale"):
    return "model.norm.weight"
  if path == ("lm_head", "kernel"):
    return "lm_head.weight"
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
  if path == _PATCH_EMBED:
    return "visual.patch_embed.proj.weight"
  if path[0] == "visual":  # blocks_3 -> blocks.3, merger mlp_0 -> mlp.0
    return ".".join([re.sub(r"^(blocks|mlp)_(\d+)$", r"\1.\2", p) for p in path[:-1]] + [leaf])
  layer = path[0].split("_")[1]
  module = {"attn": "self_attn", "mlp": "mlp", "input_norm": "input_layernorm",
            "post_attn_norm": "post_attention_layernorm"}[path[1]]
  return ".".join([f"model.layers.{layer}", module] + list(path[2:-1]) + [leaf])


def _to_hf_layout(path: tuple[str, ...], value: np.ndarray, config: ModelConfig) -> np.ndarray:
  """Our parameter as HF stores it: kernels [in, out] -> [out, in]; the patch embedding's dense
  kernel [C*T*P*P, D] -> Conv3d weight [D, C, T, P, P]."""
  if path == _PATCH_EMBED:
    v = config.vision
    return value.T.reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size,
                           v.patch_size)
  return value.T if path[-1] == "kernel" else value


def _from_hf_layout(path: tuple[str, ...], tensor):
  """Inverse of `_to_hf_layout`."""
  if path == _PATCH_EMBED:
    return tensor.reshape(tensor.shape[0], -1).T
  return tensor.T if path[-1] == "kernel" else tensor


def _canonical_name(name: str) -> str:
  """transformers 5's in-memory VLM names -> the names it saves."""
  for alias, saved in _VLM_NAME_ALIASES:
    if name.startswith(alias):
      return saved + name[len(alias):]
  return name


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
  stored = {_canonical_name(name): (name, file) for name, file in _tensor_files(path).items()}
  wanted = {_hf_name(p): p for p in expected}
  if config.tie_embeddings:
    stored.pop("lm_head.weight", None)  # some exporters write the tied copy too
  missing = sorted(set(wanted) - set(stored))
  unexpected = sorted(n for n in set(stored) - set(wanted) if "rotary_emb" not in n)
  if missing or unexpected:
    raise CheckpointError(f"{path}: tensors missing {missing[:10]} (of {len(missing)}), "
                          f"unexpected {unexpected[:10]} (of {len(unexpected)})")
  flat = {}
  by_file: dict[str, list[tuple[str, str]]] = {}
  for canonical, (name, file) in stored.items():
    by_file.setdefault(file, []).append((canonical, name))
  for file, names in by_file.items():
    with safe_open(file, framework="flax") as f:
      for canonical, name in names:
        ours = wanted[canonical]
        tensor = _from_hf_layout(ours, f.get_tensor(name))
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
    value = _to_hf_layout(ours, np.asarray(jax.device_get(value)), config)
    tensors[_hf_name(ours)] = jnp.asarray(value, dtype or config.param_dtype)
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
