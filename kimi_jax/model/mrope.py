"""M-RoPE positions of prompts that hold images (host side, numpy), as Qwen2-VL computes them.

Text tokens carry one index in all three rows (temporal, height, width), counting on from the
previous token. An image of merged grid (t, h, w) placed when the count is `p` gets rows
(p + t_i, p + h_i, p + w_i) over its tokens in (t, h, w) raster order, and the count then moves
on by max(h, w). The rope delta (max position + 1 - sequence length) continues the count for
tokens decoded after the prompt: rope position = sequence index + delta in all rows.
"""
import numpy as np

from kimi_jax.model.config import VisionConfig
from kimi_jax.model.vision import check_grid


def image_token_counts(vision: VisionConfig, image_grid_thw) -> np.ndarray:
  """LM tokens per image: t * h * w / merge_unit."""
  return check_grid(vision, image_grid_thw).prod(axis=1) // vision.merge_unit


def _image_positions(vision: VisionConfig, grid_row, start: int) -> np.ndarray:
  t, h, w = int(grid_row[0]), *(int(s) // vision.spatial_merge_size for s in grid_row[1:])
  rows = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
  return np.stack(rows).reshape(3, -1) + start


def _sequence_positions(vision: VisionConfig, tokens_T, grid, counts, image: int, where):
  """Positions [3, T] of one sequence whose images start at `image`; returns them and the next
  image index. `where(i)` names token i in errors."""
  is_image = tokens_T == vision.image_token_id
  n, i, count_from, parts = len(tokens_T), 0, 0, [np.zeros((3, 0), np.int64)]
  while i < n:
    if not is_image[i]:
      end = i + int(np.argmax(is_image[i:])) if is_image[i:].any() else n
      parts.append(np.broadcast_to(np.arange(end - i) + count_from, (3, end - i)))
      count_from += end - i
      i = end
      continue
    if image >= len(grid):
      raise ValueError(f"{where(i)}: more images than the {len(grid)} rows of image_grid_thw")
    if i + counts[image] > n or not is_image[i:i + counts[image]].all():
      raise ValueError(f"{where(i)}: image {image} with grid {tuple(grid[image].tolist())} "
                       f"needs {counts[image]} consecutive image tokens")
    parts.append(_image_positions(vision, grid[image], count_from))
    count_from += int(grid[image][1:].max()) // vision.spatial_merge_size
    i += counts[image]
    image += 1
  return np.concatenate(parts, axis=1), image


def _segments(segment_ids_T, n: int) -> list[tuple[int, int]]:
  """[start, end) runs of equal segment id among the first n tokens (one run without ids)."""
  if segment_ids_T is None or n == 0:
    return [(0, n)]
  starts = [0] + [i for i in range(1, n) if segment_ids_T[i] != segment_ids_T[i - 1]]
  return list(zip(starts, starts[1:] + [n]))


def mrope_positions(vision: VisionConfig, tokens_BxT, image_grid_thw, lengths_B=None,
                    segment_ids_BxT=None):
  """(positions_3xBxT, rope_delta_B) for token rows whose images (runs of
  `vision.image_token_id`) take `image_grid_thw`'s rows in order, row after row.

  Only the first lengths_B[b] tokens of row b are given (default: all); positions past them
  continue as decoded tokens would (sequence index + delta). Packed rows (`segment_ids_BxT`)
  count each segment from 0; the delta is then that of the row's last segment.
  """
  tokens = np.asarray(tokens_BxT)
  b, t = tokens.shape
  grid = check_grid(vision, image_grid_thw)
  counts = image_token_counts(vision, grid)
  lengths = np.full(b, t) if lengths_B is None else np.asarray(lengths_B)
  positions = np.zeros((3, b, t), np.int32)
  deltas = np.zeros(b, np.int32)
  image = 0
  for row in range(b):
    n = int(lengths[row])
    where = lambda i, row=row: f"tokens row {row} position {i}"
    seg_ids = None if segment_ids_BxT is None else np.asarray(segment_ids_BxT)[row]
    for start, end in _segments(seg_ids, n):
      segment, image = _sequence_positions(vision, tokens[row, start:end], grid, counts, image,
                                           lambda i, start=start: where(start + i))
      positions[:, row, start:end] = segment
      deltas[row] = (segment.max() + 1 if end > start else 0) - (end - start)
    positions[:, row, n:] = np.arange(n - start, t - start) + deltas[row]
  if image != len(grid):
    raise ValueError(f"image_grid_thw has {len(grid)} rows but the tokens hold {image} images")
  return positions, deltas
