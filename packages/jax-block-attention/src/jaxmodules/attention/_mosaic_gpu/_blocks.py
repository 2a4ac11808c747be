"""Mosaic GPU backend, how its kernels read a block mask: the one adapter between the
block mask's plan (``BlockMask.walk``) and what the kernels walk.

Each row of a kernel (a query block in the forward and dQ passes, a key block in the
dK/dV pass) reads one int32 table row, ``HEADER`` entries then the walk's own::

    [q_offset, seed, 0, 0]                                  walk "band"
    [q_offset, seed, 0, 0, first, last, full_first, full_last]    walk "ranges"
    [q_offset, seed, 0, 0, count, n_partial, 0, 0, block_0, ..., block_{W-1}]   "lists"

The band keeps one row per batch row (its ranges are arithmetic on the row's index and
the offset, ``_band.kv_range`` / ``q_range``, computed in the kernel), ranges four
numbers per block row: O(blocks) either way. Only a mask whose rows have holes keeps
lists, ``count`` blocks of which the first ``n_partial`` are partial. A kernel copies
its row into shared memory with one TMA (widths are multiples of 4 int32 = 16 bytes,
TMA's granule) and reads its scalars from there; ``row_walk`` turns them into the same
walk for every layout: the partial blocks in increasing order, then the full ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._band import kv_range, q_range
from .._block_mask import BlockMask
from .._config import BlockConfig

OFFSET, SEED = 0, 1  # header entries: q_offset, dropout seed (0 without dropout)
HEADER = 4


def _gather(lst: Any, at: Any, shape: tuple[int, ...]) -> Any:
    """``lst[..., at]`` with ``at`` clipped into the list; zeros from an empty list."""
    if not lst.shape[-1]:
        return jnp.zeros(shape, jnp.int32)
    return jnp.take_along_axis(lst, jnp.clip(at, 0, lst.shape[-1] - 1), axis=-1)


def _merged(counts: Any, indices: Any, full_counts: Any, full_indices: Any) -> tuple[Any, Any]:
    """``(count, blocks)``: the partial list followed by the full list, compacted."""
    width = max(indices.shape[-1] + full_indices.shape[-1], 1)
    shape = (*counts.shape, width)
    t = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), shape)
    c_p = counts[..., None]
    blocks = jnp.where(t < c_p, _gather(indices, t, shape), _gather(full_indices, t - c_p, shape))
    valid = t < c_p + full_counts[..., None]
    return counts + full_counts, jnp.where(valid, blocks, 0)


def _walk_data(block_mask: BlockMask, side: str) -> Any:
    """What a row walks beyond its header, ``(Bm, Hm, rows, width)`` int32: nothing (one
    row) for the band, the four ranges, or ``[count, n_partial, 0, 0, blocks...]``."""
    bm, hm = block_mask.mask_batch, block_mask.mask_heads
    walk = block_mask.walk
    if walk == "band":
        return jnp.zeros((bm, hm, 1, 0), jnp.int32)
    schedule = [jnp.asarray(x, jnp.int32) for x in block_mask.schedule(side)]
    if walk == "ranges":
        return schedule[0]
    counts, _, _, _ = schedule
    count, blocks = _merged(*schedule)
    zeros = jnp.zeros_like(count)
    data = jnp.concatenate([jnp.stack([count, counts, zeros, zeros], -1), blocks], axis=-1)
    width = -(-data.shape[-1] // 4) * 4
    return jnp.pad(data, ((0, 0),) * (data.ndim - 1) + ((0, width - data.shape[-1]),))


def walk_tables(block_mask: BlockMask) -> tuple[Any, Any]:
    """``(by_query, by_key)``: the table rows of the forward/dQ passes ``(Bm, Hm, n_q |
    1, HEADER + W)`` and of the dK/dV pass ``(Bm, Hm, n_k | 1, HEADER + W')``: one row
    per batch row for the band, one per block row otherwise."""
    offset = jnp.asarray(block_mask.q_offset, jnp.int32).reshape(-1)
    tables = []
    for side in ("kv", "q"):
        data = _walk_data(block_mask, side)
        shape = (*data.shape[:-1], HEADER)
        row_offset = jnp.broadcast_to(offset[: shape[0]].reshape(-1, 1, 1), shape[:-1])
        header = jnp.zeros(shape, jnp.int32).at[..., OFFSET].set(row_offset)
        tables.append(jnp.concatenate([header, data], axis=-1))
    return tables[0], tables[1]


def table_row(config: BlockConfig, row: Any) -> Any:
    """The table row a kernel's row block reads: its own, or the batch row's one (the
    band)."""
    return 0 if config.walk == "band" else row


def row_walk(
    config: BlockConfig, table: Any, row: Any, side: str
) -> tuple[Any, Any, Callable[[Any], Any]]:
    """``(count, n_partial, block)`` of row block ``row`` (a query block for ``side="kv"``,
    a key block for ``"q"``) from its table row ``table`` (anything indexed by an int:
    a shared-memory ref in the kernels): ``block(t)`` is the walk's ``t``-th block, the
    ``n_partial`` partial ones first (increasing), then the full ones (increasing)."""
    if config.walk == "lists":
        return table[HEADER], table[HEADER + 1], lambda t: table[HEADER + 4 + t]

    def ranges() -> tuple[Any, Any, Any, Any]:
        if config.walk == "ranges":
            return tuple(table[HEADER + i] for i in range(4))
        fn = kv_range if side == "kv" else q_range
        blocks = (config.q_len, config.k_len, config.q_block, config.k_block)
        offset = jnp.asarray(table[OFFSET], jnp.int32)
        return fn(jnp, jnp.asarray(row, jnp.int32), offset, *blocks, config.lo, config.hi)

    kept = ranges()

    def block(t: Any) -> Any:
        # Stored ranges read again at every step rather than kept live through the loop
        # (registers are what the consumers run short of; computing the band's again
        # costs more than keeping them: ptxas for sm_90a, dK/dV at d=128).
        first, last, full_first, full_last = ranges() if config.walk == "ranges" else kept
        before = full_first - first
        n_partial = before + last - full_last
        after = jnp.where(t < n_partial, full_last + t - before, full_first + t - n_partial)
        return jnp.where(t < before, first + t, after)

    first, last, full_first, full_last = kept
    return last - first, full_first - first + last - full_last, block


def with_seeds(table: Any, seeds: Any) -> Any:
    """``table`` kept per batch row and head ``(B, Hq, rows, width)``, each row's
    ``SEED`` header entry the ``(b, h)`` dropout seed (``uint32`` as ``int32`` bits)."""
    bsz, heads = seeds.shape
    table = jnp.broadcast_to(table, (bsz, heads, *table.shape[2:]))
    bits = jax.lax.bitcast_convert_type(jnp.asarray(seeds, jnp.uint32), jnp.int32)
    return table.at[..., SEED].set(bits[:, :, None])
