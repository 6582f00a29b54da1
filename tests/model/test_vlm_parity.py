"""Our VLM against transformers (torch CPU, float32) on tiny random Qwen2-VL and Qwen2.5-VL
models: image embeddings, M-RoPE positions, full forward with several odd-sized images, a batch
of prompts with different images, and KV-cache decode after the images."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kimi_jax.checkpointing import hf
from kimi_jax.model import (apply_vlm, decode_lm, init_kv_cache, prepare_vlm_inputs,
                            vlm_prefill)
from kimi_jax.model.mrope import mrope_positions
from kimi_jax.model.vision import vision_layout
from kimi_jax.model.vlm import encode_images
from tests.model.vlm_reference import (TEXT_VOCAB, TOKEN_IDS, hf_vlm_logits, pixels, prompt,
                                       tiny_hf_vlm)

# float32 end to end; 1e-4 absolute is the bar (observed differences are ~1e-7, from
# summation order in matmuls and softmax).
ATOL = 1e-4
# Patch grids (t, h, w) of odd-sized images: 84x140, 56x56 and 28x84 pixels (the last given two
# temporal patches, as a 4-frame clip would be), and 140x56.
GRIDS = [(1, 6, 10), (1, 4, 4), (2, 2, 6), (1, 10, 4)]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def vlm(request, tmp_path_factory):
  model = tiny_hf_vlm(request.param)
  path = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(path)
  config, params = hf.load_hf(path)
  return model, config, params


def test_image_embeddings_match_transformers(vlm):
  model, config, params = vlm
  pv = pixels(np.random.default_rng(0), GRIDS)
  with torch.no_grad():
    ref = model.model.get_image_features(torch.as_tensor(pv), torch.as_tensor(GRIDS)).pooler_output
  ours = jax.jit(encode_images, static_argnums=0)(config, params, jnp.asarray(pv), vision_layout(config.vision, GRIDS))
  np.testing.assert_allclose(np.asarray(ours), torch.cat(ref).numpy(), atol=ATOL, rtol=0)


def test_mrope_positions_match_get_rope_index(vlm):
  """Right-padded rows of different lengths against HF's get_rope_index with an attention mask."""
  model, config, _ = vlm
  rng = np.random.default_rng(2)
  rows = [prompt(rng, [3, GRIDS[0], 2, GRIDS[2], 4]), prompt(rng, [GRIDS[1], 5, GRIDS[3]])]
  lengths = np.array([len(r) for r in rows])
  tokens = np.zeros((2, lengths.max()), np.int64)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  mask = np.arange(tokens.shape[1]) < lengths[:, None]
  grids = [GRIDS[0], GRIDS[2], GRIDS[1], GRIDS[3]]  # in order of appearance
  ids = torch.as_tensor(tokens)
  ref_pos, ref_delta = model.model.get_rope_index(
      ids, mm_token_type_ids=(ids == TOKEN_IDS["image_token_id"]).int(),
      image_grid_thw=torch.as_tensor(grids), attention_mask=torch.as_tensor(mask))
  positions, deltas = mrope_positions(config.vision, tokens, grids, lengths)
  np.testing.assert_array_equal(positions[:, mask], ref_pos.numpy()[:, mask])
  np.testing.assert_array_equal(deltas, ref_delta.numpy()[:, 0])
  assert deltas.min() < 0  # images take fewer positions than tokens


def test_several_images_in_one_prompt(vlm):
  model, config, params = vlm
  rng = np.random.default_rng(3)
  tokens = np.asarray([prompt(rng, [4, GRIDS[0], 3, GRIDS[1], 2, GRIDS[2], GRIDS[3], 5])])
  pv = pixels(rng, GRIDS)
  ours = np.asarray(apply_vlm(config, params, tokens, pv, GRIDS))
  np.testing.assert_allclose(ours, hf_vlm_logits(model, tokens, pv, GRIDS), atol=ATOL, rtol=0)


def test_batch_of_prompts_with_different_images(vlm):
  model, config, params = vlm
  rng = np.random.default_rng(4)
  rows = [prompt(rng, [2, GRIDS[3], 3]), prompt(rng, [GRIDS[1], 4, GRIDS[0], 1])]
  width = max(map(len, rows))
  tokens = np.asarray([r + rng.integers(3, TEXT_VOCAB, width - len(r)).tolist() for r in rows])
  grids = [GRIDS[3], GRIDS[1], GRIDS[0]]
  pv = pixels(rng, grids)
  ours = np.asarray(apply_vlm(config, params, tokens, pv, grids))
  np.testing.assert_allclose(ours, hf_vlm_logits(model, tokens, pv, grids), atol=ATOL, rtol=0)


def test_kv_cache_decode_continues_after_images(vlm):
  """Right-padded prefill of two prompts of different lengths, then token-by-token decode at
  rope position = slot + rope delta; each row equals HF's forward of prompt + continuation."""
  model, config, params = vlm
  rng = np.random.default_rng(5)
  row_grids = [[GRIDS[0], GRIDS[1]], [GRIDS[3]]]
  rows = [prompt(rng, [3, row_grids[0][0], 2, row_grids[0][1], 2]),
          prompt(rng, [row_grids[1][0], 6])]
  steps = 4
  continuation = rng.integers(3, TEXT_VOCAB, (2, steps))
  lengths = np.array([len(r) for r in rows])
  tokens = np.zeros((2, lengths.max()), np.int64)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  grids = row_grids[0] + row_grids[1]
  pv = pixels(rng, grids)
  inputs = prepare_vlm_inputs(config, tokens, pv, grids, lengths)
  cache = init_kv_cache(config, 2, int(lengths.max()) + steps)
  logits, cache = jax.jit(vlm_prefill, static_argnums=0)(config, params, jnp.asarray(tokens),
                                                         inputs, cache)
  per_row = [[np.asarray(logits[i, :lengths[i]])] for i in range(2)]
  decode = jax.jit(decode_lm, static_argnums=0)
  for step in range(steps):
    slots = jnp.asarray(lengths + step)[:, None]
    logits, cache = decode(config, params, jnp.asarray(continuation[:, step:step + 1]), slots,
                              cache, rope_positions=slots + jnp.asarray(inputs.rope_delta_B)[:, None])
    for i in range(2):
      per_row[i].append(np.asarray(logits[i]))
  start = 0
  for i, row in enumerate(rows):
    row_pixels = pv[start:start + sum(t * h * w for t, h, w in row_grids[i])]
    start += len(row_pixels)
    ref = hf_vlm_logits(model, [row + continuation[i].tolist()], row_pixels, row_grids[i])[0]
    np.testing.assert_allclose(np.concatenate(per_row[i]), ref, atol=ATOL, rtol=0)


def test_greedy_decode_matches_transformers_generate(vlm):
  """Our prefill + cached greedy steps emit the tokens of HF's own cached `generate` (which
  carries its rope deltas across steps)."""
  model, config, params = vlm
  rng = np.random.default_rng(6)
  grids = [GRIDS[0], GRIDS[2]]
  tokens = np.asarray([prompt(rng, [2, grids[0], 3, grids[1], 4])])
  pv = pixels(rng, grids)
  steps = 8
  ids = torch.as_tensor(tokens)
  with torch.no_grad():
    ref = model.generate(input_ids=ids, pixel_values=torch.as_tensor(pv),
                         image_grid_thw=torch.as_tensor(grids),
                         mm_token_type_ids=(ids == TOKEN_IDS["image_token_id"]).int(),
                         max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
  inputs = prepare_vlm_inputs(config, tokens, pv, grids)
  cache = init_kv_cache(config, 1, tokens.shape[1] + steps)
  logits, cache = jax.jit(vlm_prefill, static_argnums=0)(config, params, jnp.asarray(tokens),
                                                         inputs, cache)
  decode = jax.jit(decode_lm, static_argnums=0)
  out = [int(jnp.argmax(logits[0, -1]))]
  for step in range(steps - 1):
    slot = jnp.full((1, 1), tokens.shape[1] + step)
    logits, cache = decode(config, params, jnp.asarray([[out[-1]]]), slot, cache,
                           rope_positions=slot + int(inputs.rope_delta_B[0]))
    out.append(int(jnp.argmax(logits[0, -1])))
  assert out == ref[0, tokens.shape[1]:].tolist()
