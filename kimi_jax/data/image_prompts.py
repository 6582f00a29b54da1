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
  """`ids` with the k-th run of image pad tokens made counts[k] long: a single pad (as a chat
  template writes it) is repeated, a run already of that length is kept."""
  ids = list(ids)
  runs, i = [], 0
  while i < len(ids):
    if ids[i] == image_pad_id:
      end = i
      while end < len(ids) and ids[end] == image_pad_id:
        end += 1
      runs.append((i, end))
      i = end
    else:
      i += 1
  if len(runs) != len(counts):
    raise ValueError(f"{len(runs)} image placeholders in the prompt for {len(counts)} images")
  expanded, start = [], 0
  for k, ((begin, end), count) in enumerate(zip(runs, counts)):
    if end - begin not in (1, count):
      raise ValueError(f"image {k}: a run of {end - begin} image pad tokens; the image takes "
                       f"{count} (or give one pad)")
    expanded += ids[start:begin] + [image_pad_id] * int(count)
    start = end
  return expanded + ids[start:]


def image_token_counts(processed: images.ProcessedImages, merge_size: int) -> list[int]:
  return [images.num_image_tokens(grid, merge_size) for grid in processed.image_grid_thw]


def placeholder_question(prompt: Prompt) -> str:
  """The prompt's text with one placeholder per image before the question."""
  return IMAGE_PLACEHOLDER * len(prompt.images) + prompt.question


class PromptInputs(NamedTuple):
  """A prompt as the model takes it: token ids with expanded image pads, and its images."""
  ids: list[int]
  images: images.ProcessedImages


def with_image_pads(tokenizer, ids: list[int], prompt: Prompt,
                    processing: images.ImageProcessing) -> PromptInputs:
  """The prompt's ids (one placeholder per image) with the pads expanded, and its images (a
  prompt without images needs no vision tokens in the tokenizer)."""
  processed = images.preprocess(prompt.images, processing)
  if prompt.images:
    counts = image_token_counts(processed, processing.merge_size)
    ids = expand_image_pads(ids, vision_token_ids(tokenizer).image_pad, counts)
  return PromptInputs(ids, processed)


def encode_prompt_with_images(tokenizer, template: ChatTemplate, prompt: Prompt,
                              processing: images.ImageProcessing) -> PromptInputs:
  """[bos] + prefix + one placeholder per image + question + suffix, pads expanded."""
  ids = encode_prompt(tokenizer, template, placeholder_question(prompt))
  return with_image_pads(tokenizer, ids, prompt, processing)


def concat_images(batch: Sequence[images.ProcessedImages]) -> images.ProcessedImages:
  """The images of several prompts as one set, prompts in order (the model's batch layout)."""
  if not batch:
    raise ValueError("no prompts")
  return images.ProcessedImages(np.concatenate([b.pixel_values for b in batch]),
                                np.concatenate([b.image_grid_thw for b in batch]))
