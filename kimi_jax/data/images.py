"""Image inputs of the vision-language model, preprocessed as Qwen2-VL's image processor does.

The reference semantics are those of transformers' PIL backend (`Qwen2VLImageProcessorPil`):

1. decode: a file path, base64 string, `data:image/...;base64,` URL, raw bytes, PIL image or
   uint8 numpy array becomes an RGB PIL image. Transparency is composited onto white, grayscale
   and palette images are converted; encoded images are turned upright by their EXIF tag.
2. resize with Pillow's bicubic filter to `smart_resize`'s (height, width): multiples of
   patch_size * merge_size (28) with height * width inside [min_pixels, max_pixels], the
   aspect ratio kept as closely as that allows.
3. rescale by 1/255 and normalize with the CLIP mean and std (computed in float64, stored
   as float32).
4. patchify: a still image is repeated to `temporal_patch_size` frames. Rows are patches in
   merge-window order (the merge_size x merge_size patches of one LM token are consecutive,
   windows in raster order); columns are (channel, frame, patch row, patch column) flattened,
   C * T * P * P = 1176 for RGB, T = 2, P = 14. The grid row (t, h, w) counts patches before
   merging, so an image becomes t * h * w / merge_size**2 LM tokens.
"""
import base64
import binascii
import dataclasses
import io
import json
import math
import os
from typing import NamedTuple, Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"

ImageSource = Union[str, bytes, PIL.Image.Image, np.ndarray]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageProcessing:
  """Preprocessing settings (Qwen2-VL's defaults; Qwen2.5-VL raises max_pixels)."""
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  image_mean: tuple[float, ...] = CLIP_MEAN
  image_std: tuple[float, ...] = CLIP_STD

  def __post_init__(self):
    for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
    if self.min_pixels > self.max_pixels:
      raise ValueError(f"min_pixels={self.min_pixels} > max_pixels={self.max_pixels}")

  @property
  def factor(self) -> int:
    """Resized sides are multiples of this many pixels (one LM token's side)."""
    return self.patch_size * self.merge_size

  @classmethod
  def from_hf(cls, preprocessor_config: dict) -> "ImageProcessing":
    """From a `preprocessor_config.json` dict (`size` {shortest_edge, longest_edge} holds the
    pixel bounds in newer files, `min_pixels` / `max_pixels` in older ones)."""
    size = preprocessor_config.get("size") or {}
    defaults = cls()
    pick = lambda key, fallback: preprocessor_config.get(key, fallback)
    return cls(
        min_pixels=size.get("shortest_edge", pick("min_pixels", defaults.min_pixels)),
        max_pixels=size.get("longest_edge", pick("max_pixels", defaults.max_pixels)),
        patch_size=pick("patch_size", defaults.patch_size),
        temporal_patch_size=pick("temporal_patch_size", defaults.temporal_patch_size),
        merge_size=pick("merge_size", defaults.merge_size),
        image_mean=tuple(pick("image_mean", defaults.image_mean)),
        image_std=tuple(pick("image_std", defaults.image_std)))

  def to_hf(self) -> dict:
    """The `preprocessor_config.json` dict transformers' Qwen2-VL image processor reads."""
    return {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True,
            "resample": int(PIL.Image.Resampling.BICUBIC), "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
            "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size}


def run_image_processing(config) -> ImageProcessing:
  """A run config's image preprocessing: its `images` section (Qwen2-VL's defaults without)."""
  section = config.get("images")
  return ImageProcessing() if section is None else ImageProcessing(**section.to_dict())


def load_image_processing(directory: str) -> ImageProcessing:
  """The settings of an HF checkpoint directory's preprocessor_config.json (Qwen2-VL's
  defaults without one)."""
  path = os.path.join(directory, PREPROCESSOR_CONFIG_FILE)
  if not os.path.exists(path):
    return ImageProcessing()
  with open(path) as f:
    try:
      return ImageProcessing.from_hf(json.load(f))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e


def save_image_processing(directory: str, processing: ImageProcessing) -> None:
  """Writes `processing` as the directory's preprocessor_config.json (transformers reads it)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, PREPROCESSOR_CONFIG_FILE), "w") as f:
    json.dump(processing.to_hf(), f, indent=2)


class ProcessedImages(NamedTuple):
  """The vision tower's inputs, in the HF processor's layout (names as its output keys)."""
  pixel_values: np.ndarray  # float32 [num_patches, C * T * P * P], images concatenated
  image_grid_thw: np.ndarray  # int64 [num_images, 3]: (t, h, w) patches per image


def _source_name(source: str) -> str:
  return source if len(source) <= 64 else source[:61] + "..."


def _open_encoded(data: bytes, what: str, decode: bool = True) -> PIL.Image.Image:
  """The image `data` encodes, upright; with `decode` False only its header is read."""
  try:
    image = PIL.Image.open(io.BytesIO(data))
    if decode:
      image.load()
  except (PIL.UnidentifiedImageError, OSError, SyntaxError) as e:
    raise ValueError(f"{what}: not a decodable image ({e})") from e
  return PIL.ImageOps.exif_transpose(image) if decode else image


def _base64_bytes(payload: str, what: str) -> bytes:
  try:
    return base64.b64decode("".join(payload.split()), validate=True)
  except (binascii.Error, ValueError) as e:
    raise ValueError(f"{what}: invalid base64 ({e})") from e


def encoded_image_bytes(source: str) -> bytes:
  """The encoded bytes a string names: a data URL's payload, a file's contents or base64.

  A string that is an existing file is read as one; anything else must be base64 (a
  `data:<type>;base64,` prefix is allowed). Raises ValueError naming the source otherwise.
  """
  what = _source_name(source)
  if source.startswith("data:"):
    header, comma, payload = source.partition(",")
    if not comma or not header.endswith(";base64"):
      raise ValueError(f"{what}: a data URL must look like data:image/png;base64,<data>")
    return _base64_bytes(payload, what)
  if os.path.isfile(source):
    with open(source, "rb") as f:
      return f.read()
  return _base64_bytes(source, f"{what}: no such file, and as base64")


def check_encoded_image(source: str) -> None:
  """Raises ValueError naming `source` unless it is a path, base64 string or data URL of a
  recognizable image (the header is read, the pixels are not decoded)."""
  _open_encoded(encoded_image_bytes(source), _source_name(source), decode=False)


def _from_array(array: np.ndarray) -> PIL.Image.Image:
  if array.dtype != np.uint8 or not (array.ndim == 2 or
                                     (array.ndim == 3 and array.shape[-1] in (1, 3, 4))):
    raise ValueError(f"image array: expected uint8 of shape (H, W) or (H, W, C) with C in 1, 3, "
                     f"4 (channels last), got {array.dtype} {array.shape}")
  return PIL.Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
  """RGB, with any transparency composited onto a white background."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def decode_image(source: ImageSource) -> PIL.Image.Image:
  """An RGB PIL image from any accepted source (see the module docstring)."""
  if isinstance(source, PIL.Image.Image):
    image = source
  elif isinstance(source, np.ndarray):
    image = _from_array(source)
  elif isinstance(source, bytes):
    image = _open_encoded(source, "image bytes")
  elif isinstance(source, str):
    image = _open_encoded(encoded_image_bytes(source), _source_name(source))
  else:
    raise TypeError(f"image: expected a path, base64 string, data URL, bytes, PIL image or "
                    f"numpy array, got {type(source).__name__}")
  return to_rgb(image)


def smart_resize(height: int, width: int, processing: ImageProcessing) -> tuple[int, int]:
  """(height, width) as multiples of `processing.factor`, pixels in [min_pixels, max_pixels].

  Each side is rounded to the nearest multiple (halves to even); if the area is then too
  large, both sides shrink by sqrt(area / max_pixels) and round down (at least one factor); if
  too small, both grow by sqrt(min_pixels / area) and round up.
  """
  if min(height, width) < 1:
    raise ValueError(f"image of {height}x{width} pixels is empty")
  if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
    raise ValueError(f"image of {height}x{width}: aspect ratio above {MAX_ASPECT_RATIO}")
  factor = processing.factor
  new_height, new_width = round(height / factor) * factor, round(width / factor) * factor
  if new_height * new_width > processing.max_pixels:
    shrink = math.sqrt(height * width / processing.max_pixels)
    new_height = max(factor, math.floor(height / shrink / factor) * factor)
    new_width = max(factor, math.floor(width / shrink / factor) * factor)
  elif new_height * new_width < processing.min_pixels:
    grow = math.sqrt(processing.min_pixels / (height * width))
    new_height = math.ceil(height * grow / factor) * factor
    new_width = math.ceil(width * grow / factor) * factor
  return new_height, new_width


def normalized_pixels(image: PIL.Image.Image, processing: ImageProcessing) -> np.ndarray:
  """float32 [C, H, W]: the RGB image resized (bicubic), rescaled to [0, 1] and normalized."""
  height, width = smart_resize(image.height, image.width, processing)
  resized_YxXxC = np.asarray(image.resize((width, height), PIL.Image.Resampling.BICUBIC))
  unit_YxXxC = resized_YxXxC.astype(np.float64) / 255.0
  normalized = (unit_YxXxC - np.array(processing.image_mean)) / np.array(processing.image_std)
  return normalized.transpose(2, 0, 1).astype(np.float32)


def patchify(frames_ZxCxYxX: np.ndarray, processing: ImageProcessing) -> tuple[np.ndarray, tuple]:
  """Flattened patches [t * h * w, C * T * P * P] in merge-window order, and (t, h, w).

  Z frames (a multiple of T = temporal_patch_size) of Y x X pixels (multiples of
  patch_size * merge_size).
  """
  num_frames, channels, height, width = frames_ZxCxYxX.shape
  p, m, t = processing.patch_size, processing.merge_size, processing.temporal_patch_size
  if num_frames % t or height % (p * m) or width % (p * m):
    raise ValueError(f"frames {frames_ZxCxYxX.shape}: need frames % {t} == 0 and sides "
                     f"multiples of {p * m}")
  grid = (num_frames // t, height // p, width // p)
  blocks = frames_ZxCxYxX.reshape(grid[0], t, channels, grid[1] // m, m, p, grid[2] // m, m, p)
  # (grid t, window row, window col, row in window, col in window, C, frame, pixel row, pixel col)
  blocks = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
  return blocks.reshape(math.prod(grid), channels * t * p * p), grid


def preprocess_image(source: ImageSource, processing: ImageProcessing = ImageProcessing()):
  """(patches float32 [t*h*w, C*T*P*P], (t, h, w)) of one still image."""
  pixels_CxYxX = normalized_pixels(decode_image(source), processing)
  frames = np.broadcast_to(pixels_CxYxX, (processing.temporal_patch_size, *pixels_CxYxX.shape))
  return patchify(frames, processing)


def preprocess(sources: Sequence[ImageSource],
               processing: ImageProcessing = ImageProcessing()) -> ProcessedImages:
  """All images' patches concatenated in order, and one grid row per image."""
  if not sources:
    channels = len(processing.image_mean)
    width = channels * processing.temporal_patch_size * processing.patch_size**2
    return ProcessedImages(np.zeros((0, width), np.float32), np.zeros((0, 3), np.int64))
  patches, grids = zip(*(preprocess_image(s, processing) for s in sources))
  return ProcessedImages(np.concatenate(patches), np.array(grids, np.int64))


def num_image_tokens(grid_thw: Sequence[int], merge_size: int) -> int:
  """LM tokens of one image: its patches after merge_size x merge_size merging."""
  t, h, w = grid_thw
  return t * h * w // merge_size**2
