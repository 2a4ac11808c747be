"""Mosaic GPU backend, how its kernels read a block mask: the one adapter between the
block mask's format and what the kernels walk.

Each row of a kernel (a query block in the forward and dQ passes, a key block in the
dK/dV pass) walks one int32 table row::

    [count, n_partial, q_offset, seed, block_0, block_1, ..., block_{W-1}]

``count`` non-empty blocks, the first ``n_partial`` of them partial (they evaluate the
element-wise mask on the tile), the rest full (no mask evaluation), and the position of
query row 0. A kernel copies its row into shared memory with one TMA (the width is a
multiple of 4 int32 = 16 bytes, TMA's granule) and reads its scalars from there.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .._block_mask import BlockMask

HEADER = 4  # count, n_partial, q_offset, dropout seed (0 without dropout)


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


def walk_tables(block_mask: BlockMask) -> tuple[Any, Any]:
    """``(by_query, by_key)``: the table rows of the forward/dQ passes ``(Bm, Hm, n_q,
    HEADER + W)`` and of the dK/dV pass ``(Bm, Hm, n_k, HEADER + W')``, widths rounded up
    to multiples of 4."""
    offset = jnp.asarray(block_mask.q_offset, jnp.int32).reshape(-1)
    tables = []
    for side in ("kv", "q"):
        counts = jnp.asarray(getattr(block_mask, f"{side}_num_blocks"), jnp.int32)
        indices = jnp.asarray(getattr(block_mask, f"{side}_indices"), jnp.int32)
        full_counts = jnp.asarray(getattr(block_mask, f"full_{side}_num_blocks"), jnp.int32)
        full_indices = jnp.asarray(getattr(block_mask, f"full_{side}_indices"), jnp.int32)
        count, blocks = _merged(counts, indices, full_counts, full_indices)
        width = -(-blocks.shape[-1] // 4) * 4
        blocks = jnp.pad(blocks, ((0, 0),) * (blocks.ndim - 1) + ((0, width - blocks.shape[-1]),))
        bm = counts.shape[0]
        row_offset = jnp.broadcast_to(offset.reshape(-1, 1, 1)[:bm], counts.shape)
        header = jnp.stack([count, counts, row_offset, jnp.zeros_like(count)], axis=-1)
        tables.append(jnp.concatenate([header, blocks], axis=-1))
    return tables[0], tables[1]


def with_seeds(table: Any, seeds: Any) -> Any:
    """``table`` kept per batch row and head ``(B, Hq, rows, width)``, each row's fourth
    header entry the ``(b, h)`` dropout seed (``uint32`` as ``int32`` bits)."""
    bsz, heads = seeds.shape
    table = jnp.broadcast_to(table, (bsz, heads, *table.shape[2:]))
    bits = jax.lax.bitcast_convert_type(jnp.asarray(seeds, jnp.uint32), jnp.int32)
    return table.at[..., 3].set(bits[:, :, None])
