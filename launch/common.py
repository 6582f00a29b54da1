"""Flag handling shared by every entry point: config file, workdir, multi-host start."""
import difflib
import importlib
import importlib.util
import re
import sys

from absl import app, flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:variant]",
                                         lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and plots")
MULTIHOST = flags.DEFINE_bool("multihost", False,
                              "call jax.distributed.initialize() (TPU pods, SLURM GPU clusters)")


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
  if MULTIHOST.value:
    import jax
    jax.distributed.initialize()
  return CONFIG.value, WORKDIR.value


def stage_main(module: str):
  """The absl `main` of a stage entry point: `start`, then `<module>.run(config, workdir)`.
  The module is imported after flag parsing, so --help and flag errors stay fast."""
  def main(argv):
    config, workdir = start(argv)
    importlib.import_module(module).run(config, workdir)
  return main


def _unknown_overrides(argv: list[str]) -> list[str]:
  """One message per `--config.<path>` override whose path is not in the loaded config."""
  specs = [a.removeprefix("--config=") for a in argv if a.startswith("--config=")]
  if not specs:
    return []
  path, _, arg = specs[-1].partition(":")  # the overrides failed, so load the file again
  module_spec = importlib.util.spec_from_file_location("_config_for_overrides", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  problems = []
  for flag in argv:
    match = re.fullmatch(r"--config\.([^=]+)(=.*)?", flag)
    if match is None:
      continue
    node, walked = config, []
    for part in match.group(1).split("."):
      if hasattr(node, "keys") and part in node:
        node, walked = node[part], walked + [part]
        continue
      known = sorted(node.keys()) if hasattr(node, "keys") else []
      where = ".".join(["config"] + walked)
      close = difflib.get_close_matches(part, known, n=1)
      hint = f"did you mean '{where}.{close[0]}'?" if close else f"{where} has {known}"
      problems.append(f"unknown config key '{where}.{part}' in {flag} ({hint})")
      break
  return problems


def run(main) -> None:
  """`app.run(main)`; an override of a key the config lacks exits naming its full dotted path
  (ml_collections names only its last part)."""
  try:
    app.run(main)
  except (AttributeError, KeyError):
    unknown = _unknown_overrides(sys.argv[1:])
    if not unknown:
      raise
    sys.exit("FATAL Flags parsing error: " + "; ".join(unknown))
