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
    visible = jnp.broadcast_to(visible, w.shape)
    dtype = v.dtype

    def ones(x: Array) -> Array:
        return jnp.where(x, 1.0, 0.0).astype(dtype)

    clean = dot(w, finite(v))
    taking = ones(w > 0.0)  # w > 0 only on visible pairs: hidden ones have w == 0
    up = dot(taking, ones(v == jnp.inf))
    down = dot(taking, ones(v == -jnp.inf))
    nan = dot(ones(visible), ones(jnp.isnan(v))) + dot(
        ones(visible & (w == 0.0)), ones(jnp.isinf(v))
    )
    out = clean + jnp.where(up > 0.0, jnp.inf, 0.0) + jnp.where(down > 0.0, -jnp.inf, 0.0)
    return jnp.where(nan > 0.0, jnp.nan, out)
