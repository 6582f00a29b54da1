"""Image preprocessing equals transformers' Qwen2-VL image processor on real encoded images.

The reference is `Qwen2VLImageProcessorPil` (transformers 5.24): the processor whose resize is
Pillow's bicubic, the same code path as ours, so resized pixels are identical and only the
normalization's float rounding differs. transformers computes x * (1/255), x - mean and / std
each rounded to float32; we compute in float64 and round once. Values lie in [-1.8, 2.2], where
a float32 ulp is 2.4e-7, so the tolerance is 1e-6 (4 ulps). `Qwen2VLImageProcessor` itself
is the torchvision backend in transformers 5.x (not installed here; without torchvision it
falls back to the PIL backend, as `AutoImageProcessor` does).
"""
import base64
import math

import chex
import numpy as np
import PIL.Image
import pytest
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2_vl

from kimi_jax.data import images
from kimi_jax.data.images import ImageProcessing

TOLERANCE = 1e-6  # 4 float32 ulps at |x| ~ 2: three float32 roundings against one
SMALL = ImageProcessing(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 24)


def hf_processor(processing: ImageProcessing = ImageProcessing()):
  return hf_qwen2_vl.Qwen2VLImageProcessorPil(min_pixels=processing.min_pixels,
                                              max_pixels=processing.max_pixels)


def hf_outputs(inputs, processing: ImageProcessing = ImageProcessing()):
  out = hf_processor(processing)(inputs)
  return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


def picture(height: int, width: int, mode: str, seed: int = 0) -> PIL.Image.Image:
  """Smooth gradients plus noise (so bicubic overshoot and clipping both occur)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  base = (127 + 100 * np.sin(x / 7.0 + seed) * np.cos(y / 5.0))[..., None]
  bands = len(PIL.Image.new(mode, (1, 1)).getbands())
  noisy = base + rng.normal(0, 40, (height, width, bands))
  array = np.clip(noisy, 0, 255).astype(np.uint8)
  return PIL.Image.fromarray(array[..., 0] if bands == 1 else array, mode)


def assert_same(ours: images.ProcessedImages, reference):
  pixel_values, grid = reference
  np.testing.assert_array_equal(ours.image_grid_thw, grid)
  assert ours.pixel_values.dtype == np.float32 and ours.image_grid_thw.dtype == np.int64
  chex.assert_trees_all_close(ours.pixel_values, pixel_values, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("height, width, mode, processing", [
    (37, 53, "RGB", ImageProcessing()),   # odd sides, rounded to multiples of 28
    (5, 9, "RGB", ImageProcessing()),     # tiny: grown up to min_pixels
    (1111, 1337, "RGB", ImageProcessing()),  # 1.49M pixels: shrunk below max_pixels
    (301, 211, "RGB", SMALL),             # shrunk below a small max_pixels
    (14, 700, "RGB", SMALL),              # 1:50 strip
    (101, 257, "RGBA", ImageProcessing()),  # alpha composited onto white
    (64, 45, "LA", ImageProcessing()),    # grayscale with alpha
    (83, 61, "L", ImageProcessing()),     # grayscale
])
def test_png_files_equal_transformers(tmp_path, height, width, mode, processing):
  path = str(tmp_path / "image.png")
  picture(height, width, mode).save(path)
  ours = images.preprocess([path], processing)
  assert_same(ours, hf_outputs(PIL.Image.open(path), processing))
  t, h, w = ours.image_grid_thw[0]
  pixels = h * w * processing.patch_size**2
  assert t == 1 and h % 2 == 0 and w % 2 == 0
  assert processing.min_pixels <= pixels <= processing.max_pixels


def test_palette_with_transparency_and_several_images_in_one_call(tmp_path):
  palette = picture(40, 90, "RGB", seed=1).quantize(16)
  palette.info["transparency"] = 3  # palette index 3 is transparent
  palette_path = str(tmp_path / "palette.png")
  palette.save(palette_path, transparency=3)
  others = [picture(33, 47, "RGB", seed=2), picture(200, 120, "RGBA", seed=3)]
  ours = images.preprocess([palette_path] + others)
  assert_same(ours, hf_outputs([PIL.Image.open(palette_path)] + others))
  assert len(ours.image_grid_thw) == 3


def test_every_source_kind_gives_the_same_patches(tmp_path):
  image = picture(57, 91, "RGB", seed=4)
  path = tmp_path / "image.png"
  image.save(path)
  encoded = base64.b64encode(path.read_bytes()).decode()
  reference = hf_outputs(image)
  for source in (str(path), encoded, f"data:image/png;base64,{encoded}", path.read_bytes(),
                 image, np.asarray(image)):
    assert_same(images.preprocess([source]), reference)


def test_numpy_arrays(tmp_path):
  rgba = np.asarray(picture(48, 70, "RGBA", seed=5))
  gray = np.asarray(picture(48, 70, "L", seed=6))
  rgb = np.asarray(picture(48, 70, "RGB", seed=7))
  assert_same(images.preprocess([rgb]), hf_outputs(rgb))  # transformers' own array path
  assert_same(images.preprocess([gray]), hf_outputs(gray[..., None]))
  assert_same(images.preprocess([gray[..., None]]), hf_outputs(gray[..., None]))
  # For RGBA arrays transformers blends in numpy (rounding differently from Pillow's
  # alpha_composite); ours goes through Pillow, as for an RGBA image.
  assert_same(images.preprocess([rgba]), hf_outputs(PIL.Image.fromarray(rgba)))


def test_smart_resize_equals_transformers_everywhere():
  rng = np.random.default_rng(0)
  for _ in range(3000):
    height, width = (int(v) for v in np.exp(rng.uniform(0, 8, 2)))
    if max(height, width) / min(height, width) > images.MAX_ASPECT_RATIO:
      continue
    low = int(rng.integers(1, 64)) * 28 * 28
    processing = ImageProcessing(min_pixels=low, max_pixels=low * int(rng.integers(1, 400)))
    expected = hf_qwen2_vl.smart_resize(height, width, 28, processing.min_pixels,
                                        processing.max_pixels)
    assert images.smart_resize(height, width, processing) == expected, (height, width, processing)


def test_patch_rows_are_merge_windows_and_columns_repeat_the_frame():
  processing = ImageProcessing()
  p, m = processing.patch_size, processing.merge_size
  pixels_CxYxX = np.random.default_rng(0).normal(size=(3, 4 * p, 6 * p)).astype(np.float32)
  frames = np.broadcast_to(pixels_CxYxX, (2, *pixels_CxYxX.shape))
  patches, grid = images.patchify(frames, processing)
  assert grid == (1, 4, 6)
  chex.assert_shape(patches, (24, 3 * 2 * p * p))
  row = 0
  for window_row in range(4 // m):
    for window_col in range(6 // m):
      for r in range(m):
        for c in range(m):
          y, x = (window_row * m + r) * p, (window_col * m + c) * p
          patch_CxPxP = pixels_CxYxX[:, y:y + p, x:x + p]
          expected = np.stack([patch_CxPxP, patch_CxPxP], axis=1).reshape(-1)  # (C, frame, P, P)
          np.testing.assert_array_equal(patches[row], expected)
          row += 1


def test_preprocessor_config_round_trips_through_transformers(tmp_path):
  processing = ImageProcessing(min_pixels=28 * 28 * 6, max_pixels=28 * 28 * 30)
  images.save_image_processing(str(tmp_path), processing)
  assert images.load_image_processing(str(tmp_path)) == processing
  assert images.load_image_processing(str(tmp_path / "missing")) == ImageProcessing()
  loaded = hf_qwen2_vl.Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path))
  image = picture(500, 333, "RGB", seed=8)
  out = loaded(image)
  assert_same(images.preprocess([image], processing),
              (np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])))
  assert ImageProcessing.from_hf(processing.to_hf()) == processing
  legacy = {"min_pixels": 100, "max_pixels": 5000, "patch_size": 14}  # pre-`size` files
  assert ImageProcessing.from_hf(legacy) == ImageProcessing(min_pixels=100, max_pixels=5000)


def test_token_count():
  grid = images.preprocess([picture(100, 150, "RGB")]).image_grid_thw[0]
  assert images.num_image_tokens(grid, 2) == math.prod(grid) // 4 == (112 // 28) * (140 // 28)


def test_empty_batch():
  out = images.preprocess([])
  chex.assert_shape(out.pixel_values, (0, 1176))
  chex.assert_shape(out.image_grid_thw, (0, 3))


@pytest.mark.parametrize("source, message", [
    ("missing/image.png", "no such file"),
    ("data:image/png,abc", "data URL must look like"),
    ("data:image/png;base64,@@@", "invalid base64"),
    (base64.b64encode(b"not an image at all").decode(), "not a decodable image"),
    (np.zeros((4, 4), np.float32), "expected uint8"),
    (np.zeros((3, 40, 50), np.uint8), "channels last"),
    (np.zeros((2, 500), np.uint8), "aspect ratio"),
    (3, "expected a path"),
])
def test_bad_sources_are_named(source, message):
  with pytest.raises((ValueError, TypeError), match=message):
    images.preprocess([source])
