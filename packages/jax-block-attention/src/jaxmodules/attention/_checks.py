"""Argument validation for ``masked_attention_via_map``: clear errors before any tracing."""

from __future__ import annotations

import inspect
import numbers
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class CheckedArguments:
    q: jax.Array
    k: jax.Array
    v: jax.Array
    mask_fn: Callable[..., Any] | None
    block_size: tuple[int, int] | None
    window: tuple[int | None, int | None]
    scale: float | None


def _as_array(x: Any, name: str) -> jax.Array:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        try:
            x = jnp.asarray(x)
        except TypeError as err:
            raise TypeError(f"{name} must be an array, got {type(x).__name__}: {err}") from None
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating dtype (float32, bfloat16, float16, ...), "
            f"got {x.dtype} with shape {tuple(x.shape)}"
        )
    return x


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    value = operator.index(value)
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def _block_size(block_size: Any) -> tuple[int, int] | None:
    if block_size is None:
        return None
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(
                f"block_size must be an int or a pair (query_block, key_block), got {block_size!r}"
            )
        return (
            _positive_int(block_size[0], "block_size[0]"),
            _positive_int(block_size[1], "block_size[1]"),
        )
    size = _positive_int(block_size, "block_size")
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


def _window(window_size: Any) -> tuple[int | None, int | None]:
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


def _scale(scale: Any) -> float | None:
    scale_value: Any = scale
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, np.ndarray, np.generic)):
        raise TypeError(f"scale must be a Python or NumPy real number, got {scale!r}")
    if np.ndim(scale_value) != 0:
        raise TypeError(f"scale must be a scalar, got an array of shape {np.shape(scale_value)}")
    value = float(scale_value)
    if not np.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return value


def _mask_arity(mask_fn: Callable[..., Any]) -> int:
    """4 for ``mask_fn(b, h, q, k)``, 3 for ``mask_fn(h, q, k)``."""
    try:
        signature = inspect.signature(mask_fn)
    except (TypeError, ValueError):
        return 4  # no introspectable signature (some builtins): assume the full form
    for arity in (4, 3):
        try:
            signature.bind(*range(arity))
        except TypeError:
            continue
        return arity
    raise TypeError(
        "mask_fn must take 4 positional arguments (b, h, q, k) or 3 (h, q, k), "
        f"got a callable with signature {signature}"
    )


def normalize_mask_fn(mask_fn: Any) -> Callable[..., Any] | None:
    if mask_fn is None:
        return None
    if not callable(mask_fn):
        raise TypeError(f"mask_fn must be callable or None, got {type(mask_fn).__name__}")
    if _mask_arity(mask_fn) == 4:
        return mask_fn

    def mask4(b: Any, h: Any, q: Any, k: Any) -> Any:
        del b
        return mask_fn(h, q, k)

    return mask4


def trace_mask(
    mask4: Callable[..., Any], batch: int, heads: int, q_block: int, k_block: int
) -> Any:
    """Trace ``mask4`` on one block of index arrays, check its result, return the
    closed jaxpr (whose constants are everything the mask closes over)."""
    index = (
        np.arange(batch, dtype=np.int32).reshape(-1, 1, 1, 1),
        np.arange(heads, dtype=np.int32).reshape(1, -1, 1, 1),
        np.arange(q_block, dtype=np.int32).reshape(1, 1, -1, 1),
        np.arange(k_block, dtype=np.int32).reshape(1, 1, 1, -1),
    )
    shapes = (
        f"index arrays b {(batch, 1, 1, 1)}, h {(1, heads, 1, 1)}, "
        f"q {(1, 1, q_block, 1)}, k {(1, 1, 1, k_block)}"
    )
    try:
        closed = jax.make_jaxpr(lambda *idx: jnp.asarray(mask4(*idx)))(*index)
    except jax.errors.JAXTypeError as err:
        raise TypeError(
            "mask_fn must be written with JAX array operations (jnp.where, &, |, indexing "
            "jnp arrays): it is called with traced integer arrays, so it may not branch on "
            "them in Python, convert them to NumPy or index NumPy arrays with them. "
            f"Calling it with {shapes} failed with {type(err).__name__}: {err}"
        ) from None
    except ValueError as err:
        raise ValueError(
            f"mask_fn failed when called with {shapes} (it gets broadcastable integer "
            "arrays, not Python ints, so it must use element-wise array operations): "
            f"{err}"
        ) from err
    result = closed.out_avals[0]
    if result.dtype != jnp.bool_:
        raise TypeError(
            "mask_fn must return booleans (True = visible), got dtype "
            f"{result.dtype} with shape {result.shape} for {shapes}"
        )
    expected = (batch, heads, q_block, k_block)
    try:
        broadcast = np.broadcast_shapes(result.shape, expected)
    except ValueError:
        broadcast = None
    if broadcast != expected:
        raise ValueError(
            f"mask_fn returned shape {result.shape}, which does not broadcast to "
            f"(B, Hq, n_q, n_k) = {expected} for {shapes}"
        )
    return closed


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    shapes = f"Q {tuple(q.shape)}, K {tuple(k.shape)}, V {tuple(v.shape)}"
    if q.ndim not in (3, 4):
        raise ValueError(
            f"Q must have rank 4 (B, Lq, Hq, d) or 3 (Lq, Hq, d), got rank {q.ndim}: {shapes}"
        )
    for name, x in (("K", k), ("V", v)):
        if x.ndim != q.ndim:
            raise ValueError(
                f"{name} must have the same rank as Q ({q.ndim}), got rank {x.ndim}: {shapes}"
            )
    if q.ndim == 4 and not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"Q, K and V must have the same batch size, got {shapes}")
    if k.shape[-3] != v.shape[-3]:
        raise ValueError(f"K and V must have the same length (axis -3), got {shapes}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"K and V must have the same number of heads (axis -2), got {shapes}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"Q and K must have the same head dimension (axis -1), got {shapes}")
    if q.shape[-1] == 0:
        raise ValueError(f"the head dimension d must be positive, got {shapes}")
    q_heads, kv_heads = q.shape[-2], k.shape[-2]
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(
            f"the number of query heads Hq={q_heads} must be a multiple of the number of "
            f"key/value heads Hkv={kv_heads}: {shapes}"
        )


def check_arguments(
    Q: Any,
    K: Any,
    V: Any,
    *,
    is_causal: Any,
    mask_fn: Any,
    block_size: Any,
    window_size: Any,
    scale: Any,
) -> CheckedArguments:
    q, k, v = _as_array(Q, "Q"), _as_array(K, "K"), _as_array(V, "V")
    _check_shapes(q, k, v)
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
    return CheckedArguments(
        q=q,
        k=k,
        v=v,
        mask_fn=normalize_mask_fn(mask_fn),
        block_size=_block_size(block_size),
        window=_window(window_size),
        scale=_scale(scale),
    )
