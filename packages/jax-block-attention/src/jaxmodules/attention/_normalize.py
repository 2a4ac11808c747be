"""Normalisation of the mask arguments shared by the entry points (block size, window,
query offset): a leaf module, with clear errors that name the argument."""

from __future__ import annotations

import numbers
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    value = operator.index(value)
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def normalize_block_size(block_size: Any) -> tuple[int, int] | None:
    if block_size is None:
        return None
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(
                f"block_size must be an int or a pair (query_block, key_block), got {block_size!r}"
            )
        return (
            positive_int(block_size[0], "block_size[0]"),
            positive_int(block_size[1], "block_size[1]"),
        )
    size = positive_int(block_size, "block_size")
    return size, size


def _window_side(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative int or None, got {value!r}")
    value = operator.index(value)
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int or None, got {value}")
    return value


def normalize_window(window_size: Any) -> tuple[int | None, int | None]:
    if window_size is None:
        return None, None
    if isinstance(window_size, (tuple, list)):
        if len(window_size) != 2:
            raise ValueError(
                f"window_size must be a pair (left, right) or an int, got {window_size!r}"
            )
        return (
            _window_side(window_size[0], "window_size[0] (left)"),
            _window_side(window_size[1], "window_size[1] (right)"),
        )
    side = _window_side(window_size, "window_size")
    if side is None:
        return None, None
    return side, side


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
