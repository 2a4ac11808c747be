"""Building a block mask's second layer: what ``mask_fn`` adds to the band.

The band (``is_causal``, ``window_size``, ``q_offset``) needs no arrays: each block's
range of visible blocks is arithmetic (``_band.kv_range``). A ``mask_fn`` is evaluated
here, in chunks of bounded memory, on the block pairs the band leaves non-empty; pairs
are enumerated from the band's per-row ranges on the device (no per-pair index array
on the host). The result is summarised per query block as ranges,
``(first, last, full_first, full_last)``: the non-empty key blocks ``[first, last)``
and the full run ``[full_first, full_last)`` inside them (the rest is partial), and the
same per key block over query blocks. Documents and every mask whose rows are
contiguous are described exactly by those O(blocks) ranges; for the others (rows with
holes) per-row lists are kept as well, so that empty blocks stay skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from ._band import EMPTY, FULL, PARTIAL, block_grid, in_band, kv_range, q_range
from ._elementwise import ElementwiseProgram

Array = Any  # jax.Array or np.ndarray

# Mask elements evaluated per step when a mask_fn is classified, whatever the length.
MASK_CHUNK_ELEMENTS = 1 << 21
# A traced mask_fn keeps per-row lists (exact skipping of holes inside a row's range)
# while its block grid has at most this many pairs; above, ranges alone (4 int32 per
# block row) keep long contexts linear, and holes inside a range are computed masked.
TRACED_LIST_PAIRS = 1 << 16

LIST_NAMES = (
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
)


@dataclass(frozen=True)
class BuildSpec:
    """Everything static about one block mask; hashable, the key of compiled builders."""

    batch: int  # batch rows the mask layer is kept for: 1 or B
    heads: int  # heads the mask layer is kept for: 1 or H
    offsets: int  # number of q_offset values: 1 or B
    q_len: int
    k_len: int
    q_block: int
    k_block: int
    lo: int | None
    hi: int | None
    program: ElementwiseProgram | None
    static_offset: tuple[int, ...] | None  # the offsets when known at trace time
    keep_lists: bool = True  # a traced build also returns per-row lists

    @property
    def grid(self) -> tuple[int, int]:
        return block_grid(self.q_len, self.k_len, self.q_block, self.k_block)

    def band(self, xp: Any, offset: Array, side: str) -> Array:
        """The band's ranges ``(offsets, n, 4)`` per query block (``side="kv"``) or per
        key block (``"q"``)."""
        n_q, n_k = self.grid
        n, fn = (n_q, kv_range) if side == "kv" else (n_k, q_range)
        idx = xp.arange(n, dtype=xp.int32)[None, :]
        off = xp.asarray(offset, dtype=xp.int32).reshape(-1, 1)
        args = (self.q_len, self.k_len, self.q_block, self.k_block, self.lo, self.hi)
        parts = fn(xp, idx, off, *args)
        return xp.stack([xp.broadcast_to(p, (off.shape[0], n)) for p in parts], axis=-1)


# -------------------------------------------------------------- classification


def _pairs(spec: BuildSpec) -> tuple[Any, int]:
    """``(pair_at, count)``: the block pairs to classify, as a function of the pair
    number (device arithmetic on O(query blocks) constants), and how many there are."""
    n_q, n_k = spec.grid
    if spec.static_offset is None:

        def all_pairs(p: Array) -> tuple[Array, Array]:
            return p // n_k, p % n_k

        return all_pairs, n_q * n_k
    band = spec.band(np, np.asarray(spec.static_offset), "kv")
    first, last = band[..., 0].min(axis=0), band[..., 1].max(axis=0)
    count = np.maximum(last - first, 0).astype(np.int64)
    ends = np.cumsum(count)
    total = int(ends[-1]) if ends.size else 0
    starts_d = jnp.asarray(ends - count, jnp.int32)
    ends_d = jnp.asarray(ends, jnp.int32)
    first_d = jnp.asarray(first, jnp.int32)

    def band_pairs(p: Array) -> tuple[Array, Array]:
        i = jnp.searchsorted(ends_d, p, side="right").astype(jnp.int32)
        i = jnp.minimum(i, n_q - 1)
        return i, first_d[i] + p - starts_d[i]

    return band_pairs, total


def mask_classes(spec: BuildSpec, offset: Array, consts: tuple) -> Array:
    """``(batch, heads, n_q, n_k)`` int8 block classes with ``mask_fn``, evaluated over
    the block pairs the band leaves non-empty (all pairs when the offset is traced), a
    chunk of at most ``MASK_CHUNK_ELEMENTS`` mask elements at a time."""
    program = spec.program
    assert program is not None
    bq, bk = spec.q_block, spec.k_block
    pair_at, total = _pairs(spec)
    dense = jnp.zeros((spec.batch, spec.heads, *spec.grid), jnp.int8)
    if total == 0:
        return dense
    per_pair = spec.batch * spec.heads * bq * bk
    chunk = int(max(1, min(total, MASK_CHUNK_ELEMENTS // per_pair)))
    n_chunks = -(-total // chunk)
    b_idx = jnp.arange(spec.batch, dtype=jnp.int32).reshape(-1, 1, 1, 1, 1)
    h_idx = jnp.arange(spec.heads, dtype=jnp.int32).reshape(1, -1, 1, 1, 1)
    off = jnp.asarray(offset, jnp.int32).reshape(-1, 1, 1, 1, 1)

    def step(c: Array, dense: Array) -> Array:
        # Past the last pair, the last pair again (written twice, the same value).
        p = jnp.minimum(c * chunk + jnp.arange(chunk, dtype=jnp.int32), total - 1)
        i, j = pair_at(p)
        q_row = jnp.minimum(i[:, None] * bq + jnp.arange(bq, dtype=jnp.int32), spec.q_len - 1)
        k_pos = j[:, None] * bk + jnp.arange(bk, dtype=jnp.int32)
        q_pos = q_row[None, None, :, :, None] + off  # (offsets, 1, chunk, bq, 1)
        k_pos = k_pos[None, None, :, None, :]  # (1, 1, chunk, 1, bk)
        k_safe = jnp.minimum(k_pos, spec.k_len - 1)
        visible = program.evaluate(consts, b_idx, h_idx, q_pos, k_safe)
        visible = visible & in_band(q_pos, k_pos, spec.lo, spec.hi, spec.k_len)
        visible = jnp.broadcast_to(visible, (spec.batch, spec.heads, chunk, bq, bk))
        # Padded query rows repeat a real row and padded keys are invisible, so any / all
        # over the block decide its class (EMPTY, PARTIAL, FULL = 0, 1, 2 = any + all).
        # int8 max / min vectorize far better on XLA:CPU than boolean reductions.
        as_int = visible.astype(jnp.int8)
        classes = as_int.max(axis=(3, 4)) + as_int.min(axis=(3, 4))
        return dense.at[:, :, i, j].set(classes)

    return lax.fori_loop(0, n_chunks, step, dense)


# ------------------------------------------------------------- summaries


def ranges_of(xp: Any, classes: Array) -> Array:
    """Per row of ``classes (..., n)``: ``(first, last, full_first, full_last)`` as
    ``(..., 4)`` int32: the non-empty span and the first run of full blocks in it."""
    n = classes.shape[-1]
    j = xp.arange(n, dtype=xp.int32)
    nonempty = classes != EMPTY
    full = classes == FULL
    first = xp.min(xp.where(nonempty, j, n), axis=-1)
    last = xp.max(xp.where(nonempty, j + 1, 0), axis=-1)
    last = xp.maximum(last, first)
    first = xp.minimum(first, last)  # an empty row: [last, last) = [0, 0)
    full_first = xp.min(xp.where(full, j, n), axis=-1)
    after = (~full) & (j >= full_first[..., None])
    full_last = xp.min(xp.where(after, j, n), axis=-1)
    full_first = xp.minimum(xp.maximum(full_first, first), last)
    full_last = xp.minimum(xp.maximum(full_last, full_first), last)
    return xp.stack([first, last, full_first, full_last], axis=-1).astype(xp.int32)


def ranges_exact(classes: np.ndarray, ranges: np.ndarray) -> bool:
    """Whether the ranges skip every empty block of ``classes`` (no hole in a row's
    span); full blocks outside the first run are merely computed with the mask."""
    spans = ranges[..., 1] - ranges[..., 0]
    return bool(np.array_equal(np.count_nonzero(classes != EMPTY, axis=-1), spans))


def classes_from_ranges(xp: Any, ranges: Array, n: int) -> Array:
    """``(..., rows, n)`` int8 classes that ranges ``(..., rows, 4)`` describe."""
    j = xp.arange(n, dtype=xp.int32)
    first, last, full_first, full_last = (ranges[..., t, None] for t in range(4))
    inside = (j >= first) & (j < last)
    full = (j >= full_first) & (j < full_last)
    return xp.where(full, FULL, xp.where(inside, PARTIAL, EMPTY)).astype(xp.int8)


def _lists(xp: Any, classes: Array, width: int) -> tuple[Array, Array, Array, Array]:
    """Per row of ``classes (..., n)``: partial count and indices, full count and indices
    (``width`` entries each, sorted, padded with the row's last index); NumPy or jnp."""
    n = classes.shape[-1]
    rank = xp.where(classes == PARTIAL, 0, xp.where(classes == FULL, 1, 2)).astype(xp.int8)
    order: Any
    if xp is np:
        order = np.argsort(rank, axis=-1, kind="stable").astype(np.int32)
    else:
        order = jnp.argsort(rank, axis=-1, stable=True).astype(jnp.int32)
    n_partial = (classes == PARTIAL).sum(axis=-1, dtype=xp.int32)
    n_full = (classes == FULL).sum(axis=-1, dtype=xp.int32)
    t = xp.arange(width, dtype=xp.int32)
    at_partial = xp.maximum(xp.minimum(t, n_partial[..., None] - 1), 0)
    at_full = xp.clip(n_partial[..., None] + xp.minimum(t, n_full[..., None] - 1), 0, n - 1)
    partial = xp.take_along_axis(order, at_partial, axis=-1)
    full = xp.take_along_axis(order, at_full, axis=-1)
    return n_partial, partial, n_full, full


def list_arrays(xp: Any, classes: Array) -> dict[str, Array]:
    """All eight list arrays of ``classes (Bm, Hm, n_q, n_k)``."""
    kv = _lists(xp, classes, classes.shape[-1])
    qs = _lists(xp, xp.swapaxes(classes, -1, -2), classes.shape[-2])
    arrays = dict(zip(LIST_NAMES[:4], kv, strict=True))
    arrays.update(zip(LIST_NAMES[4:], qs, strict=True))
    return arrays


def trimmed(host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Lists with each cut to its longest row (known once built)."""
    host = dict(host)
    for count, indices in zip(LIST_NAMES[0::2], LIST_NAMES[1::2], strict=True):
        width = max(1, int(host[count].max(initial=0)))
        host[indices] = np.ascontiguousarray(host[indices][..., :width])
    return host


def build(spec: BuildSpec, offset: Array, consts: tuple) -> dict[str, Array]:
    """The mask layer (traceable): ranges both ways, the classes, and, for a traced
    build with ``spec.keep_lists``, the per-row lists (widths: the static bounds)."""
    classes = mask_classes(spec, offset, consts)
    arrays = {
        "kv_ranges": ranges_of(jnp, classes),
        "q_ranges": ranges_of(jnp, jnp.swapaxes(classes, -1, -2)),
        "classes": classes,
    }
    if spec.keep_lists:
        arrays.update(list_arrays(jnp, classes))
    return arrays
