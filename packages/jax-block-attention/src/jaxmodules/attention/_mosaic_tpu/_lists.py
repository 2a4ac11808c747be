"""Mosaic TPU backend, the one place that reads a block mask's lists: per row (a query
block, or a key block for the dK/dV pass) the count of its non-empty blocks on the
other side, their indices (full blocks first, then partial ones) and a full/partial
flag per entry, flattened to 1-D int32 for scalar prefetch into SMEM.

Entries past a row's count repeat its last listed block, so the pipeline's next block
index equals the current one and no new copy is issued for the steps the kernel skips.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from .._block_mask import BlockMask

Array = Any


class KernelLists(NamedTuple):
    """What a pass scalar-prefetches for rows of one side, flattened row-major over
    ``(Bm, Hm, rows, steps)``."""

    counts: Array  # (Bm * Hm * rows,) int32: non-empty blocks per row
    indices: Array  # (Bm * Hm * rows * steps,) int32: their block indices
    full: Array  # (Bm * Hm * rows * steps,) int32: 1 where the block is full
    steps: int  # entries per row: the grid's innermost axis


def kernel_lists(block_mask: BlockMask, side: str) -> KernelLists:
    """The lists of ``side`` (``"kv"``: key blocks per query block, for the forward and
    dQ passes; ``"q"``: query blocks per key block, for the dK/dV pass)."""
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
    return KernelLists(
        total.reshape(-1),
        indices.reshape(-1),
        is_full.astype(jnp.int32).reshape(-1),
        steps,
    )
