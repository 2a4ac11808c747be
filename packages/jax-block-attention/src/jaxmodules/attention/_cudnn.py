"""When and how a call goes to ``jax.nn.dot_product_attention(implementation="cudnn")``.

cuDNN's fused kernel takes a fixed menu of masks: causal (top-left), causal with a left
window, padding by sequence lengths, and an additive bias. A call is handed to it only
when its mask is exactly one of those; ``cudnn_problem`` says why not otherwise.
"""

from __future__ import annotations

import functools
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._checks import CheckedArguments
from ._elementwise import has_tracers
from ._hidden import any_non_finite, finite

_CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)
_MAX_HEAD_DIM = 128


@functools.cache
def has_cudnn() -> bool:
    """Whether this host has an NVIDIA GPU backend: ``jax.nn`` checks cuDNN's version
    when it traces its cuDNN call, so the call can be traced only where one is."""
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:
        return False


def _zero_offset(q_offset: Any) -> bool:
    """Whether a normalised ``q_offset`` (NumPy when known now) is known to be 0."""
    return not has_tracers([q_offset]) and not np.asarray(q_offset).any()


def cudnn_window(
    is_causal: bool, window: tuple[int | None, int | None]
) -> tuple[bool, tuple[int, int] | None] | str:
    """``(is_causal, local_window_size)`` for ``jax.nn``, or why cuDNN cannot take the band
    (``window`` as normalised: ``None`` or non-negative sides).

        cuDNN takes a left window only together with the causal mask. A non-causal ``(L, 0)``
        window is the same band as causal with ``(L, 0)``, so it is passed that way: jax's
        own non-causal ``(L, 0)`` path lets future keys through (jax PR #39576).
    """
    left, right = window
    if not is_causal and right == 0:
        is_causal = True
    elif not is_causal and (left is not None or right is not None):
        return (
            f"window_size={window} without is_causal: cuDNN takes only a left window on top "
            "of the causal mask"
        )
    if left is None:
        return is_causal, None
    return is_causal, (int(left), 0)


def cudnn_problem(args: CheckedArguments, *, return_lse: bool, platform: str) -> str | None:
    """Why ``jax.nn``'s cuDNN path cannot compute this call exactly when lowered for
    ``platform``, or ``None``."""
    if args.dropout is not None:
        # jax.nn.dot_product_attention takes no dropout, and cuDNN's own would draw other
        # decisions than the hash every other backend shares.
        return "jax.nn's cuDNN attention has no dropout (dropout_rate)"
    given = [
        name
        for name, value in (
            ("mask_fn", args.mask_fn),
            ("score_mod", args.score_mod),
            ("logits_soft_cap", args.soft_cap),
            ("sinks", args.sinks),
            ("block_mask", args.block_mask),
        )
        if value is not None
    ]
    if given:
        return f"cuDNN has no equivalent of {', '.join(given)}"
    if args.mask is not None:
        return (
            "a boolean mask array can leave query rows with no visible key, which give 0 "
            "here and are not defined by cuDNN; use sequence lengths or is_causal"
        )
    if not _zero_offset(args.q_offset):
        return "cuDNN aligns the causal mask top-left only (q_offset must be 0)"
    if return_lse:
        return (
            "jax.nn returns cuDNN's log-sum-exp rounded to the input dtype, not float32 "
            "(return_lse)"
        )
    band = cudnn_window(args.is_causal, args.window)
    if isinstance(band, str):
        return band
    q, k, v = args.q, args.k, args.v
    dtype = jnp.result_type(q)
    if dtype not in _CUDNN_DTYPES or any(jnp.result_type(x) != dtype for x in (k, v)):
        return f"cuDNN needs float16 or bfloat16 inputs of one dtype, got {dtype}"
    d, dv = q.shape[-1], v.shape[-1]
    if d != dv or d % 8 or d > _MAX_HEAD_DIM:
        return (
            f"cuDNN needs equal query and value head dimensions, a multiple of 8 and at most "
            f"{_MAX_HEAD_DIM}, got {d} and {dv}"
        )
    if platform != "cuda":
        return f"cuDNN needs a GPU (NVIDIA), and the call is lowered for {platform!r}"
    if not has_cudnn():
        return (
            "jax.nn's cuDNN call can be traced only on a host with an NVIDIA GPU (it checks "
            "cuDNN's version when traced), and this one has none"
        )
    return None


def refusal(call: Any, platform: str) -> str | None:
    """Why ``jax.nn``'s cuDNN path cannot compute a ``_call.Call`` on ``platform``."""
    return cudnn_problem(call.args, return_lse=call.needs_lse, platform=platform)


def run(call: Any, platform: str) -> tuple[jax.Array, None]:
    """The output of a ``_call.Call`` by ``jax.nn``'s cuDNN path (no lse: a call that
    needs one is refused)."""
    args = call.args
    out = cudnn_attention(
        args.q,
        args.k,
        args.v,
        is_causal=args.is_causal,
        window=args.window,
        scale=args.scale,
        bias=args.bias,
        query_seq_lengths=args.q_lengths,
        key_value_seq_lengths=args.kv_lengths,
    )
    return out, None


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    is_causal: bool,
    window: tuple[int | None, int | None],
    scale: float | None,
    bias: Any,
    query_seq_lengths: Any,
    key_value_seq_lengths: Any,
    implementation: Literal["xla", "cudnn"] = "cudnn",
) -> jax.Array:
    """The call on ``jax.nn``'s cuDNN path (``cudnn_problem`` must have said ``None``).

    cuDNN's tiles multiply hidden keys' values by a zero weight, as every fused kernel
    does, so a NaN or inf there would reach visible rows (SPEC 4.10). Keys past
    ``key_value_seq_lengths`` are zeroed first (a select per key); under the causal
    band, the call sees non-finite ``K`` and ``V`` entries as 0 and the rows whose band
    holds one get it back from counts over the keys (``_seen_non_finite``), only when
    there is one. ``implementation`` is ``jax.nn``'s (``"xla"`` to test off a GPU)."""
    band = cudnn_window(is_causal, window)
    assert not isinstance(band, str)
    causal, local_window = band
    if key_value_seq_lengths is not None:
        lengths = jnp.asarray(key_value_seq_lengths)[:, None, None, None]
        present = jnp.arange(k.shape[1])[None, :, None, None] < lengths
        k = jnp.where(present, k, jnp.zeros((), k.dtype))
        v = jnp.where(present, v, jnp.zeros((), v.dtype))

    def attend(k: jax.Array, v: jax.Array) -> jax.Array:
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            bias,
            None,
            scale=scale,
            is_causal=causal,
            query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths,
            local_window_size=local_window,
            implementation=implementation,
        )

    if not causal:
        return attend(k, v)  # every key visible but those past the lengths, now zero
    left = None if local_window is None else local_window[0]
    out = attend(finite(k), finite(v))
    bad = any_non_finite(k) | any_non_finite(v)
    fixed = partial(_seen_non_finite, k=k, v=v, left=left, q_lengths=query_seq_lengths)
    return lax.cond(bad, fixed, lambda o: o, out)


def _seen_non_finite(
    out: jax.Array, *, k: jax.Array, v: jax.Array, left: int | None, q_lengths: Any
) -> jax.Array:
    """``out`` (computed from finite ``K`` and ``V``) with what each causal row sees of
    their non-finite entries: NaN in a column where its band ``[i - left, i]`` holds a
    NaN value or both infinities, ``+-inf`` where it holds one, a NaN row where it holds
    a non-finite key. Counts over key prefixes, so linear in the lengths."""
    q_len, k_len = out.shape[1], k.shape[1]
    rows = jnp.arange(q_len)
    hi = jnp.minimum(rows, k_len - 1) + 1
    lo = jnp.zeros_like(rows) if left is None else jnp.clip(rows - left, 0, k_len)

    def in_band(flags: jax.Array) -> jax.Array:
        """Per query row, how many of the flagged keys (axis 1) its band holds."""
        counts = jnp.cumsum(flags.astype(jnp.int32), axis=1)
        counts = jnp.pad(counts, [(0, 0), (1, 0)] + [(0, 0)] * (counts.ndim - 2))
        return jnp.take(counts, hi, axis=1) - jnp.take(counts, lo, axis=1)

    groups = out.shape[2] // v.shape[2]

    def per_query_head(x: jax.Array) -> jax.Array:
        return jnp.repeat(x, groups, axis=2) if groups > 1 else x

    nan = per_query_head(in_band(jnp.isnan(v)) > 0)
    up = per_query_head(in_band(v == jnp.inf) > 0)
    down = per_query_head(in_band(v == -jnp.inf) > 0)
    bad_key = per_query_head(in_band(~jnp.isfinite(k).all(axis=-1)) > 0)[..., None]
    if q_lengths is not None:  # rows past a query length see nothing
        real = (rows[None, :] < jnp.asarray(q_lengths)[:, None])[:, :, None, None]
        nan, up, down, bad_key = (x & real for x in (nan, up, down, bad_key))
    seen = jnp.where(up, jnp.inf, 0.0) + jnp.where(down, -jnp.inf, 0.0)
    result = jnp.where(up | down, seen, out.astype(jnp.float32))
    return jnp.where(nan | bad_key, jnp.nan, result).astype(out.dtype)
