"""The band of keys that ``is_causal``, ``window_size`` and ``q_offset`` leave visible.

Every query position ``q`` sees the keys with ``lo <= k - q <= hi``, so the class of a
whole block (empty, partial, full) follows from its corner positions: O(blocks)
arithmetic with NumPy at trace time or ``jax.numpy`` on the device.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

Array = Any
EMPTY, PARTIAL, FULL = 0, 1, 2


def band_limits(
    is_causal: bool, window: tuple[int | None, int | None]
) -> tuple[int | None, int | None]:
    """``(lo, hi)`` with key ``k`` visible from query position ``q`` iff
    ``lo <= k - q <= hi``; ``None`` is unbounded."""
    left, right = window
    lo = None if left is None else -left
    hi = right
    if is_causal:
        hi = 0 if hi is None else min(hi, 0)
    return lo, hi


def block_grid(q_len: int, k_len: int, q_block: int, k_block: int) -> tuple[int, int]:
    """``(n_q, n_k)``: how many query and key blocks cover the lengths (the last block
    of each may be padded)."""
    return -(-q_len // q_block), -(-k_len // k_block)


def structural_classes(
    xp: Any,
    q_len: int,
    k_len: int,
    q_block: int,
    k_block: int,
    lo: int | None,
    hi: int | None,
    offset: Array,
) -> Array:
    """``(len(offset), n_q_blocks, n_k_blocks)`` block classes of the band, with NumPy
    (``xp=np``) or on the device (``xp=jnp``, ``offset`` may be traced).

    Over a block ``[qf, ql] x [kf, kl]`` the difference ``k - q`` takes every integer in
    ``[kf - ql, kl - qf]``: the block is non-empty iff that range meets ``[lo, hi]`` and
    full iff it lies inside (and the block holds no padded key).
    """
    n_q, n_k = block_grid(q_len, k_len, q_block, k_block)
    i = xp.arange(n_q, dtype=xp.int32)
    j = xp.arange(n_k, dtype=xp.int32)
    offset = xp.asarray(offset, dtype=xp.int32).reshape(-1, 1, 1)
    q_first = i[None, :, None] * q_block + offset
    q_last = xp.minimum((i[None, :, None] + 1) * q_block, q_len) - 1 + offset
    k_first = j[None, None, :] * k_block
    k_last = xp.minimum(k_first + k_block, k_len) - 1
    overlap = xp.ones((*q_first.shape[:2], n_k), bool)
    full = xp.broadcast_to(k_last - k_first + 1 == k_block, overlap.shape)
    if lo is not None:
        overlap = overlap & (k_last - q_first >= lo)
        full = full & (k_first - q_last >= lo)
    if hi is not None:
        overlap = overlap & (k_first - q_last <= hi)
        full = full & (k_last - q_first <= hi)
    return xp.where(overlap, xp.where(full, FULL, PARTIAL), EMPTY).astype(xp.int8)


def in_band(q: Array, k: Array, lo: int | None, hi: int | None, k_len: int) -> Array:
    """Element-wise: key position ``k`` (possibly padding, ``>= k_len``) visible from
    query position ``q`` under the band."""
    visible = k < k_len
    if lo is not None:
        visible = visible & (k - q >= lo)
    if hi is not None:
        visible = visible & (k - q <= hi)
    return visible


def ranges_meet(
    q_first: Array, q_last: Array, k_first: Array, k_last: Array, lo: int | None, hi: int | None
) -> Any:
    """Whether some key of ``[k_first, k_last]`` is visible from some query of
    ``[q_first, q_last]`` under the band: ``k - q`` spans ``[k_first - q_last, k_last -
    q_first]``, which must meet ``[lo, hi]`` (the ``overlap`` of ``structural_classes``
    for one block). Python ints give a bool, traced ones a traced bool; ``True`` when
    the band is unbounded."""
    # Positions compared, not differences: from differences XLA proves some ring pairs
    # always visible and drops their lax.cond, and the compiled ring then needed 15%
    # more temporary memory per device (jax 0.10, 8 CPU devices, L=1024).
    meet: Any = True
    if lo is not None:
        meet = meet & (k_last >= q_first + lo)
    if hi is not None:
        meet = meet & (k_first <= q_last + hi)
    return meet


# ------------------------------------------------------------- per-block ranges


def _floor_div(xp: Any, a: Array, b: int) -> Array:
    """``floor(a / b)`` for ``b > 0``: NumPy's, or truncating ``lax`` division corrected
    (what lowers everywhere, Pallas kernels included)."""
    if xp is np:
        return np.floor_divide(a, b)
    a = jnp.asarray(a, jnp.int32)
    q, r = lax.div(a, jnp.int32(b)), lax.rem(a, jnp.int32(b))
    return q - (r < 0).astype(jnp.int32)


def _clip(xp: Any, x: Array, low: Any, high: Any) -> Array:
    return xp.minimum(xp.maximum(x, low), high)


def kv_range(
    xp: Any,
    i: Array,
    offset: Array,
    q_len: int,
    k_len: int,
    q_block: int,
    k_block: int,
    lo: int | None,
    hi: int | None,
) -> tuple[Array, Array, Array, Array]:
    """The band's key blocks of query block(s) ``i`` (any broadcastable int arrays, with
    NumPy, ``jax.numpy`` or inside a kernel): ``(first, last, full_first, full_last)``,
    the non-empty blocks ``[first, last)`` and within them the full ones
    ``[full_first, full_last)``; the rest of the range is partial. O(1) per block."""
    n_k = -(-k_len // k_block)
    complete = k_len // k_block  # key blocks that hold no padding
    q_first = i * q_block + offset
    q_last = xp.minimum((i + 1) * q_block, q_len) - 1 + offset
    first = xp.zeros_like(q_first)
    last = xp.full_like(q_first, n_k)
    full_first = xp.zeros_like(q_first)
    full_last = xp.full_like(q_first, complete)
    if lo is not None:
        # Block j is non-empty iff its last key min((j+1)kb, Lk) - 1 >= q_first + lo.
        t = q_first + lo
        first = xp.where(t > k_len - 1, n_k, _clip(xp, _floor_div(xp, t, k_block), 0, n_k))
        # Full iff its first key j kb >= q_last + lo.
        full_first = -_floor_div(xp, -(q_last + lo), k_block)
    if hi is not None:
        # Non-empty iff its first key j kb <= q_last + hi.
        last = _clip(xp, _floor_div(xp, q_last + hi, k_block) + 1, 0, n_k)
        # Full iff its last key (j+1) kb - 1 <= q_first + hi.
        full_last = xp.minimum(full_last, _floor_div(xp, q_first + hi + 1, k_block))
    last = xp.maximum(last, first)
    full_first = _clip(xp, full_first, first, last)
    full_last = _clip(xp, full_last, full_first, last)
    return first, last, full_first, full_last


def q_range(
    xp: Any,
    j: Array,
    offset: Array,
    q_len: int,
    k_len: int,
    q_block: int,
    k_block: int,
    lo: int | None,
    hi: int | None,
) -> tuple[Array, Array, Array, Array]:
    """The transposed ``kv_range``: for key block(s) ``j``, the query blocks
    ``(first, last, full_first, full_last)`` (what a key-major backward pass walks)."""
    n_q = -(-q_len // q_block)
    k_first = j * k_block
    k_last = xp.minimum((j + 1) * k_block, k_len) - 1
    first = xp.zeros_like(k_first)
    last = xp.full_like(k_first, n_q)
    full_first = xp.zeros_like(k_first)
    full_last = xp.full_like(k_first, n_q)
    if hi is not None:
        # Query block i is non-empty iff its last row q_last(i) >= k_first - hi.
        s = k_first - hi - offset
        first = xp.where(s > q_len - 1, n_q, _clip(xp, _floor_div(xp, s, q_block), 0, n_q))
        # Full iff its first row i qb + offset >= k_last - hi.
        full_first = -_floor_div(xp, -(k_last - hi - offset), q_block)
    if lo is not None:
        # Non-empty iff its first row i qb + offset <= k_last - lo.
        last = _clip(xp, _floor_div(xp, k_last - lo - offset, q_block) + 1, 0, n_q)
        # Full iff its last row q_last(i) <= k_first - lo; the last block is short.
        x = k_first - lo - offset
        full_last = xp.where(x >= q_len - 1, n_q, _clip(xp, _floor_div(xp, x + 1, q_block), 0, n_q))
    # A key block with padding is never full.
    full_last = xp.where(k_last - k_first + 1 == k_block, full_last, 0)
    last = xp.maximum(last, first)
    full_first = _clip(xp, full_first, first, last)
    full_last = _clip(xp, full_last, full_first, last)
    return first, last, full_first, full_last


def range_counts(
    q_len: int, k_len: int, q_block: int, k_block: int, lo: int | None, hi: int | None
) -> tuple[int, int, int]:
    """``(n_q, full, partial)`` block pairs of the band at offset 0, in O(query blocks):
    what a cost model needs without a per-pair grid."""
    n_q = -(-q_len // q_block)
    i = np.arange(n_q, dtype=np.int64)
    first, last, ff, fl = kv_range(np, i, 0, q_len, k_len, q_block, k_block, lo, hi)
    full = int(np.sum(fl - ff))
    return n_q, full, int(np.sum(last - first)) - full
