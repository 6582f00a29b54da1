"""Orbax checkpoints of everything a run needs to resume exactly.

Each step directory holds `state` (params, optimizer state, step; restored straight into its
shardings) and `extra` (JSON: iteration counter, rng seed material, sampler state, the
partial-rollout buffer). Orbax finalises a step atomically, so a run killed mid-write
resumes from the last complete checkpoint.
"""
import os

import jax
import orbax.checkpoint as ocp


class RunCheckpointer:
  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
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

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
