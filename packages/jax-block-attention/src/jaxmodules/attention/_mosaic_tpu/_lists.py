"""Mosaic TPU backend, the one reader of a block mask's schedule: what a pass
scalar-prefetches into SMEM, how many steps its innermost grid axis takes, and which
block step ``t`` of a row visits (in the index maps and in the kernels alike).

A row is a query block (``side="kv"``: forward and dQ passes) or a key block
(``side="q"``: the dK/dV pass). The block mask's two layers (``BlockMask.walk``):

- ``"band"``: nothing beyond ``q_offset`` is prefetched; each row's range ``(first,
  last, full_first, full_last)`` is ``_band.kv_range`` / ``q_range``, scalar arithmetic
  on the program ids;
- ``"ranges"``: the four numbers per row (``BlockMask.schedule(side)``), flattened;
- ``"lists"``: per row the count of its non-empty blocks, their indices (full ones
  first) and a full flag per entry, from the block mask's lists. SMEM is small (1 MiB
  on v5e): lists larger than ``SMEM_LIST_BYTES`` are left for the ranges the block mask
  also keeps (the holes inside a row's range are then computed, masked).

Over a range, step ``t`` visits the full run ``[full_first, full_last)`` first, then
the partial blocks ``[first, full_first)`` and ``[full_last, last)`` (the order of the
lists). Steps past a row's count repeat its last block, so the pipeline's next block
index equals the current one and no new copy is issued for the steps the kernel skips.
The number of steps is static: the widest row, known at trace time for a band or
host ranges, bounded by the band's width when the ranges are traced.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._band import kv_range, q_range
from .._block_mask import BlockMask

Array = Any
# Prefetched arrays of each walk, before the query offsets and the dropout seeds.
WALK_ARRAYS = {"band": 0, "ranges": 1, "lists": 3}
# The most bytes of lists one pass prefetches into SMEM.
SMEM_LIST_BYTES = 1 << 18


class KernelSchedule(NamedTuple):
    """What a pass scalar-prefetches for the rows of one side (1-D int32 arrays,
    flattened row-major over ``(Bm, Hm, rows, ...)``) and its steps per row."""

    walk: str  # "band", "ranges" or "lists"
    arrays: tuple[Array, ...]  # () | (ranges,) | (counts, indices, full flags)
    steps: int  # entries per row: the grid's innermost axis


def _concrete(x: Any) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def _band_steps(block_mask: BlockMask, side: str) -> int:
    """The widest row of the band: exact for a known offset, else bounded by the
    window (every block when a side of the band is unbounded)."""
    _, _, q_len, k_len = block_mask.shape
    bq, bk = block_mask.block_size
    n_q, n_k = block_mask.num_blocks
    lo, hi = block_mask.band()
    offset = block_mask.q_offset
    if _concrete(offset):
        fn, n = (kv_range, n_q) if side == "kv" else (q_range, n_k)
        rows = np.arange(n, dtype=np.int64)[None, :]
        off = np.asarray(offset, np.int64).reshape(-1, 1)
        first, last, _, _ = fn(np, rows, off, q_len, k_len, bq, bk, lo, hi)
        return int(np.max(last - first, initial=0))
    if lo is None or hi is None:
        return n_k if side == "kv" else n_q
    # The positions a row sees span its own block plus the window: that many blocks of
    # the other side, plus one for the misalignment at each end.
    if side == "kv":
        return min((bq + hi - lo) // bk + 2, n_k)
    return min((bk + hi - lo) // bq + 2, n_q)


def _ranges_steps(block_mask: BlockMask, side: str) -> int:
    ranges = block_mask.ranges(side)
    if _concrete(ranges):
        ranges = np.asarray(ranges)
        return int(np.max(ranges[..., 1] - ranges[..., 0], initial=0))
    # Traced ranges lie inside the band's.
    return _band_steps(block_mask, side)


def _list_bytes(block_mask: BlockMask, side: str) -> int:
    """SMEM bytes of the prefetched lists of ``side``: a count per row, and an index
    and a flag per entry."""
    n_q, n_k = block_mask.num_blocks
    rows, others = (n_q, n_k) if side == "kv" else (n_k, n_q)
    width = sum(
        np.shape(getattr(block_mask, n))[-1] for n in (f"{side}_indices", f"full_{side}_indices")
    )
    steps = max(1, min(width, others))
    return 4 * block_mask.mask_batch * block_mask.mask_heads * rows * (1 + 2 * steps)


def kernel_walk(block_mask: BlockMask) -> str:
    """How the kernels walk ``block_mask``: its ``walk``, but ranges rather than lists
    that would not fit SMEM."""
    walk = block_mask.walk
    if walk != "lists" or block_mask.kv_ranges is None or block_mask.q_ranges is None:
        return walk
    too_large = max(_list_bytes(block_mask, s) for s in ("kv", "q")) > SMEM_LIST_BYTES
    return "ranges" if too_large else walk


def kernel_schedule(block_mask: BlockMask, side: str) -> KernelSchedule:
    """The schedule of ``side`` (``"kv"``: key blocks per query block; ``"q"``: query
    blocks per key block) as the kernels prefetch and walk it."""
    walk = kernel_walk(block_mask)
    if walk == "lists":
        lists = kernel_lists(block_mask, side)
        return KernelSchedule(walk, lists[:3], lists[3])
    if walk == "ranges":
        ranges = jnp.asarray(block_mask.ranges(side), jnp.int32).reshape(-1)
        return KernelSchedule(walk, (ranges,), max(1, _ranges_steps(block_mask, side)))
    return KernelSchedule(walk, (), max(1, _band_steps(block_mask, side)))


def kernel_lists(block_mask: BlockMask, side: str) -> tuple[Array, Array, Array, int]:
    """The lists of ``side`` (only for ``walk == "lists"``): counts ``(Bm * Hm *
    rows,)``, then indices and full flags ``(Bm * Hm * rows * steps,)``, and steps."""
    n_partial = jnp.asarray(getattr(block_mask, f"{side}_num_blocks"), jnp.int32)
    partial = jnp.asarray(getattr(block_mask, f"{side}_indices"), jnp.int32)
    n_full = jnp.asarray(getattr(block_mask, f"full_{side}_num_blocks"), jnp.int32)
    full = jnp.asarray(getattr(block_mask, f"full_{side}_indices"), jnp.int32)
    n_q, n_k = block_mask.num_blocks
    others = n_k if side == "kv" else n_q
    width_full = full.shape[-1]
    # A block is either full or partial, so no row lists more than `others` blocks.
    steps = max(1, min(partial.shape[-1] + width_full, others))
    total = n_partial + n_full
    t = jnp.arange(steps, dtype=jnp.int32)
    # Clamped to the row's last entry (0 on an empty row).
    t = jnp.maximum(jnp.minimum(t, total[..., None] - 1), 0)
    is_full = t < n_full[..., None]
    source = jnp.where(is_full, t, width_full + t - n_full[..., None])
    merged = jnp.concatenate([full, partial], axis=-1)
    indices = jnp.take_along_axis(merged, source, axis=-1)
    is_full = is_full & (total[..., None] > 0)
    return (
        total.reshape(-1),
        indices.reshape(-1),
        is_full.astype(jnp.int32).reshape(-1),
        steps,
    )


# ------------------------------------------------------------------ in the kernels


def _range_step(
    first: Array, last: Array, full_first: Array, full_last: Array, t: Array, others: int
) -> tuple[Array, Array, Array]:
    """Step ``t`` over a range: the full run, then the partial blocks before and after
    it; past the end the last block again (block ``first`` on an empty row)."""
    count = last - first
    n_full = full_last - full_first
    before = full_first - first
    u = jnp.maximum(jnp.minimum(t, count - 1), 0)
    rest = u - n_full
    block = jnp.where(
        u < n_full,
        full_first + u,
        jnp.where(rest < before, first + rest, full_last + rest - before),
    )
    # An empty row may start past the last block.
    block = jnp.minimum(block, others - 1)
    return block, t < count, u < n_full


def step_block(
    config: Any, side: str, refs: tuple, b: Array, h: Array, row: Array, t: Array
) -> tuple[Array, Array, Array]:
    """``(block, active, full)`` of step ``t`` of row ``row`` (a query block for
    ``side="kv"``, a key block for ``"q"``) for batch row ``b`` and query head ``h``:
    the block of the other side to visit, whether the step computes it (past the
    row's count it repeats the last block and does nothing) and whether it is full.
    ``refs``: the prefetched schedule, then the query offsets (``config``: a
    ``MosaicConfig``; scalar code, for index maps and kernels)."""
    mb = b if config.mask_batch > 1 else 0
    mh = h if config.mask_heads > 1 else 0
    n_rows, others = (
        (config.n_q_blocks, config.n_k_blocks)
        if side == "kv"
        else (config.n_k_blocks, config.n_q_blocks)
    )
    at = (mb * config.mask_heads + mh) * n_rows + row
    if config.walk == "lists":
        counts, indices, full = refs[:3]
        steps = config.kv_steps if side == "kv" else config.q_steps
        entry = at * steps + t
        return indices[entry], t < counts[at], full[entry] == 1
    if config.walk == "ranges":
        ranges = refs[0]
        first, last, full_first, full_last = (ranges[at * 4 + c] for c in range(4))
    else:
        fn = kv_range if side == "kv" else q_range
        offset = refs[WALK_ARRAYS[config.walk]][mb]
        blocks = (config.q_len, config.k_len, config.q_block, config.k_block)
        first, last, full_first, full_last = fn(jnp, row, offset, *blocks, config.lo, config.hi)
    return _range_step(first, last, full_first, full_last, t, others)
