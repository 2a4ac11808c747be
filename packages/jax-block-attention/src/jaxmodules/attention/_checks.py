"""Argument validation: clear errors that name the argument, before any tracing."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._block_mask import BlockMask
from ._dropout import Dropout
from ._normalize import normalize_block_size, normalize_q_offset, normalize_window


@dataclass(frozen=True)
class CheckedArguments:
    """The arguments of ``masked_attention_via_map``, checked and normalised."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    is_causal: bool
    block_size: tuple[int, int] | None
    window: tuple[int | None, int | None]
    scale: float | None  # a traced scale is already folded into q (fold_scale)
    q_offset: Any  # int32 (1,) or (B,): NumPy when known now, traced otherwise
    mask_fn: Any = None
    score_mod: Any = None
    block_mask: BlockMask | None = None
    bias: jax.Array | None = None  # rank 4, broadcastable to (B, Hq, Lq, Lk)
    mask: jax.Array | None = None  # rank 4 boolean, broadcastable to (B, Hq, Lq, Lk)
    q_lengths: jax.Array | None = None  # (B,) int32
    kv_lengths: jax.Array | None = None  # (B,) int32
    soft_cap: float | None = None
    sinks: jax.Array | None = None  # (Hq,)
    dropout: Dropout | None = None  # checked by _dropout.check_dropout


def _as_array(x: Any, name: str) -> jax.Array:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        try:
            if x is None or isinstance(x, (str, bytes)):  # older jax makes them arrays
                raise TypeError("not array-like")
            x = jnp.asarray(x)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be an array, got {type(x).__name__}: {err}") from None
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating dtype (float32, bfloat16, float16, ...), "
            f"got {x.dtype} with shape {tuple(x.shape)}"
        )
    return x


def normalize_scale(scale: Any) -> float | jax.Array | None:
    """``scale`` checked: ``None``, a float, or (when traced) a float scalar array.

    A concrete array (``1 / jnp.sqrt(d)``) becomes a float; a traced one stays an array
    for ``fold_scale``: the kernels take the scale as a static float.
    """
    if scale is None:
        return None
    if isinstance(scale, (jax.Array, jax.core.Tracer)):
        if scale.ndim != 0:
            raise TypeError(f"scale must be a scalar, got an array of shape {tuple(scale.shape)}")
        if not jnp.issubdtype(scale.dtype, jnp.floating):
            raise TypeError(
                f"scale must be a real number or a floating scalar array, got dtype {scale.dtype}"
            )
        if isinstance(scale, jax.core.Tracer):
            return scale
        scale = np.asarray(scale)
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, np.ndarray, np.generic)):
        raise TypeError(
            f"scale must be a real number or a floating scalar array, got "
            f"{type(scale).__name__}: {scale!r}"
        )
    number: Any = scale
    if np.ndim(number) != 0:
        raise TypeError(f"scale must be a scalar, got an array of shape {np.shape(number)}")
    value = float(number)
    if not np.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return value


def fold_scale(q: jax.Array, scale: float | jax.Array | None) -> tuple[jax.Array, float | None]:
    """``(q, scale)`` for the kernels, whose scale is a static float: a traced scale is
    multiplied into the queries (in at least float32, then rounded to ``q``'s dtype) and
    the kernels' scale becomes 1. Differentiating through that product gives the scale
    its gradient, ``sum(dq_scaled * q) = sum(dS * (q @ k^T))``, with no kernel change."""
    if scale is None or isinstance(scale, float):
        return q, scale
    wide = jnp.promote_types(q.dtype, jnp.float32)
    return (q.astype(wide) * scale.astype(wide)).astype(q.dtype), 1.0


# Added to a shape error when the shapes would fit with the sequence and head axes
# swapped: PyTorch's (B, H, L, E) layout given where (B, L, H, d) is expected.
LAYOUT_HINT = (
    "; these shapes fit with the length and heads axes swapped: masked_attention_via_map "
    "takes (B, L, H, d), PyTorch FlexAttention's layout (B, H, L, E) is "
    "jaxmodules.attention.flex.flex_attention's (or transpose with jnp.swapaxes(x, -3, -2))"
)


def _swapped(x: Any) -> jax.ShapeDtypeStruct:
    shape = list(x.shape)
    shape[-3], shape[-2] = shape[-2], shape[-3]
    return jax.ShapeDtypeStruct(tuple(shape), x.dtype)


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    try:
        _check_shape_rules(q, k, v)
    except ValueError as err:
        if q.ndim == k.ndim == v.ndim == 4:
            try:
                _check_shape_rules(_swapped(q), _swapped(k), _swapped(v))
            except ValueError:
                raise err from None
            raise ValueError(f"{err}{LAYOUT_HINT}") from None
        raise


def _check_shape_rules(q: Any, k: Any, v: Any) -> None:
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
    if q_heads == 0 or kv_heads == 0:
        raise ValueError(
            f"the numbers of heads must be positive, got Hq={q_heads} and Hkv={kv_heads}: {shapes}"
        )
    if q_heads % kv_heads != 0:
        raise ValueError(
            f"the number of query heads Hq={q_heads} must be a multiple of the number of "
            f"key/value heads Hkv={kv_heads}: {shapes}"
        )


def _broadcastable(
    x: Any, name: str, target: tuple[int, ...], boolean: bool, batched: bool
) -> jax.Array:
    """``x`` as a rank-4 array broadcastable to ``target = (B, Hq, Lq, Lk)``."""
    kind = "a boolean" if boolean else "a floating"
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be {kind} array, got {type(x).__name__}")
    ok = jnp.issubdtype(x.dtype, jnp.bool_) if boolean else jnp.issubdtype(x.dtype, jnp.floating)
    if not ok:
        raise TypeError(f"{name} must be {kind} array, got dtype {x.dtype}")
    shape = tuple(x.shape)
    full = target if batched else target[1:]
    if len(shape) > len(full) or any(
        n not in (1, m) for n, m in zip(shape[::-1], full[::-1], strict=False)
    ):
        names = "(B, Hq, Lq, Lk)" if batched else "(Hq, Lq, Lk)"
        raise ValueError(f"{name} of shape {shape} does not broadcast to {names} = {full}")
    return jnp.reshape(x, (1,) * (4 - len(shape)) + shape)


def _vector(x: Any, name: str, size: int, axis: str, integer: bool) -> jax.Array:
    """``x`` checked as an int (``integer``) or floating array of shape ``(size,)``,
    ``axis`` naming that size (``"B"``, ``"Hq"``)."""
    kind, dtype_kind = ("an int", "an integer") if integer else ("a floating", "a floating")
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be {kind} array of shape ({axis},), got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.integer if integer else jnp.floating):
        raise TypeError(f"{name} must have {dtype_kind} dtype, got {x.dtype}")
    if tuple(x.shape) != (size,):
        raise ValueError(f"{name} must have shape ({axis},) = ({size},), got {tuple(x.shape)}")
    return x


def _lengths(x: Any, name: str, batch: int) -> jax.Array | None:
    if x is None:
        return None
    return jnp.asarray(_vector(x, name, batch, "B", integer=True), jnp.int32)


def _soft_cap(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.generic)):
        raise TypeError(f"logits_soft_cap must be a positive float or None, got {value!r}")
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"logits_soft_cap must be a positive finite float, got {value}")
    return value


def _sinks(x: Any, q_heads: int) -> jax.Array | None:
    return None if x is None else _vector(x, "sinks", q_heads, "Hq", integer=False)


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
    block_mask: Any,
    q_offset: Any,
    bias: Any = None,
    mask: Any = None,
    query_seq_lengths: Any = None,
    key_value_seq_lengths: Any = None,
    logits_soft_cap: Any = None,
    score_mod: Any = None,
    sinks: Any = None,
    dropout: Dropout | None = None,
) -> CheckedArguments:
    """The arguments checked and normalised; ``dropout`` comes checked
    (``_dropout.check_dropout``)."""
    q, k, v = _as_array(Q, "Q"), _as_array(K, "K"), _as_array(V, "V")
    _check_shapes(q, k, v)
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
    if mask_fn is not None and not callable(mask_fn):
        raise TypeError(f"mask_fn must be callable or None, got {type(mask_fn).__name__}")
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"score_mod must be callable or None, got {type(score_mod).__name__}")
    checked_scale = normalize_scale(scale)
    blocks = normalize_block_size(block_size)
    window = normalize_window(window_size)
    batch = q.shape[0] if q.ndim == 4 else 1
    offset = normalize_q_offset(q_offset, batch)
    target = (batch, q.shape[-2], q.shape[-3], k.shape[-3])
    if block_mask is not None:
        offset_given = not (isinstance(q_offset, numbers.Integral) and q_offset == 0)
        _check_block_mask(block_mask, q, k, is_causal, mask_fn, window, blocks, offset_given)
    if (query_seq_lengths is not None or key_value_seq_lengths is not None) and q.ndim == 3:
        raise ValueError(
            "query_seq_lengths and key_value_seq_lengths need batched (4-D) inputs, "
            f"got Q of shape {tuple(q.shape)}"
        )
    args = CheckedArguments(
        q=q,
        k=k,
        v=v,
        is_causal=bool(is_causal),
        block_size=blocks,
        window=window,
        scale=None,
        q_offset=offset,
        mask_fn=mask_fn,
        score_mod=score_mod,
        block_mask=block_mask,
        bias=None if bias is None else _broadcastable(bias, "bias", target, False, q.ndim == 4),
        mask=None if mask is None else _broadcastable(mask, "mask", target, True, q.ndim == 4),
        q_lengths=_lengths(query_seq_lengths, "query_seq_lengths", batch),
        kv_lengths=_lengths(key_value_seq_lengths, "key_value_seq_lengths", batch),
        soft_cap=_soft_cap(logits_soft_cap),
        sinks=_sinks(sinks, q.shape[-2]),
        dropout=dropout,
    )
    # Last, once everything is checked: a traced scale becomes part of q.
    folded_q, static_scale = fold_scale(q, checked_scale)
    return replace(args, q=folded_q, scale=static_scale)


def _check_block_mask(
    block_mask: Any,
    q: jax.Array,
    k: jax.Array,
    is_causal: Any,
    mask_fn: Any,
    window: tuple[int | None, int | None],
    blocks: tuple[int, int] | None,
    offset_given: bool,
) -> None:
    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"block_mask must be a BlockMask from create_block_mask, got "
            f"{type(block_mask).__name__}"
        )
    given = [
        name
        for name, value in (
            ("is_causal", bool(is_causal)),
            ("mask_fn", mask_fn is not None),
            ("window_size", window != (None, None)),
            ("q_offset", offset_given),
        )
        if value
    ]
    if given:
        raise ValueError(
            f"block_mask already holds its mask (mask_fn, is_causal, window_size, q_offset); "
            f"do not pass {', '.join(given)} with it: {block_mask!r}"
        )
    if blocks is not None and blocks != tuple(block_mask.block_size):
        raise ValueError(
            f"block_size={blocks} differs from the block mask's {block_mask.block_size}; "
            "leave block_size out when passing block_mask"
        )
    batch = q.shape[0] if q.ndim == 4 else 1
    q_heads, q_len, k_len = q.shape[-2], q.shape[-3], k.shape[-3]
    mask_b, mask_h, mask_q, mask_k = block_mask.shape
    problems = []
    if (mask_q, mask_k) != (q_len, k_len):
        problems.append(
            f"it was built for (q_len, k_len) = {(mask_q, mask_k)}, the inputs "
            f"have {(q_len, k_len)}"
        )
    if mask_b not in (1, batch):
        problems.append(f"it was built for B={mask_b}, the inputs have B={batch}")
    if mask_h not in (1, q_heads):
        problems.append(f"it was built for H={mask_h}, the inputs have Hq={q_heads}")
    program = block_mask.program
    if program is not None and mask_b == 1 and batch > 1 and program.uses_batch:
        problems.append(
            f"its mask_fn depends on b but it was built with B=1; build it with B={batch}"
        )
    if program is not None and mask_h == 1 and q_heads > 1 and program.uses_head:
        problems.append(
            f"its mask_fn depends on h but it was built with H=1; build it with H={q_heads}"
        )
    if problems:
        hint = ""
        if (mask_q, mask_k) == (q.shape[-2], k.shape[-2]) and (mask_q, mask_k) != (q_len, k_len):
            hint = (
                "; the inputs' heads axis has the block mask's lengths: are they in the "
                "other layout? masked_attention_via_map takes (B, L, H, d), "
                "flex.flex_attention PyTorch's (B, H, L, E)"
            )
        raise ValueError("block_mask does not fit the inputs: " + "; ".join(problems) + hint)
