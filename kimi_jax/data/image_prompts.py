"""Prompts with images as token ids: Qwen2-VL's image placeholders.

An image sits in the text as `<|vision_start|><|image_pad|><|vision_end|>`; before the model
runs, its single `<|image_pad|>` becomes one pad token per LM token of the image (t * h * w /
merge_size**2 for its patch grid), which the vision-language model replaces by the image's
merged patch embeddings. Images come before the question text, in order, after the template's
prefix (as a chat message lists its images, then its text).
"""
from typing import NamedTuple, Sequence

import numpy as np

from kimi_jax.data import images
from kimi_jax.data.packing import ChatTemplate, encode_prompt
from kimi_jax.data.sources import Prompt

VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END


class VisionTokenIds(NamedTuple):
  vision_start: int
  image_pad: int
  vision_end: int


def add_vision_tokens(tokenizer):
  """Adds the three vision special tokens to `tokenizer` (in place) where missing; returns it."""
  missing = [t for t in (VISION_START, IMAGE_PAD, VISION_END) if tokenizer.hf.token_to_id(t) is None]
  tokenizer.hf.add_special_tokens(missing)
  return tokenizer


def vision_token_ids(tokenizer) -> VisionTokenIds:
  ids = [tokenizer.hf.token_to_id(t) for t in (VISION_START, IMAGE_PAD, VISION_END)]
  if None in ids:
    raise ValueError(f"the tokenizer lacks vision tokens {VISION_START}, {IMAGE_PAD}, "
                     f"{VISION_END} (add them with add_vision_tokens)")
  return VisionTokenIds(*ids)


def expand_image_pads(ids: Sequence[int], image_pad_id: int, counts: Sequence[int]) -> list[int]:
  """`ids` with its k-th image pad token repeated counts[k] times (one pad per image)."""
  pads = [i for i, token in enumerate(ids) if token == image_pad_id]
  if len(pads) != len(counts):
    raise ValueError(f"{len(pads)} image placeholders in the prompt for {len(counts)} images")
  expanded, start = [], 0
  for position, count in zip(pads, counts):
    expanded += list(ids[start:position]) + [image_pad_id] * int(count)
    start = position + 1
  return expanded + list(ids[start:])


def image_token_counts(processed: images.ProcessedImages, merge_size: int) -> list[int]:
  return [images.num_image_tokens(grid, merge_size) for grid in processed.image_grid_thw]


class PromptInputs(NamedTuple):
  """A prompt as the model takes it: token ids with expanded image pads, and its images."""
  ids: list[int]
  images: images.ProcessedImages


def encode_prompt_with_images(tokenizer, template: ChatTemplate, prompt: Prompt,
                              processing: images.ImageProcessing) -> PromptInputs:
  """[bos] + prefix + one placeholder per image + question + suffix, pads expanded."""
  pad_id = vision_token_ids(tokenizer).image_pad
  processed = images.preprocess(prompt.images, processing)
  ids = encode_prompt(tokenizer, template, IMAGE_PLACEHOLDER * len(prompt.images) + prompt.question)
  counts = image_token_counts(processed, processing.merge_size)
  return PromptInputs(expand_image_pads(ids, pad_id, counts), processed)


def concat_images(batch: Sequence[images.ProcessedImages]) -> images.ProcessedImages:
  """The images of several prompts as one set, prompts in order (the model's batch layout)."""
  if not batch:
    raise ValueError("no prompts")
  return images.ProcessedImages(np.concatenate([b.pixel_values for b in batch]),
                                np.concatenate([b.image_grid_thw for b in batch]))
