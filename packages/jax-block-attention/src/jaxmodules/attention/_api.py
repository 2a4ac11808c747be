"""The public entry points, dispatch only: check the arguments, pick a backend, plan the
block mask with that backend's block sizes, call it, add the sinks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _dispatch as dispatch
from ._block_mask import BlockMask
from ._checks import CheckedArguments, check_arguments
from ._dropout import check_dropout
from ._registry import check_implementation
from ._scores import with_sinks


def masked_attention_via_map(
    Q: Any,
    K: Any,
    V: Any,
    *,
    is_causal: bool = False,
    mask_fn: Callable[..., Any] | None = None,
    block_size: int | tuple[int, int] | None = None,
    window_size: int | tuple[int | None, int | None] | None = None,
    scale: float | jax.Array | None = None,
    q_offset: Any = 0,
    block_mask: BlockMask | None = None,
    bias: Any = None,
    mask: Any = None,
    query_seq_lengths: Any = None,
    key_value_seq_lengths: Any = None,
    logits_soft_cap: float | None = None,
    score_mod: Callable[..., Any] | None = None,
    sinks: Any = None,
    return_lse: bool = False,
    implementation: str | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Any = None,
) -> Any:
    """Softmax attention computed block by block, in memory linear in the sequence length.

    This is the package's one entry point, whichever backend computes the call; its
    name, kept from the original library, describes only the first of them. Each call
    goes to one of four backends (see ``implementation``):

    - ``"xla"``, the block loop: plain JAX (``lax.map`` over query blocks, ``fori_loop``
      over the listed key blocks), on any device, for every keyword;
    - ``"triton"`` (alias ``"pallas"``): fused Pallas Triton kernels over the same
      block mask, one per pass; compiled on a GPU, interpreted (slowly) elsewhere;
    - ``"mosaic_tpu"``: fused Pallas Mosaic TPU kernels over the same block mask, one
      per pass; compiled on a TPU, interpreted (slowly) elsewhere;
    - ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, for the
      masks cuDNN expresses exactly.

    With ``implementation=None`` a GPU tries them in the order cuDNN, Triton, block
    loop, a TPU the Mosaic TPU kernels, then the block loop; any other device uses the
    block loop. The device is the one the program is
    lowered for (``jax.jit(f).lower`` for another device, or ``jax.export(...,
    platforms=[...])``, gets that platform's backend); a traced call holds one branch
    per platform and the lowering keeps one.
    [`explain_dispatch`][jaxmodules.attention.explain_dispatch] says which backend runs
    a call and why the others refuse it; in the program each backend's work sits in
    ``jax.named_scope("jaxmodules.attention/<name>")``. Results agree across backends up
    to floating-point rounding.

    Queries are split into blocks of ``block_size`` positions and processed one block at a
    time; for each query block an online softmax runs over the key blocks that its
    [`BlockMask`][jaxmodules.attention.BlockMask] lists. Key blocks that are fully
    masked are skipped, blocks that are fully visible are computed without evaluating
    any mask, and that holds whether the mask is known at trace time or built on the
    device from traced arrays. The
    backward pass is a custom VJP that recomputes the scores block by block from the
    output and the per-row log-sum-exp, so no ``Lq x Lk`` array exists in either pass.
    It supports first-order reverse mode (``grad``, ``vjp``); differentiating it again
    or in forward mode (``jvp``) raises an error that says so.

    Args:
        Q: Queries, ``(B, Lq, Hq, d)`` or ``(Lq, Hq, d)``.
        K: Keys, ``(B, Lk, Hkv, d)`` or ``(Lk, Hkv, d)``; ``Hq`` must be a multiple of
            ``Hkv`` (grouped-query attention).
        V: Values, ``(B, Lk, Hkv, dv)`` or ``(Lk, Hkv, dv)``.
        is_causal: Key ``k`` is visible from query ``q`` only if ``k <= q`` (positions,
            see ``q_offset``; top-left aligned by default, as in
            ``jax.nn.dot_product_attention``).
        mask_fn: Optional ``mask_fn(b, h, q, k) -> bool`` or ``mask_fn(h, q, k) -> bool``,
            ``True`` where key position ``k`` is visible from query position ``q`` for
            batch row ``b`` and query head ``h``. Written element-wise with ``jnp``
            operations: it is traced on scalar int32 indices and vectorized with
            ``jax.vmap``. It may close over arrays, traced ones included (segment ids,
            lengths). Eager calls with the same function and shapes reuse one compiled
            program.
        block_size: Positions per block, one int for queries and keys or a pair
            ``(query_block, key_block)``. Defaults to a size chosen from the lengths.
            The result does not depend on it beyond floating-point rounding.
        window_size: ``(left, right)``: key ``k`` is visible from query ``q`` only if
            ``q - left <= k <= q + right``. ``None`` on one side leaves that side
            unbounded; a single int ``w`` means ``(w, w)``.
        scale: Factor for the scores ``Q @ K^T``; defaults to ``1 / sqrt(d)``. A Python
            or NumPy number or a floating scalar array, which may be traced: a learnable
            temperature gets the gradient ``jax.nn`` gives it. A traced scale is
            multiplied into ``Q`` (in float32, then rounded to ``Q``'s dtype) before the
            call, so the kernels see a scale of 1.
        q_offset: Position of query row 0 (key ``j`` sits at position ``j``): an int, or
            an int array ``(B,)`` that may be traced. ``Lk - Lq`` aligns the last query
            with the last key (decoding with a KV cache, chunked prefill).
        block_mask: A [`BlockMask`][jaxmodules.attention.BlockMask] from
            [`create_block_mask`][jaxmodules.attention.create_block_mask], reused across
            calls; it holds the whole mask, so ``is_causal``, ``mask_fn``,
            ``window_size``, ``q_offset`` and ``block_size`` are not passed with it.
            (``mask`` and the sequence lengths may be: the blocks are then classified
            again for the combined mask.)
        bias: Added to the scores, broadcastable to ``(B, Hq, Lq, Lk)`` (``(Hq, Lq,
            Lk)`` for 3-D inputs); it gets a gradient.
        mask: Boolean array broadcastable to ``(B, Hq, Lq, Lk)``, ``True`` = visible,
            indexed by query row. Blocks it leaves empty are skipped.
        query_seq_lengths: Int array ``(B,)``: query rows at or past it are masked.
        key_value_seq_lengths: Int array ``(B,)``: keys at or past it are masked.
        logits_soft_cap: Scores become ``cap * tanh(s / cap)`` (Gemma 2), after the bias.
        score_mod: ``score_mod(score, b, h, q, k) -> score``, element-wise on float32
            scores after the soft-cap (ALiBi, relative-position biases). Floating arrays
            it closes over get gradients, accumulated block by block.
        sinks: Float array ``(Hq,)``: per-head sink logits; ``exp(sinks[h])`` joins every
            row's softmax denominator as a key with value 0 (gpt-oss). Gets a gradient.
        return_lse: Also return the log-sum-exp of each row's scores, ``(B, Hq, Lq)``
            float32 (``-inf`` for a row with no visible key and no sink), differentiable.
            With dropout it is still the log-sum-exp of all visible scores: dropout acts
            on the normalised weights, after the softmax statistics.
        implementation: The backend. ``"xla"``: the block loop in plain JAX, any device,
            every keyword. ``"triton"`` (or its alias ``"pallas"``): one fused Pallas
            Triton kernel per pass over the same block mask (a GPU kernel; on other
            devices it runs in Pallas interpret mode, slowly); its blocks must be powers
            of two ``>= 16``, chosen so when ``block_size`` is not given (a
            ``block_mask`` with other blocks is re-planned for it: the same mask on
            other blocks). ``"mosaic_tpu"``: one fused Pallas Mosaic TPU kernel per
            pass (a TPU kernel; elsewhere in Pallas interpret mode, slowly); query
            blocks multiples of 8 and key blocks of 128; it refuses ``score_mod`` arrays
            that need gradients, and closed-over arrays read at an index that varies
            with both the query and the key position. ``"cudnn"``:
            ``jax.nn.dot_product_attention(implementation="cudnn")`` on a GPU, only for
            masks cuDNN expresses exactly (causal, causal with a left window, sequence
            lengths, ``bias``; float16/bfloat16; head dimension a multiple of 8, at most
            128; no ``mask_fn``, ``score_mod``, soft-cap, sinks, ``q_offset``, ``mask``,
            ``block_mask``, ``return_lse`` or dropout; traced only on a host with an
            NVIDIA GPU). ``None``: on a GPU cuDNN where it applies, else Triton where it
            applies, else the block loop; ``"xla"`` elsewhere. A named backend that
            refuses a call raises a ``ValueError`` that says why.
        dropout_rate: Attention dropout: each weight (after the softmax) is dropped with
            this probability and kept weights are divided by ``1 - rate`` (inverted
            dropout, as in flax and PyTorch). A Python float in ``[0, 1)``; 0 (the
            default) is no dropout. The decision for query row ``i`` and key ``j`` of
            batch row ``b``, query head ``h`` is a hash of ``(dropout_rng, b, h, i +
            q_offset, j)``: the same in every backend and for every block size,
            regenerated in the backward pass rather than stored, so memory stays linear.
            [`dropout_keep_mask`][jaxmodules.attention.dropout_keep_mask] materialises
            it.
        dropout_rng: The PRNG key of the dropout (``jax.random.key`` or
            ``jax.random.PRNGKey``); needed when ``dropout_rate > 0``. The same key gives
            the same decisions; split a fresh one per step.

    Returns:
        The attention output ``(B, Lq, Hq, dv)`` (or ``(Lq, Hq, dv)``) in ``Q``'s dtype;
        with ``return_lse=True`` the pair ``(out, lse)``. A query row with no visible
        key gets zeros (and zero gradients).

    Raises:
        ValueError: An unknown ``implementation``, a call the chosen implementation
            cannot compute (the message says why), wrong ranks or mismatched shapes, no
            heads, ``Hq`` not a multiple of ``Hkv``, non-positive block or negative
            window sizes, a ``mask_fn`` that is not element-wise, a ``block_mask`` that
            does not fit or comes with mask arguments, a ``dropout_rate`` outside
            ``[0, 1)`` or a positive one without ``dropout_rng``.
        TypeError: Non-floating inputs, non-integer sizes or offsets, a ``mask_fn`` that
            takes neither 3 nor 4 arguments or that does not return booleans, a
            ``scale`` that is not a real number or a floating scalar array, a
            ``dropout_rng`` that is not a PRNG key.

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
    implementation = _check_implementation(implementation)
    dropout = check_dropout(dropout_rate, dropout_rng)
    args = check_arguments(
        Q,
        K,
        V,
        is_causal=is_causal,
        mask_fn=mask_fn,
        block_size=block_size,
        window_size=window_size,
        scale=scale,
        block_mask=block_mask,
        q_offset=q_offset,
        bias=bias,
        mask=mask,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        logits_soft_cap=logits_soft_cap,
        score_mod=score_mod,
        sinks=sinks,
        dropout=dropout,
    )
    return checked_attention(args, implementation, return_lse)


def checked_attention(args: CheckedArguments, implementation: str | None, return_lse: Any) -> Any:
    """``masked_attention_via_map`` once its arguments are checked (also the flax
    adapter's way in, which builds its own dropout request)."""
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    batched = args.q.ndim == 4
    if not batched:
        args = replace(args, q=args.q[None], k=args.k[None], v=args.v[None])
    out, lse = dispatch.attend(args, implementation, bool(return_lse))
    if args.sinks is not None:
        out, lse = with_sinks(out, lse, args.sinks)
    if not batched:
        out, lse = out[0], None if lse is None else lse[0]
    return (out, lse) if return_lse else out


# The flax adapter and the ring check implementation names here.
_check_implementation = check_implementation


def dot_product_attention(
    query: Any,
    key: Any,
    value: Any,
    bias: Any = None,
    mask: Any = None,
    *,
    scale: float | jax.Array | None = None,
    is_causal: bool = False,
    query_seq_lengths: Any = None,
    key_value_seq_lengths: Any = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None,
    return_residual: bool = False,
) -> Any:
    """``jax.nn.dot_product_attention``'s signature and meaning, in linear memory.

    Swap ``jax.nn.dot_product_attention`` for this function and the same call runs block
    by block: memory linear in the sequence length, blocks that ``is_causal``,
    ``local_window_size``, the sequence lengths or ``mask`` leave empty skipped. The one
    difference in results: a query row with no visible key gives 0 here (and zero
    gradients), where ``jax.nn`` gives the mean of the values.

    Args:
        query: ``(B, T, N, H)`` or ``(T, N, H)``.
        key: ``(B, S, K, H)`` or ``(S, K, H)``; ``N`` a multiple of ``K``.
        value: ``(B, S, K, H)`` or ``(S, K, H)`` (its head size may differ).
        bias: Added to the scores, broadcastable to ``(B, N, T, S)``.
        mask: Boolean, broadcastable to ``(B, N, T, S)``; ``True`` = visible.
        scale: Score scale; ``1 / sqrt(H)`` by default. A number or a floating scalar
            array, traced ones included (they get their gradient).
        is_causal: Key ``s`` visible from query ``t`` only if ``s <= t``.
        query_seq_lengths: ``(B,)`` int: query rows at or past it are masked.
        key_value_seq_lengths: ``(B,)`` int: keys at or past it are masked.
        local_window_size: ``(left, right)`` or ``w`` for ``(w, w)``: key ``s`` visible
            from ``t`` only if ``t - left <= s <= t + right``.
        implementation: ``None``, ``"xla"``, ``"triton"`` (alias ``"pallas"``),
            ``"mosaic_tpu"`` or ``"cudnn"``, as in
            ``masked_attention_via_map``.
        return_residual: Also return the log-sum-exp of each row's scores, ``(B, T, N)``
            (``(T, N)`` for 3-D inputs), as ``jax.nn`` does.

    Returns:
        The attention output, shaped like ``query`` with ``value``'s head size, in
        ``query``'s dtype; with ``return_residual=True`` the pair ``(out, lse)``.

    Raises:
        ValueError: Shapes that do not fit (see ``masked_attention_via_map``), an
            unknown ``implementation``.
        TypeError: Non-floating inputs, a non-boolean ``mask``, a ``scale`` that is not
            a real number or a floating scalar array.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxmodules.attention import dot_product_attention
        >>> kq, kk, kv, kb = jax.random.split(jax.random.PRNGKey(0), 4)
        >>> q = jax.random.normal(kq, (2, 64, 4, 16))
        >>> k = jax.random.normal(kk, (2, 64, 2, 16))
        >>> v = jax.random.normal(kv, (2, 64, 2, 16))
        >>> bias = jax.random.normal(kb, (1, 4, 64, 64))
        >>> ours = dot_product_attention(q, k, v, bias, is_causal=True)
        >>> theirs = jax.nn.dot_product_attention(q, k, v, bias, is_causal=True)
        >>> bool(jnp.allclose(ours, theirs, atol=1e-5))
        True
    """
    if return_residual and implementation == "cudnn":
        raise ValueError(
            'implementation="cudnn" cannot compute this call: jax.nn returns cuDNN\'s '
            "log-sum-exp rounded to the input dtype, not float32 (return_residual)"
        )
    result = masked_attention_via_map(
        query,
        key,
        value,
        bias=bias,
        mask=mask,
        scale=scale,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        window_size=local_window_size,
        return_lse=bool(return_residual),
        implementation=implementation,
    )
    if not return_residual:
        return result
    out, lse = result
    return out, jnp.swapaxes(lse, -1, -2)
