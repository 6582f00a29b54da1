"""Flag handling shared by every entry point: config file, workdir, multi-host start."""
import importlib

from absl import flags
from ml_collections import config_flags

from launch import distributed

CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:variant]",
                                         lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and plots")


def start(argv) -> tuple:
  """Validate argv, start the distributed runtime if asked; return (config, workdir)."""
  from absl import app, logging
  logging.set_verbosity(logging.WARNING)  # orbax/grain INFO lines would drown the progress table
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=experiments/rl_arith.py:tiny")
  if not WORKDIR.value:
    raise app.UsageError("--workdir is required")
  distributed.initialize()
  return CONFIG.value, WORKDIR.value


def stage_main(module: str):
  """The absl `main` of a stage entry point: `start`, then `<module>.run(config, workdir)`.
  The module is imported after flag parsing, so --help and flag errors stay fast."""
  def main(argv):
    config, workdir = start(argv)
    importlib.import_module(module).run(config, workdir)
  return main
