"""The image fields of a training batch whose rows hold prompts with images (host side, numpy).

Every field is batch-major, so batches shard and split by rows like their tokens:
  pixel_values [B, O, E]: the row's image patches in order, zero-padded to O per row;
  hw_positions [B, O, 2], frame_ids [B, O], window_ids [B, O]: the vision tower's layout, frame
    and window ids numbered from 0 in each row (-1 on padding patches);
  rope_positions [B, 3, T]: M-RoPE positions of the row's tokens (prompt, response, padding);
  image_mask [B, T]: the image tokens of the prompt (an image pad id sampled in a response is
    text, as the rollout engine decoded it).
The model encodes each row's patches on their own (attention never crosses frames) and
row b's k-th masked token takes row b's k-th merged patch embedding. A row's fields depend on
that row alone, so each process can build just its own rows of a batch.

SFT examples with images are not packed (M-RoPE positions run over a whole row): one example
per row, right-padded.
"""
from typing import Callable, Sequence

import numpy as np

from kimi_jax.data.epochs import EpochIterator
from kimi_jax.data.images import ProcessedImages
from kimi_jax.data.packing import Example
from kimi_jax.model.config import VisionConfig
from kimi_jax.model.mrope import mrope_positions
from kimi_jax.model.vision import vision_layout
from kimi_jax.sharding.processes import Processes, this_job

IMAGE_FIELDS = ("pixel_values", "hw_positions", "frame_ids", "window_ids", "rope_positions",
                "image_mask")


def image_fields(vision: VisionConfig, tokens_BxT: np.ndarray,
                 row_images: Sequence[ProcessedImages | None], patches_per_row: int,
                 prompt_lengths_B: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """The fields above for token rows `tokens_BxT` whose image pad runs take `row_images[b]`.
  With `prompt_lengths_B`, only a row's first tokens (its prompt) hold images; positions after
  them count on as decoded tokens do, whatever was sampled there."""
  b, t = tokens_BxT.shape
  if len(row_images) != b:
    raise ValueError(f"{len(row_images)} image sets for {b} rows")
  if patches_per_row % vision.merge_unit:
    raise ValueError(f"patches_per_row={patches_per_row}: must be a multiple of "
                     f"{vision.merge_unit}")
  fields = {"pixel_values": np.zeros((b, patches_per_row, vision.patch_features), np.float32),
            "hw_positions": np.zeros((b, patches_per_row, 2), np.int32),
            "frame_ids": np.full((b, patches_per_row), -1, np.int32),
            "window_ids": np.full((b, patches_per_row), -1, np.int32),
            "rope_positions": np.zeros((b, 3, t), np.int32),
            "image_mask": np.zeros((b, t), bool)}
  for row, images in enumerate(row_images):
    grid = np.zeros((0, 3), np.int64) if images is None else images.image_grid_thw
    prompt = t if prompt_lengths_B is None else prompt_lengths_B[row]
    positions_3x1xT, _ = mrope_positions(vision, tokens_BxT[row:row + 1], grid, [prompt])
    fields["rope_positions"][row] = positions_3x1xT[:, 0]
    fields["image_mask"][row, :prompt] = tokens_BxT[row, :prompt] == vision.image_token_id
    if not len(grid):
      continue
    n = len(images.pixel_values)
    if n > patches_per_row:
      raise ValueError(f"row {row}: its images have {n} patches, more than patches_per_row="
                       f"{patches_per_row}")
    layout = vision_layout(vision, grid)
    fields["pixel_values"][row, :n] = images.pixel_values
    fields["hw_positions"][row, :n] = layout.hw_positions_Ox2
    fields["frame_ids"][row, :n] = layout.frame_ids_O
    fields["window_ids"][row, :n] = layout.window_ids_O
  return fields


def padded_patches(num_patches: Sequence[int], multiple: int) -> int:
  """The largest of `num_patches` rounded up to `multiple` (at least one multiple)."""
  return max(multiple, -(-max([0, *num_patches]) // multiple) * multiple)


class ImageExampleBatches(EpochIterator):
  """Endless SFT batches of `batch_size` examples in epoch order, one per row of seq_len slots
  (inputs tokens[:-1], targets tokens[1:]), with the image fields of their prompts.
  `images_of(i)` preprocesses example i's images (None: a text example). Only this process's
  rows of each batch are built (`processes`, by default this job's): no other example is read
  and no other image preprocessed."""

  def __init__(self, examples: Sequence[Example], images_of: Callable[[int], ProcessedImages | None],
               vision: VisionConfig, batch_size: int, seq_len: int, patches_per_row: int,
               pad_id: int, seed: int, processes: Processes | None = None):
    super().__init__(len(examples), seed)
    for i, example in enumerate(examples):
      if not 2 <= len(example) <= seq_len + 1:
        raise ValueError(f"example {i}: {len(example)} tokens; a row of seq_len {seq_len} takes "
                         f"2..{seq_len + 1}")
    processes = processes or this_job()
    processes.rows(batch_size)  # fails here if the batch does not split over the processes
    self.examples, self.images_of, self.vision = examples, images_of, vision
    self.batch_size, self.seq_len, self.patches_per_row = batch_size, seq_len, patches_per_row
    self.pad_id, self.processes = pad_id, processes

  def __next__(self) -> dict[str, np.ndarray]:
    chosen = self.take_rows(self.batch_size, self.processes)
    shape = (len(chosen), self.seq_len + 1)
    tokens = np.full(shape, self.pad_id, np.int32)
    trained = np.zeros(shape, np.float32)
    for row, index in enumerate(chosen):
      example = self.examples[index]
      tokens[row, :len(example)] = example.tokens
      trained[row, :len(example)] = example.trained
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": trained[:, 1:]}
    batch.update(image_fields(self.vision, batch["tokens"],
                              [self.images_of(i) for i in chosen], self.patches_per_row))
    return batch
