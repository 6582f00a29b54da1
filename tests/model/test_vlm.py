"""Internal consistency of the VLM: sharded and blockwise paths, padded patch sequences,
text-only prompts, and errors on inputs that do not fit together."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.model import (ModelConfig, VisionConfig, apply_lm, apply_vlm, init_params,
                            param_logical_specs, prepare_vlm_inputs, vlm_logits)
from kimi_jax.sharding.rules import activation_mesh, logical_shardings, make_mesh
from tests.model.vlm_reference import TOKEN_IDS, pixels, prompt

# float32 throughout; different but mathematically equal summation orders stay within 1e-5.
ATOL = 1e-5
VISION = VisionConfig(depth=2, hidden_size=32, num_heads=4, intermediate_size=48,
                      out_hidden_size=32, architecture="qwen2_5_vl", hidden_act="silu",
                      window_size=56, fullatt_block_indexes=(1,), **TOKEN_IDS)
CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, qkv_bias=True, mrope_section=(1, 1, 2), vision=VISION)
GRIDS = [(1, 6, 4), (1, 2, 2)]


@pytest.fixture(scope="module")
def params():
  return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  tokens = np.asarray([prompt(rng, [2, GRIDS[0], 3]), prompt(rng, [4, GRIDS[1], 6])])
  return tokens, pixels(rng, GRIDS)


def test_sharded_forward_equals_single_device(params, batch):
  tokens, pv = batch
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  sharded = jax.device_put(params, logical_shardings(mesh, param_logical_specs(CFG)))
  inputs = prepare_vlm_inputs(CFG, tokens, pv, GRIDS)
  with activation_mesh(mesh):
    out = jax.jit(vlm_logits, static_argnums=0)(CFG, sharded, jnp.asarray(tokens), inputs)
  np.testing.assert_allclose(out, apply_vlm(CFG, params, tokens, pv, GRIDS), atol=ATOL)


def test_blockwise_attention_equals_dot_product(params, batch):
  tokens, pv = batch
  blockwise = dataclasses.replace(CFG, attention="blockwise", attention_block_size=8)
  np.testing.assert_allclose(apply_vlm(blockwise, params, tokens, pv, GRIDS),
                             apply_vlm(CFG, params, tokens, pv, GRIDS), atol=ATOL)


def test_padded_patch_sequence_gives_the_same_logits(params, batch):
  """Padding patches (one compiled shape for many image sizes) see only each other."""
  tokens, pv = batch
  inputs = prepare_vlm_inputs(CFG, tokens, pv, GRIDS, num_patches=len(pv) + 8)
  assert inputs.pixel_values_OxE.shape == (len(pv) + 8, pv.shape[1])
  inputs = inputs._replace(pixel_values_OxE=np.concatenate([pv, np.ones((8, pv.shape[1]))]))
  out = jax.jit(vlm_logits, static_argnums=0)(CFG, params, jnp.asarray(tokens), inputs)
  np.testing.assert_allclose(out, apply_vlm(CFG, params, tokens, pv, GRIDS), atol=ATOL)


def test_packed_rows_equal_separate_rows(params, batch):
  """Two prompts with images packed in one row (segment ids, positions restarting at 0) give
  each prompt's own logits: M-RoPE counts from 0 in each segment."""
  tokens, pv = batch
  packed = tokens.reshape(1, -1)
  t = tokens.shape[1]
  segment_ids = np.repeat([[1, 2]], t, axis=1)
  positions = np.tile(np.arange(t), 2)[None]
  inputs = prepare_vlm_inputs(CFG, packed, pv, GRIDS, segment_ids_BxT=segment_ids)
  out = jax.jit(vlm_logits, static_argnums=0)(CFG, params, jnp.asarray(packed), inputs,
                                              jnp.asarray(positions), jnp.asarray(segment_ids))
  np.testing.assert_allclose(out.reshape(tokens.shape + (-1,)),
                             apply_vlm(CFG, params, tokens, pv, GRIDS), atol=ATOL)


def test_text_only_prompt_equals_the_text_decoder(params):
  tokens = np.random.default_rng(1).integers(3, 90, (2, 9))
  np.testing.assert_allclose(apply_vlm(CFG, params, tokens, None, None),
                             jax.jit(apply_lm, static_argnums=0)(CFG, params, jnp.asarray(tokens)),
                             atol=ATOL)


def test_mismatched_inputs_are_named(params, batch):
  tokens, pv = batch
  with pytest.raises(ValueError, match=r"pixel_values shape \(24, 1176\): .* \(28, 1176\)"):
    apply_vlm(CFG, params, tokens, pv[:-4], GRIDS)
  with pytest.raises(ValueError, match=r"image_grid_thw\[1\]=\(1, 3, 2\)"):
    apply_vlm(CFG, params, tokens, pv, [GRIDS[0], (1, 3, 2)])
  text_for_image = tokens.copy()
  text_for_image[0, 3] = 5
  with pytest.raises(ValueError, match="tokens hold 6 image tokens"):
    apply_vlm(CFG, params, text_for_image, pv, GRIDS)
  swapped = [GRIDS[1], GRIDS[0]]
  with pytest.raises(ValueError, match=r"row 0 position 4: image 1 with grid \(1, 6, 4\)"):
    prepare_vlm_inputs(CFG, tokens, pv, swapped)


@pytest.mark.parametrize("architecture", ["qwen2_vl", "qwen2_5_vl"])
def test_num_params_counts_the_parameter_tree(architecture):
  vision = (dataclasses.replace(VISION, architecture="qwen2_vl", hidden_act="quick_gelu",
                                window_size=0, fullatt_block_indexes=())
            if architecture == "qwen2_vl" else VISION)
  config = dataclasses.replace(CFG, vision=vision)
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  assert config.num_params == sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def test_vision_config_errors_name_the_field():
  with pytest.raises(ValueError, match="VisionConfig.window_size=0"):
    dataclasses.replace(VISION, window_size=0)
  with pytest.raises(ValueError, match="ModelConfig.vision"):
    dataclasses.replace(CFG, hidden_size=64, num_heads=8)
  with pytest.raises(ValueError, match="ModelConfig.mrope_section"):
    dataclasses.replace(CFG, mrope_section=(1, 1, 1))


def test_remat_blockwise_gradients_equal_dot_product(params, batch):
  """The vision tower trains: gradients (visual params included) through rematerialised
  blockwise attention equal the plain path's."""
  tokens, pv = batch
  inputs = prepare_vlm_inputs(CFG, tokens, pv, GRIDS)
  loss = lambda config: lambda p: vlm_logits(config, p, jnp.asarray(tokens), inputs).std()
  fast = dataclasses.replace(CFG, attention="blockwise", attention_block_size=8, remat=True)
  g_plain, g_fast = jax.jit(jax.grad(loss(CFG)))(params), jax.jit(jax.grad(loss(fast)))(params)
  assert np.abs(g_plain["visual"]["patch_embed"]["kernel"]).max() > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL), g_plain, g_fast)


def test_bfloat16_activations_stay_near_float32(params, batch):
  """bf16 matmuls (8-bit mantissa) through 2 ViT blocks and 2 decoder layers: logits (|max|
  ~0.4 at init) within 0.01 of float32 (observed 0.003)."""
  tokens, pv = batch
  bf16 = dataclasses.replace(CFG, dtype="bfloat16")
  out = apply_vlm(bf16, params, tokens, pv, GRIDS)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, apply_vlm(CFG, params, tokens, pv, GRIDS), atol=0.01)
