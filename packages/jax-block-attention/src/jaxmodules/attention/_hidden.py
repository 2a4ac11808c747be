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
from jax import lax

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
    """Whether a tile holds a NaN or an inf: a boolean scalar. ``x * 0`` is NaN exactly
    there, and its sum, reduced one axis at a time (as Triton reduces) in ``x``'s own
    dtype, is NaN exactly when one is (no float32 copy of a 16-bit tile)."""
    zeros = x * jnp.zeros((), x.dtype)
    while jnp.ndim(zeros):
        zeros = zeros.sum(axis=-1, dtype=x.dtype)
    return zeros != zeros


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
    acc: Array | None,
    w: Array,
    visible: Array | None,
    v: Array,
    dot: Callable[[Array, Array], Array],
    count: Callable[[Array, Array], Array] | None = None,
) -> Array:
    """``acc + values_through(w, visible, v, dot)`` (``acc`` float32, ``None`` for 0),
    each product consumed before the next is made, so that inside a kernel only one
    tile beyond ``acc`` is live at a time: the finite values by ``dot``, then the
    visible non-finite ones counted by two products of small integer codes.

    ``visible=None`` reads the hidden pairs from ``w`` itself, as its ``-0.0`` entries
    (``hide_in_sign``): a kernel then keeps no mask tile live until here. ``count(a,
    b)`` multiplies two float16 code tiles; its sums need be exact only below ``2 *
    keys`` (a float16 accumulator, half the registers of a float32 one, serves up to
    1024 keys); by default ``dot`` on codes in ``v``'s dtype."""
    visible = ~_sign_bit(w) if visible is None else jnp.broadcast_to(visible, w.shape)
    clean = dot(w, finite(v))
    acc = clean if acc is None else acc + clean
    # Per (row, column), a count of +inf (then -inf) values where w > 0 is at most n,
    # the keys summed over; `big` (a power of two > n, exact in any float dtype) marks
    # a NaN or an inf where a visible w == 0: each makes a sum >= big, a NaN there.
    n = v.shape[-2]
    big = 1 << n.bit_length()
    dtype: Any = jnp.float16
    if count is None:
        dtype = v.dtype if big <= jnp.finfo(v.dtype).max else _F32
        count = dot
    elif 2 * n > 2048:
        raise ValueError(f"a float16 count over {n} keys could round; at most 1024 are exact")
    taking = w > 0.0  # only on visible pairs: hidden ones have w == 0
    weights = _code(dtype, (taking, 1), (visible, big))
    for inf, bad in ((jnp.inf, jnp.isnan(v)), (-jnp.inf, None)):
        codes = _code(dtype, (v == inf, 1), *(() if bad is None else ((bad, big),)))
        sums = count(weights, codes)
        acc = acc + jnp.where(sums > 0.0, jnp.where(sums >= big, jnp.nan, inf), 0.0)
    return acc


def hide_in_sign(w: Array, visible: Array) -> Array:
    """``w`` (``>= 0``) with its hidden pairs ``-0.0``: a product ignores the sign of a
    zero, and ``add_values_through(..., visible=None)`` reads it."""
    return jnp.where(visible, w, jnp.asarray(-0.0, w.dtype))


def _sign_bit(x: Array) -> Array:
    bits = {2: jnp.int16, 4: jnp.int32}[jnp.dtype(x.dtype).itemsize]
    return lax.bitcast_convert_type(x, bits) < 0


def _code(dtype: Any, *cases: tuple[Array, int]) -> Array:
    """The first case's code where its condition holds, 0 where none does."""
    out = jnp.zeros((), dtype)
    for where, code in reversed(cases):
        out = jnp.where(where, jnp.asarray(code, dtype), out)
    return out
