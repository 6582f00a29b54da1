"""Epoch-ordered iteration with a JSON-serialisable position (the SFT and corpus batches).

Every epoch visits items 0..N-1 once, in the permutation drawn from (seed, epoch); an
iterator's position is (epoch, offset into that epoch's order), so `set_state(get_state())`
on a fresh iterator continues exactly where the old one was.
"""
import itertools
from typing import Iterator

import grain
import numpy as np

from kimi_jax.sharding.processes import Processes


def epoch_order(seed: int, epoch: int, num_items: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_items)


class EpochIterator(grain.DatasetIterator):
  """Base iterator: `upcoming()` yields item indices from the position on, `advance(n)` moves
  the position past n of them. The current epoch's order is computed once, not per item."""

  def __init__(self, num_items: int, seed: int):
    super().__init__()
    self._num_items, self._seed = num_items, seed
    self.epoch, self.offset = 0, 0
    self._cached_epoch, self._cached_order = None, None

  def _order(self, epoch: int) -> np.ndarray:
    if epoch != self._cached_epoch:
      self._cached_epoch = epoch
      self._cached_order = epoch_order(self._seed, epoch, self._num_items)
    return self._cached_order

  def upcoming(self) -> Iterator[int]:
    """Item indices from the current position on, endlessly; the position does not move."""
    epoch, offset = self.epoch, self.offset
    while True:
      for index in self._order(epoch)[offset:]:
        yield int(index)
      epoch, offset = epoch + 1, 0

  def advance(self, count: int) -> None:
    consumed = self.offset + count
    self.epoch += consumed // self._num_items
    self.offset = consumed % self._num_items

  def take_rows(self, batch_size: int, processes: Processes) -> list[int]:
    """Moves past the next `batch_size` items (one per batch row); returns those of this
    process's rows (`processes.rows`)."""
    batch_rows = list(itertools.islice(self.upcoming(), batch_size))
    self.advance(batch_size)
    return batch_rows[processes.rows(batch_size)]

  def get_state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "offset": self.offset}

  def set_state(self, state: dict[str, int]) -> None:
    self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
