"""The multi-process flags every entry point takes, and starting JAX's distributed runtime.

`--multihost` alone lets `jax.distributed.initialize()` discover the cluster (Cloud TPU
metadata, SLURM, Open MPI); `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`
name it explicitly (local and custom clusters). CPU processes exchange collectives over gloo.
"""
from absl import flags

MULTIHOST = flags.DEFINE_bool("multihost", False,
                              "call jax.distributed.initialize() (TPU pods, SLURM GPU clusters)")
COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 (implies --multihost)")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0..N-1")


def initialize() -> None:
  """Start the distributed runtime when the flags ask for it; a no-op otherwise."""
  explicit = (COORDINATOR_ADDRESS.value, NUM_PROCESSES.value, PROCESS_ID.value)
  if not MULTIHOST.value and all(v is None for v in explicit):
    return
  if any(v is None for v in explicit) and any(v is not None for v in explicit):
    raise flags.ValidationError("--coordinator_address, --num_processes and --process_id go "
                                "together (or give none and --multihost to auto-detect)")
  import jax
  # Only the CPU client reads this (accelerators bring their own collectives); it must be set
  # before any backend starts.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(*explicit)
