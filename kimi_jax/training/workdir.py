"""A run's workdir on local disk or remote storage (gs://, s3://: any `etils.epath` URI).

The run writes its files (metrics.jsonl, samples, plots, tokenizer, HF exports) with plain
local file APIs; for a remote workdir they go to a local staging directory that `sync` mirrors
to the remote one (files new or changed since the last sync), from process 0 only. A resumed
run first copies the remote files down, so metrics.jsonl continues where it was. Orbax
checkpoints do not pass through here: orbax writes remote paths itself.
"""
import os
import shutil
import tempfile

from etils import epath

from kimi_jax.training import multihost

CHECKPOINTS = "checkpoints"  # the orbax directory inside a workdir
# Workdir directories of weights written for SGLang servers (the rollout backend's, the judge's):
# scratch, never copied to a remote workdir.
SCRATCH_DIRS = ("rollout_weights", "judge_weights")


def is_remote(path) -> bool:
  return "://" in os.fspath(path)


class RunDirectory:
  """`local`: where the run writes; `path`: the workdir itself (`local` unless staged).

  `staged` (default: whether `workdir` is a remote URI) stages the files locally; top-level
  directories named in `unsynced` (scratch, by default the weights written for SGLang servers)
  stay local. Every stage (SFT, RL, long2short, eval) writes its workdir through one."""

  def __init__(self, workdir, staged: bool | None = None,
               unsynced: tuple[str, ...] = SCRATCH_DIRS):
    self.path = epath.Path(workdir)
    self.unsynced = (CHECKPOINTS, *unsynced)
    self.staged = is_remote(workdir) if staged is None else staged
    if not self.staged:
      self.local = os.fspath(workdir)
      return
    self.local = tempfile.mkdtemp(prefix="kimi_jax_run_")
    self._synced: dict[str, tuple[int, int]] = {}
    if multihost.is_main_process() and self.path.exists():
      for root, _, files in self.path.walk():
        for name in files:
          relative = os.fspath((root / name).relative_to(self.path))
          if self._unsynced(relative):
            continue
          local_file = os.path.join(self.local, relative)
          os.makedirs(os.path.dirname(local_file), exist_ok=True)
          (root / name).copy(local_file)
          self._synced[relative] = self._signature(local_file)

  def _unsynced(self, relative: str) -> bool:
    return relative.split(os.sep)[0] in self.unsynced

  @staticmethod
  def _signature(local_file: str) -> tuple[int, int]:
    stat = os.stat(local_file)
    return stat.st_mtime_ns, stat.st_size

  def sync(self) -> None:
    """Copy the staged files that are new or changed since the last sync (process 0)."""
    if not self.staged or not multihost.is_main_process():
      return
    for root, _, files in os.walk(self.local):
      for name in files:
        local_file = os.path.join(root, name)
        relative = os.path.relpath(local_file, self.local)
        signature = self._signature(local_file)
        if not self._unsynced(relative) and self._synced.get(relative) != signature:
          remote_file = self.path / relative
          remote_file.parent.mkdir(parents=True, exist_ok=True)
          epath.Path(local_file).copy(remote_file, overwrite=True)
          self._synced[relative] = signature

  def close(self) -> None:
    """A last sync (also after an error: the metrics so far reach the workdir), then the
    staging directory is removed."""
    try:
      self.sync()
    finally:
      if self.staged:
        shutil.rmtree(self.local, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
