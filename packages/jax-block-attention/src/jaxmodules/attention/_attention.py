"""The public entry point: argument checks, layout, padding, block schedule, dispatch."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._blocks import choose_block_sizes
from ._checks import check_arguments, trace_mask
from ._kernel import block_attention
from ._masks import EMPTY, PARTIAL, schedule, static_mask_classes, structural_classes
from ._plan import Plan


def masked_attention_via_map(
    Q: Any,
    K: Any,
    V: Any,
    *,
    is_causal: bool = False,
    mask_fn: Callable[..., Any] | None = None,
    block_size: int | tuple[int, int] | None = None,
    window_size: int | tuple[int | None, int | None] | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Softmax attention computed block by block, in memory linear in the sequence length.

    Queries are split into blocks of ``block_size`` positions and processed one block at a
    time with ``jax.lax.map``; for each query block an online softmax runs over the key
    blocks that the mask leaves non-empty. Key blocks that are fully masked are skipped;
    blocks that are fully visible are computed without evaluating any mask. The backward
    pass is a custom VJP that recomputes the scores block by block from the output and
    the per-row log-sum-exp, so no ``Lq x Lk`` array exists in either pass.

    Args:
        Q: Queries, ``(B, Lq, Hq, d)`` or ``(Lq, Hq, d)``.
        K: Keys, ``(B, Lk, Hkv, d)`` or ``(Lk, Hkv, d)``; ``Hq`` must be a multiple of
            ``Hkv`` (grouped-query attention).
        V: Values, ``(B, Lk, Hkv, dv)`` or ``(Lk, Hkv, dv)``.
        is_causal: Key ``k`` is visible from query ``q`` only if ``k <= q`` (positions
            counted from the start of both sequences, as in
            ``jax.nn.dot_product_attention``).
        mask_fn: Optional ``mask_fn(b, h, q, k) -> bool`` or ``mask_fn(h, q, k) -> bool``.
            It is called with integer index arrays that broadcast against each other
            (``b`` of shape ``(B, 1, 1, 1)``, ``h`` (query head) ``(1, Hq, 1, 1)``, ``q``
            ``(1, 1, n, 1)``, ``k`` ``(1, 1, 1, m)``, absolute positions) and must return
            a boolean array that broadcasts to ``(B, Hq, n, m)``: ``True`` where the key
            is visible. It may close over traced arrays (segment ids, lengths).
        block_size: Positions per block, one int for queries and keys or a pair
            ``(query_block, key_block)``. Defaults to a size chosen from the lengths.
            The result does not depend on it beyond floating-point rounding.
        window_size: ``(left, right)``: key ``k`` is visible from query ``q`` only if
            ``q - left <= k <= q + right``. ``None`` on one side leaves that side
            unbounded; a single int ``w`` means ``(w, w)``.
        scale: Factor for the scores ``Q @ K^T``; defaults to ``1 / sqrt(d)``.

    Returns:
        The attention output ``(B, Lq, Hq, dv)`` (or ``(Lq, Hq, dv)``) in ``Q``'s dtype.
        A query row with no visible key gets zeros (and zero gradients).

    Raises:
        ValueError: Wrong ranks or mismatched shapes, ``Hq`` not a multiple of ``Hkv``,
            non-positive block or negative window sizes, a ``mask_fn`` whose result does
            not broadcast to the block.
        TypeError: Non-floating inputs, non-integer sizes, a ``mask_fn`` that takes
            neither 3 nor 4 arguments or that does not return booleans.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxmodules.attention import masked_attention_via_map
        >>> kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
        >>> Q = jax.random.normal(kq, (2, 100, 8, 32))
        >>> K = jax.random.normal(kk, (2, 100, 2, 32))
        >>> V = jax.random.normal(kv, (2, 100, 2, 32))
        >>> out = masked_attention_via_map(Q, K, V, is_causal=True, block_size=32)
        >>> out.shape
        (2, 100, 8, 32)
        >>> dense = jax.nn.dot_product_attention(Q, K, V, is_causal=True)
        >>> bool(jnp.allclose(out, dense, atol=1e-5))
        True
    """
    args = check_arguments(
        Q,
        K,
        V,
        is_causal=is_causal,
        mask_fn=mask_fn,
        block_size=block_size,
        window_size=window_size,
        scale=scale,
    )
    q, k, v = args.q, args.k, args.v
    batched = q.ndim == 4
    if not batched:
        q, k, v = q[None], k[None], v[None]
    bsz, q_len, q_heads, d = q.shape
    _, k_len, kv_heads, dv = v.shape
    out_dtype = q.dtype
    if q_len == 0 or k_len == 0:
        out = jnp.zeros((bsz, q_len, q_heads, dv), out_dtype)
        return out if batched else out[0]

    q_block, k_block = args.block_size or choose_block_sizes(
        q_len=q_len,
        k_len=k_len,
        batch=bsz,
        q_heads=q_heads,
        head_dim=d,
        value_dim=dv,
        is_causal=bool(is_causal),
        window=args.window,
    )
    q_block, k_block = min(q_block, q_len), min(k_block, k_len)
    scale_value = args.scale if args.scale is not None else 1.0 / math.sqrt(d)
    mask4 = args.mask_fn

    classes = structural_classes(q_len, k_len, q_block, k_block, is_causal, args.window)
    mask_jaxpr = None
    mask_on_device = False
    if mask4 is not None:
        mask_jaxpr = trace_mask(mask4, bsz, q_heads, q_block, k_block)
        # A mask that closes over traced values (segment ids passed to a jitted function)
        # is only known on device; anything else is evaluated now, block by block.
        mask_on_device = any(isinstance(c, jax.core.Tracer) for c in mask_jaxpr.consts)
        if mask_on_device:
            classes = np.where(classes != EMPTY, PARTIAL, EMPTY)
        else:
            classes = static_mask_classes(
                mask4,
                classes,
                batch=bsz,
                heads=q_heads,
                q_len=q_len,
                k_len=k_len,
                q_block=q_block,
                k_block=k_block,
                is_causal=bool(is_causal),
                window=args.window,
            )
    full, partial_blocks = schedule(classes)
    plan = Plan(
        batch=bsz,
        kv_heads=kv_heads,
        groups=q_heads // kv_heads,
        q_len=q_len,
        k_len=k_len,
        q_block=q_block,
        k_block=k_block,
        scale=float(scale_value),
        is_causal=bool(is_causal),
        window=args.window,
        full=full,
        partial=partial_blocks,
        mask_on_device=mask_on_device,
    )

    kernel_mask = None
    consts: tuple = ()
    if mask_jaxpr is not None and any(partial_blocks):
        kernel_mask, consts = _closure_converted(mask_jaxpr)
    out = _attend(plan, kernel_mask, q, k, v, consts)
    return out if batched else out[0]


@partial(jax.jit, static_argnums=(0, 1))
def _attend(
    plan: Plan,
    kernel_mask: Callable[..., Any] | None,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    consts: tuple,
) -> jax.Array:
    """Kernel layout and padding around ``block_attention``; jitted so that eager calls
    with the same shapes and masks reuse one compiled program."""
    bsz, q_len, q_heads, d = q.shape
    kv_heads, dv, groups = plan.kv_heads, v.shape[-1], plan.groups
    q_pad = plan.n_q_blocks * plan.q_block - q_len
    k_pad = plan.n_k_blocks * plan.k_block - plan.k_len
    # (B, Lq, Hkv * G, d) -> (B, Hkv, Lq * G, d): the rows of one query block are
    # contiguous and the G query heads that share a key/value head share its matmul.
    qk = q.reshape(bsz, q_len, kv_heads, groups, d).transpose(0, 2, 1, 3, 4)
    qk = jnp.pad(qk, ((0, 0), (0, 0), (0, q_pad), (0, 0), (0, 0)))
    qk = qk.reshape(bsz, kv_heads, (q_len + q_pad) * groups, d)
    kk = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, k_pad), (0, 0)))
    vk = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, k_pad), (0, 0)))
    out = block_attention(plan, kernel_mask, qk, kk, vk, consts)
    out = out.reshape(bsz, kv_heads, q_len + q_pad, groups, dv)[:, :, :q_len]
    return out.transpose(0, 2, 1, 3, 4).reshape(bsz, q_len, q_heads, dv)


def _closure_converted(mask_jaxpr: Any) -> tuple[Callable[..., Any], tuple]:
    """The traced mask as a function of the index arrays and of everything it closes
    over, passed explicitly.

    ``jax.custom_vjp`` traces its backward rule later, possibly under other transforms
    (``vmap``, ``grad``); a ``mask_fn`` that closes over traced values (segment ids of a
    vmapped batch, say) would leak those tracers there.
    """

    def converted(b: Any, h: Any, q: Any, k: Any, *consts: Any) -> Any:
        return jax.core.eval_jaxpr(mask_jaxpr.jaxpr, list(consts), b, h, q, k)[0]

    return converted, tuple(mask_jaxpr.consts)
