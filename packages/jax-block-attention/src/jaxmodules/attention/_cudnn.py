"""When and how a call goes to ``jax.nn.dot_product_attention(implementation="cudnn")``.

cuDNN's fused kernel takes a fixed menu of masks: causal (top-left), causal with a left
window, padding by sequence lengths, and an additive bias. A call is handed to it only
when its mask is exactly one of those; ``cudnn_problem`` says why not otherwise.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import CheckedArguments
from ._elementwise import has_tracers

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
) -> jax.Array:
    """The call on ``jax.nn``'s cuDNN path (``cudnn_problem`` must have said ``None``)."""
    band = cudnn_window(is_causal, window)
    assert not isinstance(band, str)
    causal, local_window = band
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
        implementation="cudnn",
    )
