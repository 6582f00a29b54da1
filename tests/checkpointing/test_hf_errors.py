"""load_hf / save_hf: sharded index round trip and clear errors on bad checkpoints."""
import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kimi_jax.checkpointing import hf
from kimi_jax.model import ModelConfig, init_params

CFG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=8, architecture="llama", eos_token_id=2)


@pytest.fixture
def saved(tmp_path):
  params = init_params(CFG, jax.random.key(0))
  hf.save_hf(str(tmp_path), CFG, params)
  return str(tmp_path), params


def test_round_trip_sharded_index_is_exact(tmp_path):
  params = init_params(CFG, jax.random.key(0))
  hf.save_hf(str(tmp_path), CFG, params, max_shard_bytes=4096)
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
  config, loaded = hf.load_hf(str(tmp_path))
  assert config == CFG
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_unknown_architecture_is_named(saved):
  path, _ = saved
  cfg_file = os.path.join(path, "config.json")
  hf_cfg = json.load(open(cfg_file))
  hf_cfg["architectures"] = ["MambaForCausalLM"]
  json.dump(hf_cfg, open(cfg_file, "w"))
  with pytest.raises(hf.CheckpointError, match="MambaForCausalLM"):
    hf.load_hf(path)


def test_missing_tensor_is_named(saved):
  path, _ = saved
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, file)
  with pytest.raises(hf.CheckpointError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
    hf.load_hf(path)


def test_misshaped_tensor_is_named(saved):
  path, _ = saved
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((9, 16), np.float32)
  save_file(tensors, file)
  with pytest.raises(hf.CheckpointError, match="k_proj.weight.*shape"):
    hf.load_hf(path)


def test_unsupported_rope_scaling_is_rejected(saved):
  path, _ = saved
  cfg_file = os.path.join(path, "config.json")
  hf_cfg = json.load(open(cfg_file))
  hf_cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
  json.dump(hf_cfg, open(cfg_file, "w"))
  with pytest.raises(hf.CheckpointError, match="yarn"):
    hf.load_hf(path)
