"""Pallas backend, the kernel bodies: forward, dQ and dK/dV, one program per grid cell."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .._scores import tile_score_gradients, tile_scores
from ._tile_math import (
    TileConfig,
    _matmul,
    _matmul_t,
    add_read_gradient,
    dropout_scale,
    kept,
    key_positions,
    over_slices,
    query_positions,
    softmax_finish,
    softmax_step,
    tile_gradient,
    tile_keep,
    tile_score_mod,
    tile_visible,
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


def _split_refs(config: TileConfig, refs: Sequence[Any]) -> tuple:
    """The refs of a kernel: block-mask lists, mask_fn arrays, score_mod arrays, the
    bias (or ``None``), then the pass's own inputs and outputs."""
    n_mask, n_score = len(config.const_dtypes), len(config.score_dtypes)
    lists = refs[:5]
    mask_refs = refs[5 : 5 + n_mask]
    score_refs = refs[5 + n_mask : 5 + n_mask + n_score]
    rest = refs[5 + n_mask + n_score :]
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


def _forward_kernel(config: TileConfig, *refs: Any) -> None:
    lists, mask_refs, score_refs, bias_ref, rest = _split_refs(config, refs)
    count_ref, index_ref, full_count_ref, full_index_ref, offset_ref = lists
    seeds_ref, rest = _seeds_ref(config, rest)
    q_ref, k_ref, v_ref, o_ref, lse_ref = rest
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    mb, mh = _mask_index(config, b, h)
    bq, bk = config.q_block, config.k_block
    q_blk = q_ref[...]
    q_pos = query_positions(config, i * bq, bq, offset_ref[mb])[:, None]

    def step(carry: tuple, j: Array, masked: bool) -> tuple:
        k_blk = k_ref[pl.ds(j * bk, bk), :]
        v_blk = v_ref[pl.ds(j * bk, bk), :]
        k_pos = key_positions(j * bk, bk)[None, :]
        s0 = _matmul_t(q_blk, k_blk) * _F32(config.scale)
        bias = None
        if bias_ref is not None:
            bias = _bias_tile(config, bias_ref, None, (i * bq, bq), (j * bk, bk))
        score_mod = tile_score_mod(config, score_refs, b, h, q_pos, k_pos)
        s = tile_scores(config.scores, s0, bias, score_mod)
        if masked:
            s = jnp.where(tile_visible(config, mask_refs, b, h, q_pos, k_pos), s, -jnp.inf)
        keep = tile_keep(config, seeds_ref, b, h, q_pos, k_pos)
        return softmax_step(carry, s, v_blk, keep)

    carry = (
        jnp.full((config.q_block,), -jnp.inf, _F32),
        jnp.zeros((config.q_block,), _F32),
        jnp.zeros((config.q_block, v_ref.shape[-1]), _F32),
    )
    full_range = _split_share(config, full_count_ref[mb, mh, i])
    carry = lax.fori_loop(
        *full_range, lambda t, c: step(c, full_index_ref[mb, mh, i, t], False), carry
    )
    partial_range = _split_share(config, count_ref[mb, mh, i])
    carry = lax.fori_loop(
        *partial_range, lambda t, c: step(c, index_ref[mb, mh, i, t], True), carry
    )
    m, l, acc = carry
    out, lse = softmax_finish(m, l, acc, out_scale=dropout_scale(config))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _split_share(config: TileConfig, count: Array) -> tuple[Array, Array]:
    """The entries ``[start, stop)`` of a list of ``count`` blocks that this forward
    program walks: all of them, or its equal share when the lists are split."""
    if config.kv_splits == 1:
        return jnp.int32(0), count
    share = lax.div(count + (config.kv_splits - 1), jnp.int32(config.kv_splits))
    start = jnp.minimum(pl.program_id(3) * share, count)
    return start, jnp.minimum(start + share, count)


def _dq_kernel(config: TileConfig, *refs: Any) -> None:
    lists, mask_refs, score_refs, bias_ref, rest = _split_refs(config, refs)
    count_ref, index_ref, full_count_ref, full_index_ref, offset_ref = lists
    seeds_ref, rest = _seeds_ref(config, rest)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *extra = rest
    # After dQ: the bias gradient (tiles or row sums), then one flattened gradient per
    # differentiable score_mod array, this program's share.
    dbias_ref: Any = extra.pop(0) if config.bias_gradient in ("tiles", "rows") else None
    array_refs = extra
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    mb, mh = _mask_index(config, b, h)
    bq, bk, sk = config.q_block, config.k_block, config.dq_key_tile
    q_blk, do_blk = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_pos = query_positions(config, i * bq, bq, offset_ref[mb])[:, None]
    scale = _F32(config.scale)

    write_tiles = config.bias_gradient == "tiles"
    sum_rows = config.bias_gradient == "rows"
    if write_tiles:
        # This program owns rows i of dbias[b, h]: zero them, then write each listed
        # tile once (no atomics).
        def zero(t: Array, c: Array) -> Array:
            dbias_ref[:, pl.ds(t * bk, bk)] = jnp.zeros((bq, bk), _F32)
            return c

        lax.fori_loop(0, config.n_k_blocks, zero, 0)

    def tile(carry: dict, start: Array, masked: bool) -> dict:
        # Keys start .. start + sk of a listed key block.
        k_blk = k_ref[pl.ds(start, sk), :]
        v_blk = v_ref[pl.ds(start, sk), :]
        k_pos = key_positions(start, sk)[None, :]
        visible = None
        if masked:
            visible = tile_visible(config, mask_refs, b, h, q_pos, k_pos)
        s0 = _matmul_t(q_blk, k_blk) * scale
        bias = None
        if bias_ref is not None:
            bias = _bias_tile(config, bias_ref, None, (i * bq, bq), (start, sk))
        reads: list[ArrayRead] = []
        score_mod = tile_score_mod(config, score_refs, b, h, q_pos, k_pos, reads)
        s = tile_scores(config.scores, s0, bias, score_mod)
        keep = tile_keep(config, seeds_ref, b, h, q_pos, k_pos)
        dp = kept(config, keep, _matmul_t(do_blk, v_blk))
        _, ds = tile_gradient(s, lse, delta, dp, visible)
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
            dbias_ref[:, pl.ds(start, sk)] = ds
        if sum_rows:
            carry["rows"] = carry["rows"] + ds.sum(axis=1)
        carry["dq"] = carry["dq"] + _matmul(ds.astype(k_blk.dtype), k_blk) * scale
        return carry

    def step(carry: dict, j: Array, masked: bool) -> dict:
        return over_slices(j * bk, bk, sk, partial(tile, masked=masked), carry)

    carry: dict[str, Any] = {"dq": jnp.zeros((bq, q_ref.shape[-1]), _F32)}
    if sum_rows:
        carry["rows"] = jnp.zeros((bq,), _F32)
    carry["arrays"] = [jnp.zeros(ref.shape, _F32) for ref in array_refs]
    carry = lax.fori_loop(
        0,
        full_count_ref[mb, mh, i],
        lambda t, c: step(c, full_index_ref[mb, mh, i, t], False),
        carry,
    )
    carry = lax.fori_loop(
        0, count_ref[mb, mh, i], lambda t, c: step(c, index_ref[mb, mh, i, t], True), carry
    )
    dq_ref[...] = carry["dq"].astype(dq_ref.dtype)
    if sum_rows:
        dbias_ref[...] = carry["rows"]
    for ref, grad in zip(array_refs, carry["arrays"], strict=True):
        ref[...] = grad


def _dkdv_kernel(config: TileConfig, *refs: Any) -> None:
    lists, mask_refs, score_refs, bias_ref, rest = _split_refs(config, refs)
    count_ref, index_ref, full_count_ref, full_index_ref, offset_ref = lists
    seeds_ref, rest = _seeds_ref(config, rest)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *dbias = rest
    # Column sums of the score gradient per query head of the group: the gradient of a
    # bias that varies only along keys.
    dbias_ref: Any = dbias[0] if dbias else None
    b, hk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk, sq = config.q_block, config.k_block, config.dkdv_query_tile
    k_blk, v_blk = k_ref[...], v_ref[...]
    k_pos = key_positions(j * bk, bk)[:, None]
    scale = _F32(config.scale)
    bias_heads = config.scores.bias is not None and config.scores.bias[1]

    def one_head(g: Array, carry: tuple) -> tuple:
        # The query heads of this key/value head's group, one after another, so dK and
        # dV of the group are summed here rather than written per query head.
        h = hk * config.groups + g
        mb, mh = _mask_index(config, b, h)
        offset = offset_ref[mb]

        def tile(carry: dict, start: Array, masked: bool) -> dict:
            # Queries start .. start + sq of a listed query block.
            rows = pl.ds(start, sq)
            q_blk = q_ref[h, rows, :]
            do_blk = do_ref[h, rows, :]
            q_pos = query_positions(config, start, sq, offset)[None, :]
            visible_t = None
            if masked:
                visible_t = tile_visible(config, mask_refs, b, h, q_pos, k_pos)
            # The tile transposed, (bk, bq): keys are this program's rows.
            s0_t = _matmul_t(k_blk, q_blk) * scale
            bias_t = None
            if bias_ref is not None:
                head = h if bias_heads else 0
                bias_t = _bias_tile(config, bias_ref, head, (start, sq), (j * bk, bk)).T
            score_mod = tile_score_mod(config, score_refs, b, h, q_pos, k_pos)
            s_t = tile_scores(config.scores, s0_t, bias_t, score_mod)
            lse_t, delta_t = lse_ref[h, rows][None, :], delta_ref[h, rows][None, :]
            keep_t = tile_keep(config, seeds_ref, b, h, q_pos, k_pos)
            dp_t = kept(config, keep_t, _matmul_t(v_blk, do_blk))
            p_t, ds_t = tile_gradient(s_t, lse_t, delta_t, dp_t, visible_t)
            p_t = kept(config, keep_t, p_t)
            ds_t, _ = tile_score_gradients(config.scores, s0_t, bias_t, ds_t, score_mod)
            if visible_t is not None and config.scores.changes_scores:
                ds_t = jnp.where(visible_t, ds_t, 0.0)
            carry = dict(carry)
            carry["dv"] = carry["dv"] + _matmul(p_t.astype(do_blk.dtype), do_blk)
            carry["dk"] = carry["dk"] + _matmul(ds_t.astype(q_blk.dtype), q_blk) * scale
            if dbias_ref is not None:
                carry["columns"] = carry["columns"] + ds_t.sum(axis=1)
            return carry

        def step(carry: dict, i: Array, masked: bool) -> dict:
            return over_slices(i * bq, bq, sq, partial(tile, masked=masked), carry)

        head_carry = {"dk": carry[0], "dv": carry[1]}
        if dbias_ref is not None:
            head_carry["columns"] = jnp.zeros((bk,), _F32)
        head_carry = lax.fori_loop(
            0,
            full_count_ref[mb, mh, j],
            lambda t, c: step(c, full_index_ref[mb, mh, j, t], False),
            head_carry,
        )
        head_carry = lax.fori_loop(
            0,
            count_ref[mb, mh, j],
            lambda t, c: step(c, index_ref[mb, mh, j, t], True),
            head_carry,
        )
        if dbias_ref is not None:
            dbias_ref[pl.ds(g, 1), :] = head_carry["columns"][None, :]
        return head_carry["dk"], head_carry["dv"]

    carry = (
        jnp.zeros((config.k_block, k_ref.shape[-1]), _F32),
        jnp.zeros((config.k_block, v_ref.shape[-1]), _F32),
    )
    dk, dv = lax.fori_loop(0, config.groups, one_head, carry)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
