"""A tiny random Qwen2-VL-shaped model on the vision tasks' character tokenizer, and prompts
with rendered images, shared by the engine and server image tests."""
import functools

import jax

from kimi_jax.data import image_prompts, images, rendered
from kimi_jax.data.packing import ChatTemplate
from kimi_jax.data.sources import Prompt
from kimi_jax.data.tokenizer import Tokenizer, char_tokenizer
from kimi_jax.model import ModelConfig, VisionConfig, init_params

PROCESSING = images.ImageProcessing(min_pixels=28 * 28, max_pixels=28 * 28 * 16)
TEMPLATE = ChatTemplate(add_bos=True)
# Renders messages as `encoded` writes a prompt: <bos>, then the contents.
CHAT_TEMPLATE = "<bos>{% for m in messages %}{{ m['content'] }}{% endfor %}"


def tokenizer():
  """The vision tasks' character tokenizer with the vision tokens and `CHAT_TEMPLATE`."""
  plain = image_prompts.add_vision_tokens(char_tokenizer(rendered.charset()))
  return Tokenizer(plain.hf, plain.bos_id, plain.eos_ids, plain.pad_id, CHAT_TEMPLATE)


@functools.cache
def model():
  """(config, params): embeddings scaled up so greedy decoding does not repeat one token."""
  ids = image_prompts.vision_token_ids(tokenizer())
  vision = VisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64,
                        out_hidden_size=64, image_token_id=ids.image_pad,
                        vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end)
  config = ModelConfig(vocab_size=tokenizer().vocab_size, hidden_size=64, intermediate_size=128,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True,
                       mrope_section=(2, 3, 3), vision=vision, bos_token_id=tokenizer().bos_id,
                       eos_token_id=tokenizer().eos_id)
  params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
  params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"] * 20
  return config, params


def encoded(question: str, pictures) -> image_prompts.PromptInputs:
  """The prompt's ids (image pads expanded) and preprocessed images."""
  prompt = Prompt(question=question, answer="0", id="x",
                  images=tuple(rendered.png_base64(p) for p in pictures))
  return image_prompts.encode_prompt_with_images(tokenizer(), TEMPLATE, prompt, PROCESSING)
