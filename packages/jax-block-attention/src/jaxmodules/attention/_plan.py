"""Planning: ``create_block_mask`` (a block mask built ahead of the calls, with the XLA
backend's default block sizes) and ``plan_block_mask`` (the block mask of one call, with
the chosen backend's)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from ._block_mask import BlockMask, make_block_mask
from ._checks import CheckedArguments
from ._elementwise import ElementwiseProgram, has_tracers, trace_mask_fn
from ._normalize import normalize_block_size, normalize_q_offset, normalize_window, positive_int
from ._xla import block_sizes as xla_block_sizes

# A backend's default block sizes: keywords q_len, k_len, batch, q_heads, head_dim,
# value_dim, is_causal, window; returns (query block, key block).
BlockSizes = Callable[..., tuple[int, int]]


def create_block_mask(
    mask_fn: Any,
    B: int | None,
    H: int | None,
    q_len: int,
    k_len: int,
    *,
    is_causal: bool = False,
    window_size: int | tuple[int | None, int | None] | None = None,
    q_offset: Any = 0,
    block_size: int | tuple[int, int] | None = None,
) -> BlockMask:
    """Classify every (query block, key block) pair once, for reuse across calls.

    The JAX counterpart of PyTorch FlexAttention's ``create_block_mask``: the result
    says, per batch row, head and query block, which key blocks hold a visible pair
    (all others are skipped) and which of those are fully visible (computed without
    evaluating any mask). The causal, window and offset part (the band) needs no
    arrays: each block's range of blocks is arithmetic. ``mask_fn`` is evaluated on the
    device in chunks of bounded memory over the block pairs the band leaves, and kept
    as four integers per block row (first and last block, first and last full block);
    per-row lists only for masks whose rows have holes. ``bm.nbytes`` says what the
    plan holds, ``bm.sparsity()`` what it skips. Inside ``jax.jit`` it may close over
    traced arrays.

    Args:
        mask_fn: ``mask_fn(b, h, q, k) -> bool`` (or ``mask_fn(h, q, k)``), ``True`` =
            visible, written element-wise with ``jnp`` operations (it is traced on
            scalar int32 indices and vectorized with ``jax.vmap``); ``q`` is a query
            position (row index plus ``q_offset``), ``k`` a key position. ``None``: only
            ``is_causal`` / ``window_size``.
        B: Batch size, or 1 (or ``None``, as in PyTorch) when the mask does not depend
            on ``b``.
        H: Number of query heads, or 1 (or ``None``) when the mask does not depend on
            ``h``.
        q_len: Query length ``Lq``.
        k_len: Key length ``Lk``.
        is_causal: Key ``k`` visible from query position ``q`` only if ``k <= q``.
        window_size: ``(left, right)``: visible only if ``q - left <= k <= q + right``;
            ``None`` on a side is unbounded; an int ``w`` means ``(w, w)``.
        q_offset: Position of query row 0: an int, or an int array ``(B,)`` (may be
            traced). ``k_len - q_len`` aligns the last query with the last key.
        block_size: Positions per block, an int or ``(query_block, key_block)``;
            defaults to the size the attention would pick for these lengths.

    Returns:
        A [`BlockMask`][jaxmodules.attention.BlockMask].

    Raises:
        ValueError: Non-positive sizes, a ``q_offset`` of the wrong length.
        TypeError: Non-integer sizes or offsets, a ``mask_fn`` that is not element-wise
            boolean ``jnp`` code.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxmodules.attention import create_block_mask, masked_attention_via_map
        >>> ids = jnp.repeat(jnp.arange(4), 64)[None]  # four documents of 64 tokens
        >>> def same_document(b, h, q, k):
        ...     return ids[b, q] == ids[b, k]
        >>> bm = create_block_mask(same_document, 1, 1, 256, 256, is_causal=True, block_size=32)
        >>> round(bm.sparsity(), 3)
        0.812
        >>> q = k = v = jax.random.normal(jax.random.PRNGKey(0), (1, 256, 2, 16))
        >>> out = masked_attention_via_map(q, k, v, block_mask=bm)
        >>> dense = jax.nn.dot_product_attention(q, k, v, mask=bm.to_dense())
        >>> bool(jnp.allclose(out, dense, atol=1e-5))
        True
    """
    # None broadcasts, as in PyTorch (SPEC 4.3).
    batch = 1 if B is None else positive_int(B, "B")
    heads = 1 if H is None else positive_int(H, "H")
    q_len = positive_int(q_len, "q_len")
    k_len = positive_int(k_len, "k_len")
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
    window = normalize_window(window_size)
    offset = normalize_q_offset(q_offset, batch)
    program, consts = (None, ()) if mask_fn is None else trace_mask_fn(mask_fn)
    shape = (batch, heads, q_len, k_len)
    given = normalize_block_size(block_size)
    blocks = _choose_blocks(given, xla_block_sizes, shape, (64, 64), bool(is_causal), window)
    return make_block_mask(program, consts, shape, blocks, bool(is_causal), window, offset)


def with_mask_arrays(
    program: ElementwiseProgram | None,
    consts: tuple,
    *,
    mask: Any,
    q_lengths: Any,
    kv_lengths: Any,
    q_offset: Any,
) -> tuple[ElementwiseProgram | None, tuple]:
    """The mask program extended by a boolean ``mask`` array ``(B|1, H|1, Lq|1, Lk|1)``
    (indexed by query row, not position) and sequence lengths ``(B,)``, so that one
    program drives both the block classification and the element-wise mask."""
    if mask is None and q_lengths is None and kv_lengths is None:
        return program, consts
    offsets = q_offset if has_tracers([q_offset]) else np.asarray(q_offset)
    static_offset = None if has_tracers([q_offset]) or offsets.size > 1 else int(offsets[0])
    offset_array = jnp.asarray(offsets, jnp.int32)
    inner = program

    def combined(b: Any, h: Any, q: Any, k: Any) -> Any:
        visible = jnp.bool_(True)
        if inner is not None:
            visible = inner.evaluate(consts, b, h, q, k)
        if static_offset is not None:
            row = q - static_offset
        else:
            row = q - offset_array[b if offset_array.shape[0] > 1 else 0]
        if mask is not None:
            sizes = mask.shape
            visible = (
                visible
                & mask[
                    b if sizes[0] > 1 else 0,
                    h if sizes[1] > 1 else 0,
                    row if sizes[2] > 1 else 0,
                    k if sizes[3] > 1 else 0,
                ]
            )
        if kv_lengths is not None:
            visible = visible & (k < kv_lengths[b])
        if q_lengths is not None:
            visible = visible & (row < q_lengths[b])
        return visible

    parts = [inner.name] if inner is not None else []
    parts += ["mask"] if mask is not None else []
    parts += ["lengths"] if q_lengths is not None or kv_lengths is not None else []
    combined.__name__ = " & ".join(parts)
    return trace_mask_fn(combined)


def plan_block_mask(
    args: CheckedArguments, block_sizes: BlockSizes, *, head_dim: int, value_dim: int
) -> BlockMask:
    """The block mask of a call with 4-D inputs: the one it gave, combined with a mask
    array and sequence lengths when it gave those too, or one built from its mask
    arguments (``is_causal``, ``window_size``, ``mask_fn``, ``q_offset``, ``mask``,
    lengths) with ``args.block_size`` or else the chosen backend's ``block_sizes``.
    Built masks that close over nothing are reused from a bounded cache."""
    batch, q_len, q_heads, _ = args.q.shape
    shape = (batch, q_heads, q_len, args.k.shape[1])
    extra = args.mask is not None or args.q_lengths is not None or args.kv_lengths is not None
    given = args.block_mask
    if given is not None and not extra:
        return given
    if given is not None:
        program, consts = given.program, given.mask_consts
        blocks, is_causal, window = given.block_size, given.is_causal, given.window
        offset = given.q_offset
    else:
        program, consts = (None, ()) if args.mask_fn is None else trace_mask_fn(args.mask_fn)
        is_causal, window, offset = args.is_causal, args.window, args.q_offset
        dims = (head_dim, value_dim)
        blocks = _choose_blocks(args.block_size, block_sizes, shape, dims, is_causal, window)
    program, consts = with_mask_arrays(
        program,
        consts,
        mask=args.mask,
        q_lengths=args.q_lengths,
        kv_lengths=args.kv_lengths,
        q_offset=offset,
    )
    return make_block_mask(program, consts, shape, blocks, is_causal, window, offset)


def _choose_blocks(
    given: tuple[int, int] | None,
    block_sizes: BlockSizes,
    shape: tuple[int, int, int, int],
    dims: tuple[int, int],
    is_causal: bool,
    window: tuple[int | None, int | None],
) -> tuple[int, int]:
    """The given block sizes clamped to the lengths, or the backend's choice for a
    ``shape = (B, H, Lq, Lk)`` with head dimensions ``dims = (d, dv)``."""
    batch, heads, q_len, k_len = shape
    if given is not None:
        return min(given[0], q_len), min(given[1], k_len)
    return block_sizes(
        q_len=q_len,
        k_len=k_len,
        batch=batch,
        q_heads=heads,
        head_dim=dims[0],
        value_dim=dims[1],
        is_causal=is_causal,
        window=window,
    )
