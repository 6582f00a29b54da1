"""Tiny random Qwen2-VL / Qwen2.5-VL models (transformers, torch CPU, float32) and prompts with
images, as independent references for the VLM parity tests."""
import numpy as np
import torch
import transformers

# Special ids inside the tiny vocabulary; text tokens are drawn below them.
TOKEN_IDS = dict(image_token_id=90, video_token_id=91, vision_start_token_id=92,
                 vision_end_token_id=93)
TEXT_VOCAB = 90
_TEXT = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
             rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                              "rope_theta": 5000.0})
_VISION = {
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2),
    # windows of 56 pixels = 2x2 merged patches, so the test images hold several windows;
    # block 1 of 3 attends to the whole image
    "qwen2_5_vl": dict(depth=3, hidden_size=32, intermediate_size=48, out_hidden_size=32,
                       num_heads=4, window_size=56, fullatt_block_indexes=[1]),
}
_CLASSES = {
    "qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration),
}


def tiny_hf_vlm(arch: str, tie: bool = False, seed: int = 0):
  config_cls, model_cls = _CLASSES[arch]
  config = config_cls(text_config=dict(_TEXT), vision_config=dict(_VISION[arch]),
                      tie_word_embeddings=tie, **TOKEN_IDS)
  torch.manual_seed(seed)
  model = model_cls(config).float().eval()
  # Weights at 1/sqrt(fan-in) (HF's 0.02 makes attention nearly uniform, so a wrong mask or
  # window would move logits by less than the tolerance); random biases and norm scales.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2:
        p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if "embed_tokens" not in name else 1.0))
      else:
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
  return model


def image_tokens(grid_thw, merge: int = 2) -> list[int]:
  """<vision_start> image tokens (t*h*w / merge^2) <vision_end>, as the processor expands them."""
  t, h, w = grid_thw
  count = t * h * w // merge ** 2
  return ([TOKEN_IDS["vision_start_token_id"]] + [TOKEN_IDS["image_token_id"]] * count
          + [TOKEN_IDS["vision_end_token_id"]])


def prompt(rng, pieces) -> list[int]:
  """Token list from pieces: an int n is n random text tokens, a tuple (t, h, w) an image."""
  tokens = []
  for piece in pieces:
    tokens += (image_tokens(piece) if isinstance(piece, tuple)
               else rng.integers(3, TEXT_VOCAB, piece).tolist())
  return tokens


def pixels(rng, grids, patch_features: int = 3 * 2 * 14 * 14) -> np.ndarray:
  """Random pixel_values [sum t*h*w, C*T*P*P], one block of rows per image grid."""
  return rng.standard_normal((sum(t * h * w for t, h, w in grids), patch_features)).astype(np.float32)


def hf_vlm_logits(model, tokens_BxT, pixel_values, grids, attention_mask=None) -> np.ndarray:
  ids = torch.as_tensor(np.asarray(tokens_BxT))
  kwargs = {} if attention_mask is None else {"attention_mask": torch.as_tensor(attention_mask)}
  with torch.no_grad():
    out = model(input_ids=ids, pixel_values=torch.as_tensor(pixel_values),
                image_grid_thw=torch.as_tensor(np.asarray(grids)),
                mm_token_type_ids=(ids == TOKEN_IDS["image_token_id"]).int(), **kwargs)
  return out.logits.numpy()
