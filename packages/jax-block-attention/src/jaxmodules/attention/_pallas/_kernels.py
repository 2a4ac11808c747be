"""Pallas backend, the kernel bodies: forward, dQ and dK/dV, one program per grid cell."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .._band import kv_range, q_range
from .._hidden import finite
from .._scores import tile_score_gradients, tile_scores
from ._tile_math import (
    LOG2E,
    TileConfig,
    _matmul,
    _matmul_t,
    add_read_gradient,
    dropout_scale,
    kept,
    key_positions,
    query_positions,
    softmax_finish,
    softmax_step,
    tile_gradient,
    tile_keep,
    tile_score_mod,
    tile_visible,
    walk_tiles,
)
from ._tile_program import ArrayRead

Array = Any  # jax.Array, or a Pallas ref inside a kernel
_F32 = jnp.float32


# ------------------------------------------------------------------------ kernels


def _mask_index(config: TileConfig, b: Array, h: Array) -> tuple[Array, Array]:
    """The (Bm, Hm) row of the block-mask lists for batch row ``b``, query head ``h``."""
    mb = b if config.mask_batch > 1 else 0
    mh = h if config.mask_heads > 1 else 0
    return mb, mh


_WALK_ARRAYS = {"band": 0, "ranges": 1, "lists": 4}


def _split_refs(config: TileConfig, refs: Sequence[Any]) -> tuple:
    """The refs of a kernel: the block mask's schedule (``BlockMask.schedule``, then
    ``q_offset``), mask_fn arrays, score_mod arrays, the bias (or ``None``), then the
    pass's own inputs and outputs."""
    n_mask, n_score = len(config.const_dtypes), len(config.score_dtypes)
    n = _WALK_ARRAYS[config.walk] + 1
    lists = refs[:n]
    mask_refs = refs[n : n + n_mask]
    score_refs = refs[n + n_mask : n + n_mask + n_score]
    rest = refs[n + n_mask + n_score :]
    bias_ref = None
    if config.scores.bias is not None:
        bias_ref, rest = rest[0], rest[1:]
    return lists, mask_refs, score_refs, bias_ref, rest


def _seeds_ref(config: TileConfig, rest: Sequence[Any]) -> tuple[Any, Sequence[Any]]:
    """Dropout's ``(B, Hq)`` seeds, the first of a pass's inputs with dropout, or
    ``None``; and the remaining refs."""
    if config.scores.dropout_rate == 0.0:
        return None, rest
    return rest[0], rest[1:]


def _bias_tile(
    config: TileConfig, bias_ref: Any, head: Any, rows: tuple[Any, int], cols: tuple[Any, int]
) -> Array:
    """The bias over query rows and key columns given as ``(start, size)``: a ``(rows |
    1, cols | 1)`` tile, one row or column where the bias broadcasts along them."""
    assert config.scores.bias is not None
    _, _, along_q, along_k = config.scores.bias
    row_slice = pl.ds(*rows) if along_q else pl.ds(0, 1)
    col_slice = pl.ds(*cols) if along_k else pl.ds(0, 1)
    if head is None:
        return bias_ref[row_slice, col_slice]
    return bias_ref[head, row_slice, col_slice]


def _walk_lists(
    config: TileConfig,
    lists: Sequence[Any],
    row: tuple[Array, Array, Array],
    cols: int,
    tile: Callable[..., Any],
    carry: Any,
    *,
    block: int,
    split: bool = False,
    side: str = "kv",
) -> Any:
    """``tile(carry, first, masked)`` over the full blocks of ``row`` (unmasked), then
    over its partial blocks (masked), in tiles of ``cols``: blocks of query block
    ``row[2]`` (``side="kv"``) or of key block ``row[2]`` (``"q"``), read from the
    block mask's ranges (the band's by arithmetic) or its lists."""
    if config.walk != "lists":
        return _walk_ranges(config, lists, row, cols, tile, carry, block, split, side)
    count_ref, index_ref, full_count_ref, full_index_ref, _ = lists
    r0, r1, r2 = row
    for counts, indices, masked in (
        (full_count_ref, full_index_ref, False),
        (count_ref, index_ref, True),
    ):
        count = counts[r0, r1, r2]
        entries = _split_share(config, count) if split else (jnp.int32(0), count)

        def block_at(t: Array, indices: Any = indices) -> Array:
            return indices[r0, r1, r2, t]

        carry = walk_tiles(
            block_at,
            entries,
            max(indices.shape[-1] - 1, 0),
            block,
            cols,
            partial(tile, masked=masked),
            carry,
        )
    return carry


def _walk_ranges(
    config: TileConfig,
    refs: Sequence[Any],
    row: tuple[Array, Array, Array],
    cols: int,
    tile: Callable[..., Any],
    carry: Any,
    block: int,
    split: bool,
    side: str,
) -> Any:
    """``_walk_lists`` over ranges ``(first, last, full_first, full_last)``: the full
    run, then the partial blocks ``[first, full_first)`` and ``[full_last, last)``,
    each entry's block index an addition (no list to load)."""
    r0, r1, r2 = row
    if config.walk == "band":
        fn = kv_range if side == "kv" else q_range
        blocks = (config.q_len, config.k_len, config.q_block, config.k_block)
        first, last, full_first, full_last = fn(
            jnp, r2, refs[-1][r0], *blocks, config.lo, config.hi
        )
    else:
        first, last, full_first, full_last = (refs[0][r0, r1, r2, t] for t in range(4))
    before = full_first - first
    # Past the end only as the look-ahead of the last step, never walked.
    top = max(config.n_k_blocks if side == "kv" else config.n_q_blocks, 1)
    for start, count, masked in (
        (full_first, full_last - full_first, False),
        (first, before + last - full_last, True),
    ):

        def block_at(t: Array, start: Array = start, masked: bool = masked) -> Array:
            if masked:
                return jnp.where(t < before, first + t, full_last + t - before)
            return start + t

        entries = _split_share(config, count) if split else (jnp.int32(0), count)
        carry = walk_tiles(block_at, entries, top, block, cols, partial(tile, masked=masked), carry)
    return carry


def _forward_kernel(config: TileConfig, *refs: Any) -> None:
    lists, mask_refs, score_refs, bias_ref, rest = _split_refs(config, refs)
    offset_ref = lists[-1]
    seeds_ref, rest = _seeds_ref(config, rest)
    q_ref, k_ref, v_ref, o_ref, lse_ref = rest
    split = config.kv_splits > 1
    # The grid is (query tile[, split], query head, batch row): query tiles fastest, so
    # programs running together share their keys and values in L2.
    r = config.row_tile("forward", pl.program_id(0))
    h, b = pl.program_id(1 + split), pl.program_id(2 + split)
    mb, mh = _mask_index(config, b, h)
    rows, cols = config.tiles("forward")
    i = lax.div(r, jnp.int32(config.q_block // rows))  # the query block
    row0 = r * rows
    q_blk = q_ref[...]
    q_pos = query_positions(config, row0, rows, offset_ref[mb])[:, None]
    pure = not config.scores.changes_scores
    # Base-2 scores: log2(e) folded into the scale when nothing changes the scores.
    scale = _F32(config.scale * LOG2E if pure else config.scale)

    def tile(carry: tuple, first: Array, masked: bool) -> tuple:
        k_blk = k_ref[pl.ds(first, cols), :]
        v_blk = v_ref[pl.ds(first, cols), :]
        k_pos = key_positions(first, cols)[None, :]
        s = _matmul_t(q_blk, k_blk) * scale
        if not pure:
            bias = None
            if bias_ref is not None:
                bias = _bias_tile(config, bias_ref, None, (row0, rows), (first, cols))
            score_mod = tile_score_mod(config, score_refs, b, h, q_pos, k_pos)
            s = tile_scores(config.scores, s, bias, score_mod) * _F32(LOG2E)
        visible = None
        if masked:
            visible = tile_visible(config, mask_refs, b, h, q_pos, k_pos)
            s = jnp.where(visible, s, -jnp.inf)
        keep = tile_keep(config, seeds_ref, b, h, q_pos, k_pos)
        return softmax_step(carry, s, v_blk, keep, visible)

    carry = (
        jnp.full((rows,), -jnp.inf, _F32),
        jnp.zeros((rows,), _F32),
        jnp.zeros((rows, v_ref.shape[-1]), _F32),
    )
    carry = _walk_lists(
        config, lists, (mb, mh, i), cols, tile, carry, block=config.k_block, split=split
    )
    m, l, acc = carry
    out, lse = softmax_finish(m, l, acc, out_scale=dropout_scale(config))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _split_share(config: TileConfig, count: Array) -> tuple[Array, Array]:
    """The entries ``[start, stop)`` of a list of ``count`` blocks that this forward
    program walks: its equal share when the lists are split."""
    share = lax.div(count + (config.kv_splits - 1), jnp.int32(config.kv_splits))
    start = jnp.minimum(pl.program_id(1) * share, count)
    return start, jnp.minimum(start + share, count)


def _dq_kernel(config: TileConfig, *refs: Any) -> None:
    lists, mask_refs, score_refs, bias_ref, rest = _split_refs(config, refs)
    offset_ref = lists[-1]
    seeds_ref, rest = _seeds_ref(config, rest)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *extra = rest
    # After dQ: the bias gradient (tiles or row sums), then one flattened gradient per
    # differentiable score_mod array, this program's share.
    dbias_ref: Any = extra.pop(0) if config.bias_gradient in ("tiles", "rows") else None
    array_refs = extra
    r = config.row_tile("dq", pl.program_id(0))
    h, b = pl.program_id(1), pl.program_id(2)
    mb, mh = _mask_index(config, b, h)
    bk = config.k_block
    rows, cols = config.tiles("dq")
    i = lax.div(r, jnp.int32(config.q_block // rows))
    row0 = r * rows
    q_blk, do_blk = q_ref[...], do_ref[...]
    # lse arrives in base 2.
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_pos = query_positions(config, row0, rows, offset_ref[mb])[:, None]
    pure = not config.scores.changes_scores

    write_tiles = config.bias_gradient == "tiles"
    sum_rows = config.bias_gradient == "rows"
    if write_tiles:
        # This program owns these rows of dbias[b, h]: zero them, then write each
        # listed tile once (no atomics).
        def zero(t: Array, c: Array) -> Array:
            dbias_ref[:, pl.ds(t * bk, bk)] = jnp.zeros((rows, bk), _F32)
            return c

        lax.fori_loop(0, config.n_k_blocks, zero, 0)

    def tile(carry: dict, first: Array, masked: bool) -> dict:
        k_blk = k_ref[pl.ds(first, cols), :]
        v_blk = v_ref[pl.ds(first, cols), :]
        k_pos = key_positions(first, cols)[None, :]
        visible = None
        if masked:
            visible = tile_visible(config, mask_refs, b, h, q_pos, k_pos)
        qk = _matmul_t(q_blk, k_blk)
        if masked:
            # A hidden key's non-finite K or V would give 0 * NaN in dS and dQ (and in
            # the score_mod's derivative at its score); a visible one has made the
            # row's delta non-finite already (``_hidden``).
            k_blk, v_blk = finite(k_blk), finite(v_blk)
            if not pure and visible is not None:
                qk = jnp.where(visible, qk, 0.0)
        dp = _matmul_t(do_blk, v_blk)
        reads: list[ArrayRead] = []
        keep = tile_keep(config, seeds_ref, b, h, q_pos, k_pos)
        dp = kept(config, keep, dp)
        if pure:
            _, ds = tile_gradient(qk * _F32(config.scale * LOG2E), lse, delta, dp, visible)
            d_values: list[Array] = []
        else:
            s0 = qk * _F32(config.scale)
            bias = None
            if bias_ref is not None:
                bias = _bias_tile(config, bias_ref, None, (row0, rows), (first, cols))
            score_mod = tile_score_mod(config, score_refs, b, h, q_pos, k_pos, reads)
            s = tile_scores(config.scores, s0, bias, score_mod)
            _, ds = tile_gradient(s * _F32(LOG2E), lse, delta, dp, visible)
            if reads and visible is not None:
                ds = jnp.where(visible, ds, 0.0)  # the reads' gradients sum over the tile
            values = [read.value for read in reads]
            ds, d_values = tile_score_gradients(config.scores, s0, bias, ds, score_mod, values)
        carry = dict(carry)
        arrays = list(carry["arrays"])
        for read, d_value in zip(reads, d_values, strict=True):
            slot = config.score_grads.index(read.const)
            shape = config.score_array_shape(read.const)
            arrays[slot] = add_read_gradient(arrays[slot], read, shape, d_value)
        carry["arrays"] = arrays
        if visible is not None and config.scores.changes_scores:
            ds = jnp.where(visible, ds, 0.0)
        if write_tiles:
            dbias_ref[:, pl.ds(first, cols)] = ds
        if sum_rows:
            carry["rows"] = carry["rows"] + ds.sum(axis=1)
        # The scale of s0 = scale * q.k is applied once, after the loop, not on every
        # accumulator update (as FlashAttention-2's backward scales dQ and dK in its
        # epilogue).
        carry["dq"] = carry["dq"] + _matmul(ds.astype(k_blk.dtype), k_blk)
        return carry

    carry: dict[str, Any] = {"dq": jnp.zeros((rows, q_ref.shape[-1]), _F32)}
    if sum_rows:
        carry["rows"] = jnp.zeros((rows,), _F32)
    carry["arrays"] = [jnp.zeros(ref.shape, _F32) for ref in array_refs]
    carry = _walk_lists(config, lists, (mb, mh, i), cols, tile, carry, block=bk)
    dq_ref[...] = (carry["dq"] * _F32(config.scale)).astype(dq_ref.dtype)
    if sum_rows:
        dbias_ref[...] = carry["rows"]
    for ref, grad in zip(array_refs, carry["arrays"], strict=True):
        ref[...] = grad


def _dkdv_kernel(config: TileConfig, *refs: Any) -> None:
    lists, mask_refs, score_refs, bias_ref, rest = _split_refs(config, refs)
    offset_ref = lists[-1]
    seeds_ref, rest = _seeds_ref(config, rest)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *dbias = rest
    # Column sums of the score gradient per query head of the share: the gradient of a
    # bias that varies only along keys.
    dbias_ref: Any = dbias[0] if dbias else None
    split = config.group_splits > 1
    r = config.row_tile("dkdv", pl.program_id(0))
    share = pl.program_id(1) if split else 0
    hk, b = pl.program_id(1 + split), pl.program_id(2 + split)
    bq = config.q_block
    rows, cols = config.tiles("dkdv")
    j = lax.div(r, jnp.int32(config.k_block // rows))  # the key block
    row0 = r * rows
    k_blk = k_ref[...]
    # dP without this program's non-finite values: a hidden one would give 0 * NaN in
    # dS; a visible one has made its rows' delta non-finite already (``_hidden``).
    v_clean = finite(v_ref[...])
    k_pos = key_positions(row0, rows)[:, None]
    bias_heads = config.scores.bias is not None and config.scores.bias[1]
    pure = not config.scores.changes_scores
    heads = config.groups // config.group_splits

    def one_head(g: Array, carry: tuple) -> tuple:
        # The query heads of this program's share of the group, one after another, so
        # their dK and dV are summed here rather than written per query head.
        h = hk * config.groups + share * heads + g
        mb, mh = _mask_index(config, b, h)
        offset = offset_ref[mb]

        def tile(carry: dict, first: Array, masked: bool) -> dict:
            q_rows = pl.ds(first, cols)
            q_blk = q_ref[h, q_rows, :]
            do_blk = do_ref[h, q_rows, :]
            q_pos = query_positions(config, first, cols, offset)[None, :]
            visible_t = None
            if masked:
                visible_t = tile_visible(config, mask_refs, b, h, q_pos, k_pos)
            # The tile transposed, (rows, cols): keys are this program's rows.
            kq = _matmul_t(k_blk, q_blk)
            if visible_t is not None and not pure:  # a hidden key's score_mod: see _dq_kernel
                kq = jnp.where(visible_t, kq, 0.0)
            keep_t = tile_keep(config, seeds_ref, b, h, q_pos, k_pos)
            dp_t = kept(config, keep_t, _matmul_t(v_clean, do_blk))
            # lse arrives in base 2.
            lse_t, delta_t = lse_ref[h, q_rows][None, :], delta_ref[h, q_rows][None, :]
            if pure:
                p_t, ds_t = tile_gradient(
                    kq * _F32(config.scale * LOG2E), lse_t, delta_t, dp_t, visible_t
                )
            else:
                s0_t = kq * _F32(config.scale)
                bias_t = None
                if bias_ref is not None:
                    head = h if bias_heads else 0
                    bias_t = _bias_tile(config, bias_ref, head, (first, cols), (row0, rows)).T
                score_mod = tile_score_mod(config, score_refs, b, h, q_pos, k_pos)
                s_t = tile_scores(config.scores, s0_t, bias_t, score_mod)
                p_t, ds_t = tile_gradient(s_t * _F32(LOG2E), lse_t, delta_t, dp_t, visible_t)
                ds_t, _ = tile_score_gradients(config.scores, s0_t, bias_t, ds_t, score_mod)
                if visible_t is not None:
                    ds_t = jnp.where(visible_t, ds_t, 0.0)
            p_t = kept(config, keep_t, p_t)
            carry = dict(carry)
            carry["dv"] = carry["dv"] + _matmul(p_t.astype(do_blk.dtype), do_blk)
            # The scale of s0 = scale * k.q is applied once, after the loops.
            carry["dk"] = carry["dk"] + _matmul(ds_t.astype(q_blk.dtype), q_blk)
            if dbias_ref is not None:
                carry["columns"] = carry["columns"] + ds_t.sum(axis=1)
            return carry

        head_carry = {"dk": carry[0], "dv": carry[1]}
        if dbias_ref is not None:
            head_carry["columns"] = jnp.zeros((rows,), _F32)
        head_carry = _walk_lists(
            config, lists, (mb, mh, j), cols, tile, head_carry, block=bq, side="q"
        )
        if dbias_ref is not None:
            dbias_ref[pl.ds(g, 1), :] = head_carry["columns"][None, :]
        return head_carry["dk"], head_carry["dv"]

    carry = (
        jnp.zeros((rows, k_ref.shape[-1]), _F32),
        jnp.zeros((rows, v_ref.shape[-1]), _F32),
    )
    dk, dv = lax.fori_loop(0, heads, one_head, carry)
    dk_ref[...] = (dk * _F32(config.scale)).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
