"""RunCheckpointer: sharded state + JSON extras round trip, latest step, keep-N, fallback past
a damaged newest step, pending async saves waited for on an error."""
import os

import jax
import numpy as np
import optax
import pytest

from kimi_jax.checkpointing.manager import CheckpointsUnreadable, RunCheckpointer
from kimi_jax.model import ModelConfig
from kimi_jax.sharding.rules import make_mesh
from kimi_jax.training.state import init_train_state, train_state_shardings

CFG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                  num_kv_heads=2, head_dim=8)


def test_round_trip_into_shardings_and_keep_n(tmp_path):
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  tx = optax.adamw(1e-3)
  state, shardings = init_train_state(CFG, tx, mesh, jax.random.key(3))
  ckpt = RunCheckpointer(str(tmp_path), max_to_keep=2)
  extra = {"iteration": 5, "sampler": {"table": [0.5, 0.25]}, "buffer": []}
  for step in (1, 2, 3):
    ckpt.save(step, {"params": state.params, "opt_state": state.opt_state}, {**extra, "iteration": step})
  ckpt.wait()
  assert ckpt.latest_step() == 3
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 3]

  abstract, _ = train_state_shardings(CFG, tx, mesh)
  target = {"params": abstract.params, "opt_state": abstract.opt_state}
  target_shardings = {"params": shardings.params, "opt_state": shardings.opt_state}
  restored, restored_extra = RunCheckpointer(str(tmp_path)).restore(3, target, target_shardings)
  assert restored_extra == {**extra, "iteration": 3}
  kernel = restored["params"]["layers_0"]["attn"]["q_proj"]["kernel"]
  assert kernel.sharding == state.params["layers_0"]["attn"]["q_proj"]["kernel"].sharding
  jax.tree.map(np.testing.assert_array_equal, restored["params"], state.params)
  ckpt.close()


def _small_tree(value: float) -> dict:
  return {"w": jax.numpy.full((4, 8), value), "b": jax.numpy.arange(3.0) + value}


def _restore_latest(directory, log):
  tree = _small_tree(0.0)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  shardings = jax.tree.map(lambda x: x.sharding, tree)
  return RunCheckpointer(str(directory)).restore_latest(abstract, shardings, log=log)


def _damage(step_dir) -> None:
  """Overwrite every array-data file of a finalised step with garbage (a bad disk, a bad copy)."""
  damaged = 0
  for root, _, files in os.walk(step_dir / "state"):
    for name in files:
      if os.path.basename(root) == "d":
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"\x00garbage" * 8)
        damaged += 1
  assert damaged


def test_corrupt_newest_step_falls_back_to_the_newest_intact_one(tmp_path):
  with RunCheckpointer(str(tmp_path), max_to_keep=3, async_save=False) as ckpt:
    for step in (6, 7, 8):
      ckpt.save(step, _small_tree(float(step)), {"iteration": step})
  _damage(tmp_path / "8")
  lines = []
  step, state, extra = _restore_latest(tmp_path, lines.append)
  assert (step, extra) == (7, {"iteration": 7})
  jax.tree.map(np.testing.assert_array_equal, state, _small_tree(7.0))
  assert len(lines) == 1 and "step 8" in lines[0] and "trying step 7" in lines[0], lines
  assert "\n" not in lines[0] and len(lines[0]) < 600
  # The damaged step is set aside, so the resumed run can save its own step 8.
  assert sorted(os.listdir(tmp_path)) == ["6", "7", "8.unreadable"]
  with RunCheckpointer(str(tmp_path), max_to_keep=3, async_save=False) as ckpt:
    assert ckpt.latest_step() == 7
    ckpt.save(8, _small_tree(80.0), {"iteration": 8})
  assert _restore_latest(tmp_path, lines.append)[0] == 8 and len(lines) == 1


def test_no_restorable_step_is_an_error_not_a_fresh_start(tmp_path):
  with RunCheckpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(1, _small_tree(1.0), {"iteration": 1})
  _damage(tmp_path / "1")
  with pytest.raises(CheckpointsUnreadable, match="step 1: .*move the directory away"):
    _restore_latest(tmp_path, lambda line: None)
  assert _restore_latest(tmp_path / "empty", print) is None  # no checkpoints: a fresh start


def test_an_error_right_after_an_async_save_waits_for_it(tmp_path):
  big = {"w": jax.numpy.ones((512, 1024))}  # 2 MB: the save is still running when we raise
  with pytest.raises(RuntimeError, match="right after the save"):
    with RunCheckpointer(str(tmp_path), async_save=True) as ckpt:
      ckpt.save(1, big, {"iteration": 1})
      raise RuntimeError("failed right after the save")
  assert sorted(os.listdir(tmp_path)) == ["1"]  # finalised: no *.orbax-checkpoint-tmp-* left
  lines = []
  abstract = {"w": jax.ShapeDtypeStruct((512, 1024), np.float32)}
  step, state, _ = RunCheckpointer(str(tmp_path)).restore_latest(
      abstract, {"w": big["w"].sharding}, log=lines.append)
  assert step == 1 and not lines
  np.testing.assert_array_equal(state["w"], big["w"])


def test_checkpoint_directories_are_epath_paths_local_relative_or_remote(tmp_path, monkeypatch):
  from etils import epath
  from kimi_jax.checkpointing.manager import absolute_path
  monkeypatch.chdir(tmp_path)
  # A relative local directory is taken from the working directory and works end to end.
  ckpt = RunCheckpointer("run/checkpoints", async_save=False)
  assert isinstance(ckpt.directory, epath.Path)
  assert str(ckpt.directory) == str(tmp_path / "run" / "checkpoints")
  ckpt.save(1, _small_tree(1.0), {"iteration": 1})
  ckpt.close()
  assert (tmp_path / "run" / "checkpoints" / "1").is_dir()
  # Remote URIs stay remote (os.path.abspath made them $PWD/gs:/bucket/...); writing there
  # needs gcsfs and a bucket, which this machine has not.
  assert str(absolute_path("gs://bucket/run/checkpoints")) == "gs://bucket/run/checkpoints"
  assert str(absolute_path("s3://bucket/run") / "checkpoints") == "s3://bucket/run/checkpoints"
