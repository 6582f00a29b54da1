"""What changes when one run spans several JAX processes (hosts): batches enter jitted programs
as global arrays built from each process's rows, sharded results come back to every host, and
only process 0 writes files other than checkpoints.

With one process every function here is the identity (or always-true), so single-host runs
take exactly the code path they had before.
"""
import jax
import numpy as np
from jax.experimental import multihost_utils

from kimi_jax.checkpointing.hf import save_hf
from kimi_jax.sharding.processes import allgather_objects  # noqa: F401 (the runners' gather)
from kimi_jax.sharding.processes import this_job


def is_main_process() -> bool:
  """True on the process that writes metrics, samples, plots and HF exports."""
  return jax.process_index() == 0


def process_rows(num_rows: int) -> slice:
  """This process's contiguous share of `num_rows` batch rows (process i takes the i-th of
  process_count equal parts, the rows its devices hold under the batch sharding)."""
  return this_job().rows(num_rows)


def process_offset(global_count: int) -> int:
  """Index of this process's first item when `global_count` items split into process_count
  equal contiguous shares (the prompt sampler's slices)."""
  return process_rows(global_count).start


def global_batch(batch: dict, sharding: jax.sharding.NamedSharding) -> dict:
  """The host batch (identical on every process) as global arrays: each process contributes
  only its own rows through `jax.make_array_from_process_local_data`. Fields that already are
  global arrays (`global_rows`) pass through."""
  if jax.process_count() == 1:
    return batch

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x[process_rows(x.shape[0])], x.shape)

  return {k: one(v) for k, v in batch.items()}


def global_rows(rows, sharding: jax.sharding.NamedSharding, num_rows: int):
  """The `num_rows`-row batch field of which this process holds `rows` (its `process_rows`),
  as a global array; `rows` itself with one process."""
  if jax.process_count() == 1:
    return rows
  return jax.make_array_from_process_local_data(sharding, rows, (num_rows, *rows.shape[1:]))


def local_rows(x) -> np.ndarray:
  """This process's rows (`process_rows`) of a batch field as numpy. An array spanning several
  processes is read from this process's own shards: nothing is gathered."""
  rows = process_rows(x.shape[0])
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)[rows]
  out = np.zeros((rows.stop - rows.start, *x.shape[1:]), x.dtype)
  covered = np.zeros(rows.stop - rows.start, bool)
  for shard in x.addressable_shards:
    first, *rest = shard.index
    start, stop = max(first.start or 0, rows.start), min(first.stop or x.shape[0], rows.stop)
    if start < stop:
      data = np.asarray(shard.data)[start - (first.start or 0):stop - (first.start or 0)]
      out[(slice(start - rows.start, stop - rows.start), *rest)] = data
      covered[start - rows.start:stop - rows.start] = True
  if not covered.all():
    raise ValueError(f"rows {rows.start}..{rows.stop} of a {x.shape} array are not all on "
                     f"process {jax.process_index()}'s devices ({x.sharding})")
  return out


def to_host(tree):
  """Numpy copies of a tree of (possibly multi-process sharded) arrays, on every process.
  A collective when arrays span processes: every process must call it."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)


def addressable(tree):
  """`tree` itself when this process can address all of it (always with one process), else
  its numpy gather: what a process-local consumer such as the rollout engine can take."""
  return tree if jax.process_count() == 1 else to_host(tree)


def save_hf_from_main(path: str, model_config, params, **kwargs) -> None:
  """`save_hf` of (possibly multi-process sharded) params, written by process 0 only; every
  process must call it (the gather is a collective)."""
  params = addressable(params)
  if is_main_process():
    save_hf(path, model_config, params, **kwargs)


def global_from_rows(rows: dict, sharding: jax.sharding.NamedSharding) -> dict:
  """The batch of which this process built `rows` (its `process_rows`, an equal share of every
  field) as global arrays; `rows` itself with one process."""
  return {k: global_rows(v, sharding, v.shape[0] * jax.process_count()) for k, v in rows.items()}
