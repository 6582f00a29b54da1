"""Orbax checkpoints of everything a run needs to resume exactly.

Each step directory holds `state` (params, optimizer state, step; restored straight into its
shardings) and `extra` (JSON: iteration counter, rng seed material, sampler state, the
partial-rollout buffer). Orbax finalises a step atomically, so a run killed mid-write
resumes from the last complete checkpoint; a finalised step damaged later (a bad disk, a
truncated copy) is skipped by `restore_latest` with one line saying why, never silently.
Use it as a context manager: every exit path, errors included, waits for pending async saves,
so no step is left half-written as a tmp directory and no save thread outlives the run.
The directory is an `etils.epath` path: local (made absolute) or remote (`gs://...`, which orbax
writes itself).
"""
from typing import Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

_REASON_CHARS = 300  # of an unreadable step's error, in the one line that reports it


def absolute_path(path: epath.PathLike) -> epath.Path:
  """`path` as an `epath.Path`; a relative local path from the working directory. A remote URI
  (`gs://bucket/run`) is kept as it is (`os.path.abspath` would make it `$PWD/gs:/bucket/run`)."""
  path = epath.Path(path)
  return path if path.is_absolute() else path.absolute()


class CheckpointsUnreadable(RuntimeError):
  """Checkpoints exist but none can be restored: resuming would silently start over."""


def _reason(error: BaseException) -> str:
  first_line = (str(error).strip().splitlines() or [""])[0]
  return f"{type(error).__name__}: {first_line[:_REASON_CHARS]}"


class RunCheckpointer:
  def __init__(self, directory: epath.PathLike, max_to_keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           enable_async_checkpointing=async_save, create=True)
    self.directory = absolute_path(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "extra"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state_tree, extra: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state_tree), extra=ocp.args.JsonSave(extra)))

  def restore(self, step: int, abstract_state_tree, shardings):
    """Restore (state_tree placed on `shardings`, extra dict) from `step`."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state_tree, shardings)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
    return restored["state"], restored["extra"]

  def restore_latest(self, abstract_state_tree, shardings, log: Callable[[str], None] = print):
    """(step, state_tree, extra) of the newest step that restores; None without checkpoints.

    Each unreadable step is skipped with one `log` line naming it and the error, and renamed
    to `<step>.unreadable` (kept for inspection, out of the way of the run's next saves); if no
    step restores, CheckpointsUnreadable (the run must not quietly start from scratch).
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        state, extra = self.restore(step, abstract_state_tree, shardings)
      except Exception as error:  # noqa: BLE001 -- any damage makes the step unusable
        failures.append(f"step {step}: {_reason(error)}")
        older = [s for s in steps if s < step]
        log(f"checkpoint step {step} in {self.directory} is unreadable ({_reason(error)}); "
            f"moved to {step}.unreadable, "
            + (f"trying step {older[0]}" if older else "no older step left"))
        self._set_aside(step)
        continue
      return step, state, extra
    if failures:
      raise CheckpointsUnreadable(
          f"no checkpoint in {self.directory} can be restored ({'; '.join(failures)}); move the "
          "directory away to start the run over")
    return None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(self.directory / f"{step}.unreadable")
    self._manager.reload()

  def close(self) -> None:
    """Wait for pending saves, then release the manager (also when waiting fails)."""
    try:
      self._manager.wait_until_finished()
    finally:
      self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
