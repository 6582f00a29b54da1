"""Which rows of every global batch one process builds.

In a run of `count` processes, process `index` builds only the index-th of `count` equal,
contiguous parts of each batch: the rows its devices hold under the batch sharding. The batch
plan (which examples go to which row) is the same on every process; token arrays and images are
made for the process's own rows only. `WHOLE_BATCH` (one process) builds every row.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class ProcessShare:
  index: int = 0
  count: int = 1

  def __post_init__(self):
    if not 0 <= self.index < self.count:
      raise ValueError(f"process index {self.index} not in [0, {self.count})")

  def rows(self, num_rows: int) -> slice:
    """This process's rows of a `num_rows`-row batch."""
    if num_rows % self.count:
      raise ValueError(f"{num_rows} batch rows do not split over {self.count} processes")
    per = num_rows // self.count
    return slice(self.index * per, (self.index + 1) * per)


WHOLE_BATCH = ProcessShare()
