"""Metric writers behind one interface: JSONL (the record), TensorBoard, and a fan-out."""
import json
import os
from typing import Mapping, Protocol

import numpy as np


def _plain(value):
  """JSON-friendly scalar/list from numpy/jax values."""
  array = np.asarray(value)
  return array.item() if array.ndim == 0 else array.tolist()


class MetricWriter(Protocol):
  def write(self, step: int, metrics: Mapping[str, object]) -> None: ...
  def close(self) -> None: ...


class JsonlWriter:
  """One JSON object per line: {"step": ..., **metrics}. Appends, so resumed runs continue.

  `truncate_after` drops records with step > it on open (a restarted run rewrites them).
  """

  def __init__(self, path: str, truncate_after: int | None = None):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self.path = path
    if truncate_after is not None and os.path.exists(path):
      kept = [r for r in read_jsonl(path) if r["step"] <= truncate_after]
      with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    self._file = open(path, "a")

  def write(self, step, metrics):
    self._file.write(json.dumps({"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}) + "\n")
    self._file.flush()

  def close(self):
    self._file.close()


class TensorBoardWriter:
  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter
    self._writer = SummaryWriter(logdir)

  def write(self, step, metrics):
    for key, value in metrics.items():
      array = np.asarray(value)
      if array.ndim == 0 and np.issubdtype(array.dtype, np.number):
        self._writer.add_scalar(key, array.item(), int(step))
      elif array.ndim == 1 and array.size:
        self._writer.add_histogram(key, array, int(step))
    self._writer.flush()

  def close(self):
    self._writer.close()


class MultiWriter:
  def __init__(self, writers):
    self.writers = list(writers)

  def write(self, step, metrics):
    for writer in self.writers:
      writer.write(step, metrics)

  def close(self):
    for writer in self.writers:
      writer.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
