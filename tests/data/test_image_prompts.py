"""Prompts with images as token ids: equal to transformers' Qwen2VLProcessor on the same text."""
import numpy as np
import PIL.Image
import pytest
import transformers
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2_vl

from kimi_jax.data import image_prompts, images, rendered
from kimi_jax.data.image_prompts import IMAGE_PLACEHOLDER, encode_prompt_with_images
from kimi_jax.data.packing import ChatTemplate
from kimi_jax.data.sources import Prompt
from kimi_jax.data.tokenizer import char_tokenizer

PROCESSING = images.ImageProcessing(min_pixels=28 * 28, max_pixels=28 * 28 * 64)


@pytest.fixture(scope="module")
def tokenizer():
  return image_prompts.add_vision_tokens(char_tokenizer(rendered.charset() + "<>:"))


def hf_processor(tokenizer, directory, monkeypatch):
  # Qwen2VLProcessor type-checks a video processor, whose class needs torchvision (not
  # installed); images never reach it, so the check is skipped.
  monkeypatch.setattr(transformers.ProcessorMixin, "check_argument_for_proper_class",
                      lambda *args: None)
  tokenizer.save(str(directory))
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
  image_processor = hf_qwen2_vl.Qwen2VLImageProcessorPil(min_pixels=PROCESSING.min_pixels,
                                                         max_pixels=PROCESSING.max_pixels)
  return transformers.Qwen2VLProcessor(image_processor=image_processor, tokenizer=hf_tokenizer)


def test_equals_qwen2_vl_processor(tokenizer, tmp_path, monkeypatch):
  chart = rendered.render_chart((3, 7, 1), rendered.ChartLayout())
  strip = rendered.render_text("12+3=", 6)
  photo = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (61, 97, 3), np.uint8))
  prompt = Prompt(question="A+C=", answer="4", id="p",
                  images=(rendered.png_base64(chart), rendered.png_base64(strip),
                          rendered.png_base64(photo)))
  template = ChatTemplate(prefix="<i>:", suffix=":", add_bos=True)
  ours = encode_prompt_with_images(tokenizer, template, prompt, PROCESSING)

  processor = hf_processor(tokenizer, tmp_path, monkeypatch)
  text = template.prefix + IMAGE_PLACEHOLDER * 3 + prompt.question + template.suffix
  reference = processor(text=[text], images=[images.decode_image(s) for s in prompt.images])
  assert ours.ids == [tokenizer.bos_id] + list(reference["input_ids"][0])
  np.testing.assert_array_equal(ours.images.image_grid_thw, reference["image_grid_thw"])
  np.testing.assert_allclose(ours.images.pixel_values, reference["pixel_values"], atol=1e-6, rtol=0)

  ids = image_prompts.vision_token_ids(tokenizer)
  counts = [int(np.prod(g)) // 4 for g in ours.images.image_grid_thw]
  assert ours.ids.count(ids.image_pad) == sum(counts)
  assert ours.ids.count(ids.vision_start) == ours.ids.count(ids.vision_end) == 3
  assert tokenizer.decode(ours.ids) == template.prefix + prompt.question + template.suffix


def test_text_only_prompt_is_unchanged(tokenizer):
  prompt = Prompt(question="1+2=", answer="3", id="t")
  ours = encode_prompt_with_images(tokenizer, ChatTemplate(add_bos=True), prompt, PROCESSING)
  assert ours.ids == [tokenizer.bos_id] + tokenizer.encode("1+2=")
  assert ours.images.pixel_values.shape == (0, 1176)
  plain = char_tokenizer(rendered.charset())  # no vision tokens: text prompts still encode
  assert encode_prompt_with_images(plain, ChatTemplate(add_bos=True), prompt,
                                   PROCESSING).ids == [plain.bos_id] + plain.encode("1+2=")


def test_expand_image_pads():
  assert image_prompts.expand_image_pads([5, 9, 6, 9, 7], 9, [2, 3]) == [5, 9, 9, 6, 9, 9, 9, 7]
  # A run already of the image's length stays (ids sent pre-expanded).
  assert image_prompts.expand_image_pads([5, 9, 9, 6, 9], 9, [2, 3]) == [5, 9, 9, 6, 9, 9, 9]
  with pytest.raises(ValueError, match="2 image placeholders in the prompt for 1 images"):
    image_prompts.expand_image_pads([9, 5, 9], 9, [4])
  with pytest.raises(ValueError, match="image 0: a run of 2 image pad tokens; the image takes 4"):
    image_prompts.expand_image_pads([9, 9], 9, [4])


def test_missing_vision_tokens_named():
  with pytest.raises(ValueError, match="lacks vision tokens"):
    image_prompts.vision_token_ids(char_tokenizer("0123"))


def test_concat_images():
  a = images.preprocess([rendered.render_text("1", 4)], PROCESSING)
  b = images.preprocess([rendered.render_text("2", 4), rendered.render_text("3", 8)], PROCESSING)
  both = image_prompts.concat_images([a, b])
  np.testing.assert_array_equal(both.pixel_values,
                                np.concatenate([a.pixel_values, b.pixel_values]))
  # 28-pixel strips of 4 and 8 cells of 28 pixels: 2 x 8 and 2 x 16 patches of 14 pixels.
  assert both.image_grid_thw.tolist() == [[1, 2, 8], [1, 2, 8], [1, 2, 16]]
