"""Metric writers: JSONL records (with resume truncation), TensorBoard events, PNG plots."""
import os

import numpy as np

from kimi_jax.metrics.plots import plot_metrics
from kimi_jax.metrics.writers import JsonlWriter, MultiWriter, TensorBoardWriter, read_jsonl


def test_jsonl_round_trip_and_truncation(tmp_path):
  path = str(tmp_path / "m.jsonl")
  writer = JsonlWriter(path)
  for step in range(4):
    writer.write(step, {"reward": np.float32(step / 4), "lengths": np.arange(step)})
  writer.close()
  records = read_jsonl(path)
  assert [r["reward"] for r in records] == [0.0, 0.25, 0.5, 0.75]
  assert records[3]["lengths"] == [0, 1, 2]
  JsonlWriter(path, truncate_after=1).close()  # a restart from step 1 drops later records
  assert [r["step"] for r in read_jsonl(path)] == [0, 1]


def test_tensorboard_and_plot(tmp_path):
  writer = MultiWriter([TensorBoardWriter(str(tmp_path / "tb")), JsonlWriter(str(tmp_path / "m.jsonl"))])
  for step in range(3):
    writer.write(step, {"loss": 1.0 / (step + 1)})
  writer.close()
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))
  png = str(tmp_path / "plot.png")
  plot_metrics(read_jsonl(str(tmp_path / "m.jsonl")), ["loss", "absent"], png)
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
