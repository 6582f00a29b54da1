"""Qwen2-VL / Qwen2.5-VL checkpoints: load what transformers writes, export what it loads."""
import json
import os

import jax
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from kimi_jax.checkpointing import hf
from kimi_jax.model import ModelConfig, VisionConfig, apply_vlm
from tests.model.vlm_reference import hf_vlm_logits, pixels, prompt, tiny_hf_vlm

# float32 end to end; observed differences are ~1e-6 (summation order), the bar is 1e-4.
ATOL = 1e-4
GRIDS = [(1, 4, 6), (1, 2, 2)]
CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                  num_kv_heads=2, head_dim=8, qkv_bias=True, mrope_section=(1, 1, 2),
                  vision=VisionConfig(depth=1, hidden_size=16, num_heads=2, intermediate_size=32,
                                      out_hidden_size=32))
_CLASSES = {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
            "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}


@pytest.fixture(scope="module", params=[("qwen2_vl", False), ("qwen2_5_vl", False),
                                        ("qwen2_vl", True)],
                ids=lambda p: f"{p[0]}{'-tied' if p[1] else ''}")
def saved(request, tmp_path_factory):
  arch, tie = request.param
  model = tiny_hf_vlm(arch, tie)
  path = str(tmp_path_factory.mktemp(arch))
  model.save_pretrained(path)
  config, params = hf.load_hf(path)
  return arch, path, config, params


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return np.asarray([prompt(rng, [3, GRIDS[0], 2, GRIDS[1], 4])]), pixels(rng, GRIDS)


def test_config_reads_text_and_vision_parts(saved):
  arch, path, config, _ = saved
  hf_config = json.load(open(os.path.join(path, "config.json")))
  assert config.vision.architecture == arch
  assert config.mrope_section == (1, 1, 2) and config.rope_theta == 5000.0
  assert config.tie_embeddings == hf_config["tie_word_embeddings"]
  assert config.vision.image_token_id == hf_config["image_token_id"] == 90
  assert config.vision.out_hidden_size == config.hidden_size == 32
  if arch == "qwen2_5_vl":
    assert config.vision.window_size == 56 and config.vision.fullatt_block_indexes == (1,)


def test_export_then_transformers_load_gives_same_logits(saved, tmp_path):
  arch, _, config, params = saved
  hf.save_hf(str(tmp_path), config, params)
  reloaded = _CLASSES[arch].from_pretrained(str(tmp_path)).float().eval()
  tokens, pv = _inputs()
  ours = np.asarray(apply_vlm(config, params, tokens, pv, GRIDS))
  np.testing.assert_allclose(hf_vlm_logits(reloaded, tokens, pv, GRIDS), ours, atol=ATOL, rtol=0)


def test_export_writes_transformers_names_and_round_trips_exactly(saved, tmp_path):
  _, path, config, params = saved
  hf.save_hf(str(tmp_path), config, params)
  assert set(load_file(str(tmp_path / "model.safetensors"))) == set(
      load_file(os.path.join(path, "model.safetensors")))
  loaded_config, loaded = hf.load_hf(str(tmp_path))
  assert loaded_config == config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_in_memory_tensor_names_load_the_same(saved, tmp_path):
  """Checkpoints saved with transformers 5's module names (model.language_model.*,
  model.visual.*) hold the same tensors."""
  _, path, config, params = saved
  renamed = {("model.language_model." + n[len("model."):] if n.startswith("model.") else
              "model." + n if n.startswith("visual.") else n): t
             for n, t in load_file(os.path.join(path, "model.safetensors")).items()}
  save_file(renamed, str(tmp_path / "model.safetensors"))
  json.dump(hf.config_to_hf(config), open(tmp_path / "config.json", "w"))
  _, loaded = hf.load_hf(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_flat_legacy_config_loads_the_same(saved, tmp_path):
  """transformers < 4.52 wrote the text fields at top level with rope_scaling type 'mrope'."""
  _, path, config, _ = saved
  nested = json.load(open(os.path.join(path, "config.json")))
  flat = {k: v for k, v in nested.items() if k != "text_config"}
  text = dict(nested["text_config"])
  rope = text.pop("rope_parameters")
  flat.update(text, rope_theta=rope["rope_theta"],
              rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
  assert hf.config_from_hf(flat) == config


@pytest.mark.parametrize("drop, message", [
    ("vision_config", "'vision_config'"),
    ("mrope_section", r"text_config\.rope_parameters\.mrope_section"),
    ("embed_dim", r"vision_config\.'embed_dim'"),
])
def test_missing_fields_are_named(drop, message):
  cfg = hf.config_to_hf(CFG)
  for part in (cfg, cfg["text_config"]["rope_parameters"], cfg["vision_config"]):
    part.pop(drop, None)
  with pytest.raises(hf.CheckpointError, match=message):
    hf.config_from_hf(cfg, "dir/config.json")
