"""Keeping hidden values hidden (SPEC 4.10): a NaN or inf in the ``V`` (or ``K``) of a
key that a query cannot see must not reach that query's row.

A partial tile computes ``p @ V`` with ``p = 0`` on its hidden pairs, and ``0 * NaN``
and ``0 * inf`` are NaN: a non-finite value of a hidden key would reach every row of
the tile. Replacing every non-finite value by 0 is no fix either, since a value that a
query does see must still reach it (``jax.nn``'s result). So each backend checks its
partial tiles for a non-finite ``V`` (one cheap reduction per tile) and only there takes
``values_through``, which adds the finite values by a product and the non-finite ones
by counting, per (row, column), the visible ones of each kind.

The backward passes clean the ``K`` and ``V`` of partial tiles instead (``finite``):
the score gradient of a hidden pair is then ``0 * finite``, while a visible non-finite
value has already made the row's output, and so its ``delta = dO . O``, non-finite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

Array = Any  # jax.Array, or a tile inside a Pallas kernel
_F32 = jnp.float32


def is_finite(x: Array) -> Array:
    """``jnp.isfinite`` spelled with ``abs`` and ``<`` (NaN compares false): Pallas
    Triton lowerings before jax 0.6 have no rule for the ``is_finite`` primitive."""
    return jnp.abs(x) < jnp.inf


def finite(x: Array) -> Array:
    """``x`` with its non-finite entries replaced by 0."""
    return jnp.where(is_finite(x), x, jnp.zeros((), x.dtype))


def any_non_finite(x: Array) -> Array:
    """Whether a tile holds a NaN or an inf: a boolean scalar, reduced one axis at a
    time (as Triton reduces)."""
    bad = jnp.where(is_finite(x), 0.0, 1.0).astype(_F32)
    while jnp.ndim(bad):
        bad = bad.max(axis=-1)
    return bad > 0.0


def values_through(
    w: Array, visible: Array, v: Array, dot: Callable[[Array, Array], Array]
) -> Array:
    """``w @ v`` (float32) in which a hidden pair (``visible`` false, where ``w`` is 0)
    adds exactly 0 whatever its value, and a visible one adds ``w * v`` as a product
    would: NaN for a NaN, or for an inf with ``w == 0`` (dropped by dropout or
    underflowed), and ``+-inf`` for an inf with ``w > 0`` (NaN when both signs meet).

    ``dot(a, b)`` is the tile product, float32 result; ``visible`` broadcasts to
    ``w``'s shape."""
    return add_values_through(None, w, visible, v, dot)


def add_values_through(
    acc: Array | None, w: Array, visible: Array, v: Array, dot: Callable[[Array, Array], Array]
) -> Array:
    """``acc + values_through(w, visible, v, dot)`` (``acc`` float32, ``None`` for 0),
    with each product consumed before the next is made: inside a kernel only one
    float32 tile beyond ``acc`` is live at a time. Two products: the finite values, and
    one of small integer codes that counts, per (row, column), the visible non-finite
    values of each kind (four products of plain counts where the codes do not fit
    ``v``'s dtype)."""
    visible = jnp.broadcast_to(visible, w.shape)
    clean = dot(w, finite(v))
    acc = clean if acc is None else acc + clean
    n = v.shape[-2]  # the keys a product sums over
    # Each count is at most n, so counts weighted by powers of two never mix: +inf counts
    # 1 and -inf counts `minus` (> n) where w > 0; a NaN, or an inf where a visible
    # w == 0, counts at least `nan_code` (> minus * n). Powers of two are exact in any float
    # dtype, and the sums exact in float32 below 2**24; above `nan_code` only that matters.
    minus = 1 << n.bit_length()
    nan_code = 1 << (minus * n).bit_length()
    taking = w > 0.0  # only on visible pairs: hidden ones have w == 0
    pos, neg, bad = v == jnp.inf, v == -jnp.inf, jnp.isnan(v)
    if nan_code <= jnp.finfo(v.dtype).max and minus * n < 2**24:
        codes = dot(
            _code(v.dtype, (taking, 1), (visible, nan_code)),
            _code(v.dtype, (pos, 1), (neg, minus), (bad, nan_code)),
        )
        infs = jnp.where(codes >= nan_code, 0.0, codes)
        acc = _add_infs(acc, infs, minus)
        return jnp.where(codes >= nan_code, jnp.nan, acc)
    # Codes too wide for v's dtype (float16 with tiles of 128 keys or more): plain 0/1
    # counts, one product each.
    def count(a: Array, b: Array) -> Array:
        return dot(_code(v.dtype, (a, 1)), _code(v.dtype, (b, 1)))

    acc = acc + jnp.where(count(taking, pos) > 0.0, jnp.inf, 0.0)
    acc = acc + jnp.where(count(taking, neg) > 0.0, -jnp.inf, 0.0)
    acc = jnp.where(count(visible, bad) > 0.0, jnp.nan, acc)
    return jnp.where(count(visible & ~taking, pos | neg) > 0.0, jnp.nan, acc)


def _code(dtype: Any, *cases: tuple[Array, int]) -> Array:
    """The first case's code where its condition holds, 0 where none does."""
    out = jnp.zeros((), dtype)
    for where, code in reversed(cases):
        out = jnp.where(where, jnp.asarray(code, dtype), out)
    return out


def _add_infs(acc: Array, infs: Array, minus: int) -> Array:
    """``acc`` plus ``+inf`` where ``infs`` counts a ``+inf`` (its remainder by
    ``minus``) and ``-inf`` where it counts a ``-inf`` (its quotient): NaN for both."""
    below = jnp.floor(infs * (1.0 / minus))  # exact: minus is a power of two
    up = infs - below * minus
    acc = acc + jnp.where(up > 0.0, jnp.inf, 0.0)
    return acc + jnp.where(below > 0.0, -jnp.inf, 0.0)
