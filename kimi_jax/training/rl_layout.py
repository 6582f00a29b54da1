"""Where every row of an RL iteration's batch goes, decided from small per-row facts that every
process holds, so that each process builds only its own rows' tokens.

An iteration's prompts split into `num_slices` equal contiguous slices; a group keeps the slice
of its prompt (from its group id) while it waits in the partial-rollout buffer. Process p owns
slices [p * H/P, (p + 1) * H/P) of H: it rolls them out, scores them and holds their token
rows; its block of every minibatch's rows (the rows its devices take under the batch sharding)
is its own slices' groups, so no token id ever crosses processes. Only the facts the plan needs
(each row's group, slice and counted end) are gathered.

Each minibatch takes groups_per_minibatch / H whole groups of every slice, each slice's groups
longest first (a slice with fewer complete groups adds empty ones, which train on nothing), so
the few long groups of a heavy-tailed batch share minibatches (Hugging Face Trainer's
`group_by_length`, by whole groups since the loss's group baseline needs every member).
A minibatch's time axis is cut after its last counted token, rounded up to a power of two (the
LM is causal: nothing after it changes a log-prob). With packing, each slice fits its
trajectories first fit by decreasing length into the same number of rows of that width, each
trajectory a segment (`segment_ids`, `positions` from 0); `unpack_index` maps the packed
log-probs back to the minibatch's rows.

The plan depends on the facts and H only: runs with the same H give the same minibatches on any
process count dividing H. With H = 1 it is the layout of one process holding every group.
"""
import dataclasses
from typing import Sequence

import numpy as np

from kimi_jax.data.images import ProcessedImages
from kimi_jax.training.rl_data import TIME_FIELDS, RowImages

# Per-row fields a process's own rows carry into its minibatch blocks.
ROW_FIELDS = ("tokens", "targets", "loss_mask", "rewards")


@dataclasses.dataclass(frozen=True)
class Layout:
  """The run's batch layout: `k` samples per group, `groups_per_minibatch` groups per
  minibatch, `num_slices` slices of `prompts_per_iteration` prompts, packed rows in multiples of
  `row_multiple` (the batch sharding's shard count), packing on or off (rows with images keep
  one trajectory per row: their image fields are per row)."""
  k: int
  groups_per_minibatch: int
  prompts_per_iteration: int
  num_slices: int
  row_multiple: int
  pack: bool
  min_length: int = 32

  def __post_init__(self):
    for name in ("groups_per_minibatch", "prompts_per_iteration"):
      if getattr(self, name) % self.num_slices:
        raise ValueError(f"rl.{name}={getattr(self, name)} does not split into "
                         f"{self.num_slices} equal batch slices (rl.batch_slices; 0: one slice "
                         "per process)")

  @property
  def groups_per_slice(self) -> int:
    """Groups each slice puts into every minibatch."""
    return self.groups_per_minibatch // self.num_slices

  def slice_of(self, group_ids) -> np.ndarray:
    """The slice of each group id (ids count prompts: iteration * prompts_per_iteration + i)."""
    per = self.prompts_per_iteration // self.num_slices
    return (np.asarray(group_ids, np.int64) % self.prompts_per_iteration) // per

  def owned_slices(self, process_index: int, process_count: int) -> range:
    if self.num_slices % process_count:
      raise ValueError(f"rl.batch_slices={self.num_slices} must be a multiple of the "
                       f"{process_count} processes (each owns whole slices)")
    per = self.num_slices // process_count
    return range(process_index * per, (process_index + 1) * per)


@dataclasses.dataclass(frozen=True)
class MinibatchPlan:
  """One minibatch: `rows_HxR` the fact row of each of its rows per slice (-1: a row of an
  empty group), `end_HxR` where each row's counted tokens end (0: none), `length` its time
  axis, and with packing each row's packed row and offset within its slice's `packed_rows`
  rows (-1: a row with nothing to run)."""
  rows_HxR: np.ndarray
  end_HxR: np.ndarray
  length: int
  packed_row_HxR: np.ndarray | None = None
  offset_HxR: np.ndarray | None = None
  packed_rows: int = 0


def bucket_length(last: int, width: int, min_length: int) -> int:
  """`last` rounded up to a power of two, at least `min_length`, at most `width`."""
  return min(width, max(min_length, 1 << (max(last, 1) - 1).bit_length()))


def pack_plan(end_R: np.ndarray, width: int):
  """First fit by decreasing length of rows of `end_R` tokens (0: skipped) into rows of
  `width`: (packed row, offset) of every row (-1 where skipped) and the rows used."""
  packed_R, offset_R = np.full(len(end_R), -1), np.full(len(end_R), -1)
  used = []  # tokens used per packed row
  for row in np.argsort(-end_R, kind="stable"):
    if end_R[row] == 0:
      continue
    packed = next((i for i, n in enumerate(used) if n + end_R[row] <= width), len(used))
    if packed == len(used):
      used.append(0)
    packed_R[row], offset_R[row] = packed, used[packed]
    used[packed] += end_R[row]
  return packed_R, offset_R, len(used)


def plan_minibatches(layout: Layout, slice_G: np.ndarray, end_B: np.ndarray,
                     width: int) -> list[MinibatchPlan]:
  """The minibatches of an iteration whose complete groups (rows group-contiguous, k per
  group, in group-id order) lie in slices `slice_G` and whose rows end their counted tokens
  at `end_B`; `width` is the rows' full time axis."""
  k, per = layout.k, layout.groups_per_slice
  end_G = end_B.reshape(-1, k).max(axis=1)
  queues = []  # per slice: its groups longest first, padded with -1 (empty groups)
  for h in range(layout.num_slices):
    groups = np.flatnonzero(slice_G == h)
    queues.append(groups[np.argsort(-end_G[groups], kind="stable")])
  count = max(1, max(-(-len(q) // per) for q in queues))
  queues = [np.concatenate([q, np.full(count * per - len(q), -1)]) for q in queues]
  plans = []
  for i in range(count):
    groups_HxG = np.stack([q[i * per:(i + 1) * per] for q in queues])
    rows_HxR = np.where(groups_HxG[..., None] >= 0, groups_HxG[..., None] * k + np.arange(k),
                        -1).reshape(layout.num_slices, per * k)
    end_HxR = np.where(rows_HxR >= 0, end_B[np.maximum(rows_HxR, 0)], 0)
    length = bucket_length(int(end_HxR.max()), width, layout.min_length)
    plans.append(_packed(layout, rows_HxR, end_HxR, length) if layout.pack
                 else MinibatchPlan(rows_HxR, end_HxR, length))
  return plans


def _packed(layout: Layout, rows_HxR, end_HxR, length: int) -> MinibatchPlan:
  """The plan with each slice's rows packed into the same count of rows: R/4, R/2 or R, the
  fewest that hold every slice's and make a multiple of `row_multiple` over all slices."""
  plans = [pack_plan(end_R, length) for end_R in end_HxR]
  needed, r = max(used for *_, used in plans), rows_HxR.shape[1]
  rows = next(n for n in (r // 4, r // 2, r)
              if n >= needed and n > 0 and n * layout.num_slices % layout.row_multiple == 0)
  return MinibatchPlan(rows_HxR, end_HxR, length, np.stack([p for p, _, _ in plans]),
                       np.stack([o for _, o, _ in plans]), rows)


@dataclasses.dataclass(frozen=True)
class LocalRows:
  """This process's token rows (`ROW_FIELDS`, [N, ...]) and, per fact row of the iteration,
  the index of its local row (-1: another process's). With images: each local row's processed
  images (or None) and prompt length."""
  fields: dict[str, np.ndarray]
  local_B: np.ndarray
  images_N: Sequence[ProcessedImages | None] | None = None
  prompt_lengths_N: Sequence[int] | None = None

  @classmethod
  def of(cls, rows: dict[str, np.ndarray], group_ids_G, fact_group_id_B: np.ndarray, k: int,
         images_N=None, prompt_lengths_N=None) -> "LocalRows":
    """`rows` (`build_rl_batch` of this process's groups `group_ids_G`, k rows each), located
    among the iteration's fact rows (`fact_group_id_B`, k rows per group)."""
    position = {g: i for i, g in enumerate(group_ids_G)}
    group_B = np.repeat([position.get(g, -1) for g in fact_group_id_B[::k]], k).astype(np.int64)
    local_B = np.where(group_B >= 0, group_B * k + np.arange(len(group_B)) % k, -1)
    return cls({name: rows[name] for name in ROW_FIELDS}, local_B, images_N, prompt_lengths_N)


def process_block(plan: MinibatchPlan, layout: Layout, local: LocalRows, slices: range,
                  pad_id: int, row_images: RowImages | None = None) -> dict[str, np.ndarray]:
  """This process's rows of minibatch `plan` (its `slices`, in order) as numpy: the
  `ROW_FIELDS` cut to the plan's length, group ids numbered over the whole minibatch, zero
  reference log-probs (`ref_is_own` off), the rows' image fields (with `row_images`); packed
  `tokens`/`targets`/`positions`/`segment_ids` and the `unpack_index` into the whole
  minibatch's flattened packed rows."""
  rows_R = plan.rows_HxR[list(slices)].reshape(-1)
  if (local.local_B[rows_R[rows_R >= 0]] < 0).any():
    raise ValueError("a minibatch block needs rows of another process's slices")
  index_R = np.where(rows_R >= 0, local.local_B[np.maximum(rows_R, 0)], -1)
  block = {name: _take_rows(local.fields[name], index_R, plan.length, name, pad_id)
           for name in ROW_FIELDS}
  num_rows, length = len(index_R), plan.length
  per_slice = plan.rows_HxR.shape[1]
  first_row = slices.start * per_slice
  block["group_ids"] = ((first_row + np.arange(num_rows)) // layout.k).astype(np.int32)
  block["ref_logp"] = np.zeros((num_rows, length), np.float32)
  block["ref_is_own"] = np.zeros(num_rows, bool)
  if row_images is not None:
    pick = lambda values, empty: [values[i] if i >= 0 else empty for i in index_R]
    block.update(row_images.fields(pick(local.images_N, None), pick(local.prompt_lengths_N, 0),
                                   block["tokens"]))
  if plan.packed_row_HxR is None:
    block["unpack_index"] = ((first_row + np.arange(num_rows))[:, None] * length
                             + np.arange(length)).astype(np.int32)
    return block
  block.update(_packed_block(plan, block, slices))
  return block


def _take_rows(field: np.ndarray, index_R: np.ndarray, length: int, name: str,
               pad_id: int) -> np.ndarray:
  """Rows `index_R` of a local field (-1: an empty group's row: pad tokens, zero elsewhere),
  time fields cut to `length`."""
  field = field[:, :length] if name in TIME_FIELDS else field
  fill = pad_id if name in ("tokens", "targets") else 0
  out = np.full((len(index_R), *field.shape[1:]), fill, field.dtype)
  out[index_R >= 0] = field[index_R[index_R >= 0]]
  return out


def _packed_block(plan: MinibatchPlan, block: dict, slices: range) -> dict[str, np.ndarray]:
  """The packed token rows of the block's slices and its rows' `unpack_index`."""
  rows, length = plan.packed_rows, plan.length
  out = {name: np.zeros((rows * len(slices), length), np.int32)
         for name in ("tokens", "targets", "positions", "segment_ids")}
  unpack_RxT = np.zeros(block["loss_mask"].shape, np.int32)
  end_R = plan.end_HxR[list(slices)].reshape(-1)
  packed_R = plan.packed_row_HxR[list(slices)].reshape(-1)
  offset_R = plan.offset_HxR[list(slices)].reshape(-1)
  per_slice = plan.rows_HxR.shape[1]
  for row in np.flatnonzero(packed_R >= 0):
    local_slice = row // per_slice
    packed = local_slice * rows + packed_R[row]  # within the block
    n, span = end_R[row], slice(offset_R[row], offset_R[row] + end_R[row])
    out["tokens"][packed, span] = block["tokens"][row, :n]
    out["targets"][packed, span] = block["targets"][row, :n]
    out["positions"][packed, span] = np.arange(n)
    out["segment_ids"][packed, span] = row % per_slice + 1  # 0: the packed rows' unused tail
    unpack_RxT[row, :n] = ((slices.start * rows + packed) * length + offset_R[row]
                           + np.arange(n))
  return {**out, "unpack_index": unpack_RxT}
