"""Runs launch.train_rl, SIGKILLing itself at a chosen point (for the resume tests).

KILL_BEFORE_ITERATION=i: die as iteration i starts (mid-run, after i's predecessor saved).
KILL_IN_SAVE_STEP=s: die right after the async save of step s was started (mid-write).
FAIL_AFTER_SAVE_STEP=s: raise right after the async save of step s was started (an error on
the next line of the trainer, while the save is still being written).
"""
import os
import signal
import sys

from absl import app

from kimi_jax.checkpointing import manager
from kimi_jax.training import rl
from launch import train_rl


def _die():
  os.kill(os.getpid(), signal.SIGKILL)


def main():
  kill_iteration = int(os.environ.get("KILL_BEFORE_ITERATION", -1))
  kill_save = int(os.environ.get("KILL_IN_SAVE_STEP", -1))
  fail_save = int(os.environ.get("FAIL_AFTER_SAVE_STEP", -1))
  iteration_fn, save_fn = rl.rl_iteration, manager.RunCheckpointer.save

  def rl_iteration(state, step, *args, **kwargs):
    if step == kill_iteration:
      _die()
    return iteration_fn(state, step, *args, **kwargs)

  def save(self, step, *args, **kwargs):
    save_fn(self, step, *args, **kwargs)
    if step == kill_save:
      _die()
    if step == fail_save:
      raise RuntimeError(f"injected failure right after saving step {step}")

  rl.rl_iteration = rl_iteration
  manager.RunCheckpointer.save = save
  app.run(train_rl.main, argv=[sys.argv[0]] + sys.argv[1:])


if __name__ == "__main__":
  main()
