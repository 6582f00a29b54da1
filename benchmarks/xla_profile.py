"""jax.profiler traces of one jitted program, and where its time goes, op by op.

`trace(profile_dir)` records a trace that TensorBoard's profile plugin opens (the .xplane.pb)
and Perfetto opens (perfetto_trace.json.gz, at ui.perfetto.dev). `op_table` reads that trace
back: the time of every XLA op event of one program (events are tagged with their HLO module),
grouped by the op's source-level name from the compiled HLO text (`jit(decode)/while/body/
Transformer/layers_3/mlp/up_proj/dot_general`; layer indices folded, so the 8 layers' up_proj
make one row). Times are summed over threads: on CPU they are CPU time, not wall time.
"""
import collections
import contextlib
import gzip
import json
import os
import pathlib
import re

import jax

_OP_NAME = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*?op_name=\"([^\"]+)\"")


@contextlib.contextmanager
def trace(profile_dir: str | None):
  """A jax.profiler trace into `profile_dir` (TensorBoard and Perfetto formats); no-op if None."""
  if not profile_dir:
    yield
    return
  with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
    yield


def dump_hlo(profile_dir: str, module_regex: str) -> None:
  """Make XLA write the optimized HLO of the programs whose module name matches `module_regex`
  under `profile_dir`/hlo (their op names are the ones the trace's events carry). Call before
  the first JAX computation; compilation-cache hits would skip the dump, so the cache is off."""
  os.environ["XLA_FLAGS"] = " ".join([
      os.environ.get("XLA_FLAGS", ""), f"--xla_dump_to={pathlib.Path(profile_dir) / 'hlo'}",
      "--xla_dump_hlo_as_text", f"--xla_dump_hlo_module_re={module_regex}"])
  jax.config.update("jax_enable_compilation_cache", False)


def op_table(profile_dir: str, module: str, per: int = 1, top: int = 15):
  """[(source-level op name, seconds per `per` runs, share of the program's op time)], largest
  first, for HLO module `module` (e.g. "jit_decode") in the newest trace under `profile_dir`."""
  hlo = sorted(pathlib.Path(profile_dir, "hlo").glob(f"*.{module}.*after_optimizations.txt"))
  if not hlo:
    raise FileNotFoundError(f"no optimized HLO of {module} under {profile_dir}/hlo: call "
                            "dump_hlo before the program compiles")
  source = {}
  for line in hlo[-1].read_text().splitlines():
    match = _OP_NAME.match(line)
    if match:
      source[match.group(1)] = re.sub(r"layers_\d+", "layers_*", match.group(2))
  newest = sorted(pathlib.Path(profile_dir).glob("plugins/profile/*/perfetto_trace.json.gz"))[-1]
  events = json.load(gzip.open(newest))
  events = events["traceEvents"] if isinstance(events, dict) else events
  micros = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("args", {}).get("hlo_module") == module:
      micros[source.get(e["name"], e["name"])] += e["dur"]
  total = sum(micros.values()) or 1
  return [(name, us / 1e6 / per, us / total) for name, us in micros.most_common(top)]


def print_table(title: str, rows) -> None:
  total = sum(seconds for _, seconds, _ in rows)
  print(f"{title} (top {len(rows)} ops: {total * 1e3:.2f} ms of op time)")
  for name, seconds, share in rows:
    print(f"  {seconds * 1e3:8.3f} ms {share:6.1%}  {name}")
