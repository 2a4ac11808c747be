"""Normalisation of the mask arguments shared by the entry points (block size, window,
query offset): a leaf module, with clear errors that name the argument."""

from __future__ import annotations

import numbers
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _int_at_least(value: Any, name: str, least: int, kind: str) -> int:
    """``value`` as an int ``>= least``; the errors call it ``kind``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    value = operator.index(value)
    if value < least:
        raise ValueError(f"{name} must be {kind}, got {value}")
    return value


def positive_int(value: Any, name: str) -> int:
    return _int_at_least(value, name, 1, "a positive int")


def _pair(value: Any, name: str, kinds: str, sides: tuple[str, str], side: Any) -> tuple:
    """An int or a pair (``kinds`` says which, for the error), each checked by
    ``side(value, name)`` under the names ``sides``; ``(x, x)`` for a single ``x``."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be {kinds}, got {value!r}")
        return side(value[0], sides[0]), side(value[1], sides[1])
    single = side(value, name)
    return single, single


def normalize_block_size(block_size: Any) -> tuple[int, int] | None:
    """``None``, or ``(query_block, key_block)`` from an int or a pair."""
    if block_size is None:
        return None
    return _pair(
        block_size,
        "block_size",
        "an int or a pair (query_block, key_block)",
        ("block_size[0]", "block_size[1]"),
        positive_int,
    )


def _window_side(value: Any, name: str) -> int | None:
    if value is None:
        return None
    return _int_at_least(value, name, 0, "a non-negative int or None")


def normalize_window(window_size: Any) -> tuple[int | None, int | None]:
    """``(left, right)`` from ``None``, an int or a pair (``None`` sides unbounded)."""
    if window_size is None:
        return None, None
    return _pair(
        window_size,
        "window_size",
        "a pair (left, right) or an int",
        ("window_size[0] (left)", "window_size[1] (right)"),
        _window_side,
    )


def normalize_q_offset(q_offset: Any, batch: int) -> Any:
    """``q_offset`` as an int32 array of shape ``(1,)`` or ``(batch,)`` (NumPy when known
    now, traced otherwise)."""
    if isinstance(q_offset, bool):
        raise TypeError(f"q_offset must be an int or an int array of shape (B,), got {q_offset!r}")
    if isinstance(q_offset, numbers.Integral):
        return np.array([int(q_offset)], np.int32)
    if not hasattr(q_offset, "dtype"):
        raise TypeError(
            f"q_offset must be an int or an int array of shape (B,), got "
            f"{type(q_offset).__name__}: {q_offset!r}"
        )
    if not jnp.issubdtype(q_offset.dtype, jnp.integer):
        raise TypeError(
            f"q_offset must have an integer dtype, got {q_offset.dtype} with shape "
            f"{tuple(q_offset.shape)}"
        )
    if q_offset.ndim > 1 or (q_offset.ndim == 1 and q_offset.shape[0] not in (1, batch)):
        raise ValueError(
            f"q_offset must be an int or have shape (B,) = ({batch},), got shape "
            f"{tuple(q_offset.shape)}"
        )
    if isinstance(q_offset, jax.core.Tracer):
        return jnp.asarray(q_offset, jnp.int32).reshape(-1)
    return np.asarray(q_offset, np.int32).reshape(-1)
