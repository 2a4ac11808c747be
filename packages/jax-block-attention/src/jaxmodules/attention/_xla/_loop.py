"""XLA backend, the block loop: online softmax over a block mask's lists, and its
recomputing VJP.

It receives the inputs already in the layout that ``_entry`` builds (queries
``(B, Hk, Lq_pad * G, d)``, keys and values ``(B, Hk, Lk_pad, d | dv)``, see there).
Scores, softmax statistics and accumulators are float32.

The work is split into *units*, one per (batch row, head) slice that has its own block
mask layer (a single unit when the mask depends on neither); within a unit, every query
block runs two loops over the key blocks the block mask gives it (``BlockMask.walk``):
over its full key blocks (no mask evaluated) and over its partial ones (element-wise
mask). A band's blocks are a range computed from the block index, a ``mask_fn``'s are
stored ranges, and only masks with holes in their rows are walked by lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .._band import in_band, kv_range
from .._config import BlockConfig
from .._dropout import keep_from_rows, row_hashes, threshold
from .._hidden import any_non_finite, finite, values_through
from .._scores import (
    Operands,
    ScoreMod,
    backward_statistics,
    tile_score_gradients,
    tile_scores,
    zero_cotangent,
)

Array = jax.Array
_F32 = jnp.float32


@dataclass(frozen=True, kw_only=True)
class KernelConfig(BlockConfig):
    """Everything static about one call of the block loop: the shared ``BlockConfig``
    and the kernel layout's heads (``mask_heads > 1`` means ``kv_heads == Hq`` and
    ``groups == 1``)."""

    batch: int
    kv_heads: int  # Hk: heads of the kernel layout
    groups: int  # G: query heads per kernel head
    any_full: bool
    any_partial: bool

    @property
    def rows_per_block(self) -> int:
        return self.q_block * self.groups

    @property
    def units(self) -> int:
        return self.mask_batch * self.mask_heads


@dataclass(frozen=True)
class _Unit:
    """One unit's share of the schedule and of the index vectors (arrays)."""

    walk: tuple  # the unit's schedule: () band, ((n_q, 4),) ranges, or four lists
    offset: Array  # ()
    batch_index: Array  # (bs,) batch rows of this unit
    head_index: Array  # (hs * G,) query heads of this unit, kernel order
    batch_slot: Array  # () this unit's slice along a per-batch operand axis
    head_slot: Array  # () this unit's slice along a per-head operand axis


# ------------------------------------------------------------------------ tile pieces


def _visible(config: KernelConfig, unit: _Unit, consts: tuple, i: Array, j: Array) -> Array:
    """Visibility of query block ``i`` x key block ``j``, broadcastable against the
    ``(bs, hs, rows, k_block)`` scores."""
    bq, bk, g = config.q_block, config.k_block, config.groups
    # Padded query rows are clamped to real ones so that mask_fn may index arrays of
    # length Lq; their outputs are discarded.
    q_pos = jnp.minimum(i * bq + jnp.arange(bq, dtype=jnp.int32), config.q_len - 1)
    q_pos = (q_pos + unit.offset)[:, None]
    k_pos = (j * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]
    visible = in_band(q_pos, k_pos, config.lo, config.hi, config.k_len)[None, None]
    if config.program is not None:
        head = unit.head_index[:1] if config.mask_heads > 1 else jnp.zeros(1, jnp.int32)
        custom = config.program.evaluate(
            consts,
            unit.batch_index.reshape(-1, 1, 1, 1),
            head.reshape(1, -1, 1, 1),
            q_pos[None, None],
            jnp.minimum(k_pos, config.k_len - 1)[None, None],
        )
        visible = visible & custom
    b1, h1 = visible.shape[:2]
    visible = jnp.broadcast_to(visible[:, :, :, None, :], (b1, h1, bq, g, bk))
    return visible.reshape(b1, h1, bq * g, bk)


def _tile_score_mod(
    config: KernelConfig, unit: _Unit, score_consts: tuple, i: Array, j: Array
) -> ScoreMod | None:
    """``score_mod`` on tile ``(i, j)``, at the indices of the scores' row layout:
    ``f(s2)``, or ``f(s2, values)`` with ``values`` in place of its floating arrays."""
    program = config.scores.score
    if program is None:
        return None
    bq, bk, g = config.q_block, config.k_block, config.groups
    rows = jnp.arange(bq * g, dtype=jnp.int32)
    q_pos = jnp.minimum(i * bq + rows // g, config.q_len - 1) + unit.offset
    heads = unit.head_index.reshape(-1, g)[:, rows % g]  # (hs, rows)
    index = (
        unit.batch_index.reshape(-1, 1, 1, 1),
        heads[None, :, :, None],
        q_pos.reshape(1, 1, -1, 1),
        (j * bk + jnp.arange(bk, dtype=jnp.int32)).reshape(1, 1, 1, -1),
    )

    def score_mod(s2: Array, values: list[Array] | None = None) -> Array:
        consts = list(score_consts)
        if values is not None:
            for n, value in zip(program.differentiable, values, strict=True):
                consts[n] = value
        out = program.evaluate(consts, s2, *index)
        return jnp.broadcast_to(out, s2.shape).astype(_F32)

    return score_mod


def _dropout_rows(config: KernelConfig, unit: _Unit, seeds: Array | None, i: Array) -> Any:
    """Dropout's row hashes of query block ``i``, ``(bs, hs, rows, 1)``, or ``None``."""
    if seeds is None or not config.scores.dropout_rate:
        return None
    bq, g = config.q_block, config.groups
    rows = jnp.arange(bq * g, dtype=jnp.int32)
    q_pos = jnp.minimum(i * bq + rows // g, config.q_len - 1) + unit.offset
    heads = unit.head_index.reshape(-1, g)[:, rows % g]  # (hs, rows): query heads
    row_seeds = seeds[unit.batch_index[:, None, None], heads[None]]
    return row_hashes(row_seeds, q_pos[None, None, :])[..., None]


def _dropout_keep(config: KernelConfig, rows: Array, j: Array) -> Array:
    """Which weights of the tile against key block ``j`` dropout keeps."""
    k_pos = j * config.k_block + jnp.arange(config.k_block, dtype=jnp.int32)
    return keep_from_rows(rows, k_pos, threshold(config.scores.dropout_rate))


def _unit_slice(x: Array, axis: int, slot: Array, split: bool) -> Array:
    return lax.dynamic_slice_in_dim(x, slot, 1, axis) if split and x.shape[axis] > 1 else x


def _unit_bias(config: KernelConfig, bias: Array | None, unit: _Unit) -> Array | None:
    if bias is None:
        return None
    bias = _unit_slice(bias, 0, unit.batch_slot, config.mask_batch > 1)
    return _unit_slice(bias, 1, unit.head_slot, config.mask_heads > 1)


def _bias_tile(config: KernelConfig, bias: Array | None, i: Array, j: Array) -> Array | None:
    """The unit's bias over tile ``(i, j)``, as ``(bb, hb, rows, bk)``."""
    if bias is None:
        return None
    bq, bk, g = config.q_block, config.k_block, config.groups
    if bias.shape[2] > 1:
        bias = lax.dynamic_slice_in_dim(bias, i * bq, bq, 2)
    if bias.shape[4] > 1:
        bias = lax.dynamic_slice_in_dim(bias, j * bk, bk, 4)
    bb, hb = bias.shape[:2]
    return jnp.broadcast_to(bias, (bb, hb, bq, g, bk)).reshape(bb, hb, bq * g, bk)


def _add_bias_gradient(
    config: KernelConfig, d_bias: Array, d_s1: Array, i: Array, j: Array
) -> Array:
    """Accumulate a tile's score gradient into the unit's bias gradient, summed over the
    axes along which the bias broadcasts."""
    bq, bk, g = config.q_block, config.k_block, config.groups
    bs, hs = d_s1.shape[:2]
    tile = d_s1.reshape(bs, hs, bq, g, bk)
    keep = d_bias.shape
    axes = tuple(a for a, n in enumerate(keep) if n == 1 and tile.shape[a] > 1)
    tile = tile.sum(axis=axes, keepdims=True) if axes else tile
    starts = [0, 0, i * bq if keep[2] > 1 else 0, 0, j * bk if keep[4] > 1 else 0]
    old = lax.dynamic_slice(d_bias, starts, tile.shape)
    return lax.dynamic_update_slice(d_bias, old + tile, starts)


def _prescaled(config: KernelConfig, q_blk: Array) -> tuple[Array, float]:
    """A query block for the score matmul and the factor still to apply to its result.

    Scaling a float32 query block once saves a multiply over every score block of its
    loop; lower precision queries are not rounded again, their scores are scaled in
    float32 instead.
    """
    if q_blk.dtype == _F32:
        return q_blk * _F32(config.scale), 1.0
    return q_blk, config.scale


def _pv(p: Array, v_blk: Array) -> Array:
    return jnp.einsum("bhrk,bhkd->bhrd", p, v_blk, preferred_element_type=_F32)


def _careful_pv(visible: Array, p: Array, v_blk: Array) -> Array:
    return values_through(p, visible, v_blk, _pv)


def _products(q_blk: Array, k_blk: Array, scale: float) -> Array:
    s = jnp.einsum("bhrd,bhkd->bhrk", q_blk, k_blk, preferred_element_type=_F32)
    return s if scale == 1.0 else s * _F32(scale)


# --------------------------------------------------------------------------- forward


def _over_row(config: KernelConfig, unit: _Unit, i: Array, carry: Any, step: Any) -> Any:
    """Fold ``step(carry, j, masked)`` over the key blocks that query block ``i``
    visits: the full ones (no mask needed) first, then the partial ones, each in
    ascending order."""
    if config.walk != "lists":
        if config.walk == "band":
            blocks = (config.q_len, config.k_len, config.q_block, config.k_block)
            first, last, full_first, full_last = kv_range(
                jnp, i, unit.offset, *blocks, config.lo, config.hi
            )
        else:
            first, last, full_first, full_last = (unit.walk[0][i, t] for t in range(4))
        carry = lax.fori_loop(full_first, full_last, lambda j, c: step(c, j, False), carry)
        # The partial blocks: [first, full_first), then [full_last, last).
        before = full_first - first

        def partial_step(t: Array, c: Any) -> Any:
            return step(c, jnp.where(t < before, first + t, full_last + t - before), True)

        return lax.fori_loop(0, before + last - full_last, partial_step, carry)
    partial_count, partial_index, full_count, full_index = unit.walk
    for count, index, masked, needed in (
        (full_count, full_index, False, config.any_full),
        (partial_count, partial_index, True, config.any_partial),
    ):
        if needed:
            row = index[i]
            carry = lax.fori_loop(
                0,
                count[i],
                lambda t, c, row=row, masked=masked: step(c, row[t], masked),
                carry,
            )
    return carry


def _unit_forward(
    config: KernelConfig,
    unit: _Unit,
    consts: tuple,
    operands: Operands,
    q: Array,
    k: Array,
    v: Array,
) -> tuple[Array, Array]:
    """One unit: output ``(bs, hs, rows, dv)`` (float32) and the per-row log-sum-exp
    (``-inf`` for a row with no visible key)."""
    rows, bk = config.rows_per_block, config.k_block
    bsz, hk = q.shape[0], q.shape[1]
    dv = v.shape[-1]
    bias = _unit_bias(config, operands.bias, unit)
    changes = config.scores.changes_scores

    def update(carry, q_blk, score_scale, drop_rows, i, j, masked):
        m, l, acc = carry
        k_blk = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
        v_blk = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
        s = _products(q_blk, k_blk, score_scale)
        if changes:
            score_mod = _tile_score_mod(config, unit, operands.score_consts, i, j)
            s = tile_scores(config.scores, s, _bias_tile(config, bias, i, j), score_mod)
        if masked:
            visible = _visible(config, unit, consts, i, j)
            s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        # A row that has seen no visible key keeps m = -inf; shift by 0 instead so that
        # exp() gives 0 rather than NaN.
        m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_shift[..., None])
        alpha = jnp.exp(m - m_shift)
        l = alpha * l + p.sum(axis=-1)
        if drop_rows is not None:
            # Dropout acts on the normalised weights: the denominator above keeps every
            # weight, the values see only the kept ones (scaled up at the end).
            p = jnp.where(_dropout_keep(config, drop_rows, j), p, 0.0)
        if masked:
            # A NaN or inf of a hidden key must not reach the tile's rows (0 * NaN):
            # only a tile that holds one takes the careful product (see _hidden).
            pv = lax.cond(any_non_finite(v_blk), partial(_careful_pv, visible), _pv, p, v_blk)
        else:
            pv = _pv(p, v_blk)
        acc = alpha[..., None] * acc + pv
        return m_new, l, acc

    def one_query_block(i):
        q_blk, score_scale = _prescaled(config, lax.dynamic_slice_in_dim(q, i * rows, rows, 2))
        drop_rows = _dropout_rows(config, unit, operands.seeds, i)
        carry = (
            jnp.full((bsz, hk, rows), -jnp.inf, _F32),
            jnp.zeros((bsz, hk, rows), _F32),
            jnp.zeros((bsz, hk, rows, dv), _F32),
        )
        carry = _over_row(
            config,
            unit,
            i,
            carry,
            lambda c, j, masked: update(c, q_blk, score_scale, drop_rows, i, j, masked),
        )
        m, l, acc = carry
        empty = l == 0.0
        out = acc / jnp.where(empty, 1.0, l)[..., None]
        if drop_rows is not None:
            out = out * _F32(1.0 / (1.0 - config.scores.dropout_rate))
        lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
        return out, lse

    out, lse = lax.map(one_query_block, jnp.arange(config.n_q_blocks, dtype=jnp.int32))
    # (n_q_blocks, bs, hs, rows, ...) -> (bs, hs, n_q_blocks * rows, ...)
    out = jnp.moveaxis(out, 0, 2).reshape(bsz, hk, -1, dv)
    lse = jnp.moveaxis(lse, 0, 2).reshape(bsz, hk, -1)
    return out, lse


# -------------------------------------------------------------------------- backward


def _unit_backward(
    config: KernelConfig,
    unit: _Unit,
    consts: tuple,
    operands: Operands,
    grads: Operands,
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    lse: Array,
    d_out: Array,
    d_lse: Array,
) -> tuple[tuple[Array, Array, Array], Operands]:
    """FlashAttention-2 style backward of one unit: recompute each listed block once,
    query block by query block, accumulating dK and dV over the whole key range and the
    gradients of the score operands into ``grads`` (the unit's slices)."""
    rows, bk = config.rows_per_block, config.k_block
    bsz, hk = q.shape[0], q.shape[1]
    d, dv = q.shape[-1], v.shape[-1]
    scale = _F32(config.scale)
    bias = _unit_bias(config, operands.bias, unit)
    scores = config.scores
    positions = scores.score.differentiable if scores.score else ()
    floats = [operands.score_consts[n] for n in positions]
    # A cotangent on lse adds p * d_lse to each score's gradient: fold it into delta.
    delta = jnp.einsum("bhrd,bhrd->bhr", d_out.astype(_F32), out.astype(_F32)) - d_lse
    # XLA:CPU multiplies (d, rows) x (rows, keys) about twice as fast as it contracts the
    # row axis of (rows, keys) and (rows, d); so dK and dV are accumulated transposed,
    # from transposed query and output-gradient blocks.

    def update(carry, blk, i, j, masked):
        dq_blk, dk_acc, dv_acc, g = carry
        q_blk, score_scale, q_t_blk, do_blk, do_t_blk, lse_blk, delta_blk, drop_rows = blk
        k_blk = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
        v_blk = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
        s0 = _products(q_blk, k_blk, score_scale)
        if masked:
            # Hidden keys' non-finite K or V would give 0 * NaN in dS and dQ (and in the
            # score_mod's derivative at their scores); a visible one has already made
            # the row's output and delta non-finite (see _hidden).
            visible = _visible(config, unit, consts, i, j)
            k_blk, v_blk = finite(k_blk), finite(v_blk)
            if scores.changes_scores:
                s0 = jnp.where(visible, s0, 0.0)
        bias_blk = _bias_tile(config, bias, i, j)
        score_mod = _tile_score_mod(config, unit, operands.score_consts, i, j)
        s = tile_scores(scores, s0, bias_blk, score_mod)
        if masked:
            s = jnp.where(visible, s, -jnp.inf)
        p = jnp.exp(s - lse_blk[..., None])
        dp = jnp.einsum("bhrd,bhkd->bhrk", do_blk, v_blk, preferred_element_type=_F32)
        p_out = p
        if drop_rows is not None:
            # The output saw the kept weights scaled by 1 / (1 - rate): so do dV and the
            # weights' gradient; delta = dO . O already holds the dropout.
            keep = _dropout_keep(config, drop_rows, j)
            inverse = _F32(1.0 / (1.0 - config.scores.dropout_rate))
            p_out = jnp.where(keep, p * inverse, 0.0)
            dp = jnp.where(keep, dp * inverse, 0.0)
        dv_blk = jnp.einsum("bhdr,bhrk->bhdk", do_t_blk, p_out, preferred_element_type=_F32)
        ds = p * (dp - delta_blk[..., None])
        if scores.changes_scores:
            ds, d_consts = tile_score_gradients(scores, s0, bias_blk, ds, score_mod, floats)
            d_bias = g.bias if g.bias is None else _add_bias_gradient(config, g.bias, ds, i, j)
            d_score = tuple(a + b for a, b in zip(g.score_consts, d_consts, strict=True))
            g = Operands(d_bias, d_score)
        ds = ds * scale
        dq_blk = dq_blk + jnp.einsum("bhrk,bhkd->bhrd", ds, k_blk, preferred_element_type=_F32)
        dk_blk = jnp.einsum("bhdr,bhrk->bhdk", q_t_blk, ds, preferred_element_type=_F32)
        start = j * bk
        dk_acc = lax.dynamic_update_slice_in_dim(
            dk_acc, lax.dynamic_slice_in_dim(dk_acc, start, bk, axis=3) + dk_blk, start, axis=3
        )
        dv_acc = lax.dynamic_update_slice_in_dim(
            dv_acc, lax.dynamic_slice_in_dim(dv_acc, start, bk, axis=3) + dv_blk, start, axis=3
        )
        return dq_blk, dk_acc, dv_acc, g

    def one_query_block(acc, i):
        dk_acc, dv_acc, g = acc
        start = i * rows
        q_blk = lax.dynamic_slice_in_dim(q, start, rows, axis=2)
        do_blk = lax.dynamic_slice_in_dim(d_out, start, rows, axis=2)
        lse_blk = lax.dynamic_slice_in_dim(lse, start, rows, axis=2)
        delta_blk = lax.dynamic_slice_in_dim(delta, start, rows, axis=2)
        blk = (
            *_prescaled(config, q_blk),
            jnp.swapaxes(q_blk, 2, 3),
            do_blk,
            jnp.swapaxes(do_blk, 2, 3),
            lse_blk,
            delta_blk,
            _dropout_rows(config, unit, operands.seeds, i),
        )
        carry = (jnp.zeros((bsz, hk, rows, d), _F32), dk_acc, dv_acc, g)
        carry = _over_row(config, unit, i, carry, lambda c, j, masked: update(c, blk, i, j, masked))
        dq_blk, dk_acc, dv_acc, g = carry
        return (dk_acc, dv_acc, g), dq_blk

    init = (
        jnp.zeros((bsz, hk, d, k.shape[2]), _F32),
        jnp.zeros((bsz, hk, dv, v.shape[2]), _F32),
        grads,
    )
    blocks = jnp.arange(config.n_q_blocks, dtype=jnp.int32)
    (dk_t, dv_t, grads), dq = lax.scan(one_query_block, init, blocks)
    dq = jnp.moveaxis(dq, 0, 2).reshape(bsz, hk, -1, d)
    return (dq, jnp.swapaxes(dk_t, 2, 3), jnp.swapaxes(dv_t, 2, 3)), grads


# ----------------------------------------------------------------------------- units


def _split_units(config: KernelConfig, x: Array) -> Array:
    """``(B, Hk, ...)`` -> ``(units, B / Bm, Hk / Hm, ...)``."""
    bm, hm = config.mask_batch, config.mask_heads
    rest = x.shape[2:]
    x = x.reshape(bm, x.shape[0] // bm, hm, x.shape[1] // hm, *rest)
    return jnp.swapaxes(x, 1, 2).reshape(bm * hm, x.shape[1], x.shape[3], *rest)


def _join_units(config: KernelConfig, x: Array) -> Array:
    bm, hm = config.mask_batch, config.mask_heads
    _, bs, hs, *rest = x.shape
    x = x.reshape(bm, hm, bs, hs, *rest)
    return jnp.swapaxes(x, 1, 2).reshape(bm * bs, hm * hs, *rest)


def _unit_inputs(config: KernelConfig, schedule: tuple) -> tuple:
    """Per-unit schedule arrays, unit-major: what ``lax.map`` slices one unit from."""
    walk, offset = schedule
    bm, hm = config.mask_batch, config.mask_heads
    flat = tuple(jnp.asarray(x, jnp.int32).reshape(bm * hm, *x.shape[2:]) for x in walk)
    unit = jnp.arange(bm * hm, dtype=jnp.int32)
    unit_batch, unit_head = unit // hm, unit % hm
    offsets = jnp.asarray(offset, jnp.int32)[unit_batch]
    return (flat, offsets, unit_batch, unit_head)


def _make_unit(config: KernelConfig, xs: tuple) -> _Unit:
    walk, offset, unit_batch, unit_head = xs
    if config.mask_batch == 1:
        batch_index = jnp.arange(config.batch, dtype=jnp.int32)
    else:
        batch_index = unit_batch.reshape(1)
    heads = config.kv_heads * config.groups
    if config.mask_heads == 1:
        head_index = jnp.arange(heads, dtype=jnp.int32)
    else:
        head_index = unit_head.reshape(1)
    return _Unit(
        tuple(walk),
        offset,
        batch_index,
        head_index,
        unit_batch,
        unit_head,
    )


def _first(xs: tuple) -> tuple:
    """The first unit's slice of ``_unit_inputs``."""
    return jax.tree_util.tree_map(lambda x: x[0], xs)


def _units_map(config: KernelConfig, fn: Any, schedule: tuple, *arrays: Array) -> Any:
    """``fn(unit, *unit_slices)`` for every unit, outputs reassembled."""
    xs = _unit_inputs(config, schedule)
    split = [_split_units(config, a) for a in arrays]
    if config.units == 1:
        result = fn(_make_unit(config, _first(xs)), *(a[0] for a in split))
        return jax.tree_util.tree_map(lambda r: _join_units(config, r[None]), result)
    result = lax.map(lambda args: fn(_make_unit(config, args[0]), *args[1]), (xs, split))
    return jax.tree_util.tree_map(lambda r: _join_units(config, r), result)


def _forward(config, schedule, consts, operands, q, k, v):
    return _units_map(
        config,
        lambda unit, q, k, v: _unit_forward(config, unit, consts, operands, q, k, v),
        schedule,
        q,
        k,
        v,
    )


def _zero_grads(config: KernelConfig, operands: Operands) -> Operands:
    positions = config.scores.score.differentiable if config.scores.score else ()
    return Operands(
        None if operands.bias is None else jnp.zeros(operands.bias.shape, _F32),
        tuple(jnp.zeros(jnp.shape(operands.score_consts[i]), _F32) for i in positions),
    )


def _unit_grad_slice(config: KernelConfig, grads: Operands, unit: _Unit) -> Operands:
    return Operands(_unit_bias(config, grads.bias, unit), grads.score_consts)


def _unit_grad_merge(
    config: KernelConfig, grads: Operands, part: Operands, unit: _Unit
) -> Operands:
    def put(full: Array, piece: Array, axes: tuple[tuple[int, Array, bool], ...]) -> Array:
        starts = [jnp.int32(0)] * full.ndim
        for axis, slot, split in axes:
            if split and full.shape[axis] > 1:
                starts[axis] = slot
        return lax.dynamic_update_slice(full, piece, starts)

    bias = grads.bias
    if bias is not None and part.bias is not None:
        bias = put(
            bias,
            part.bias,
            (
                (0, unit.batch_slot, config.mask_batch > 1),
                (1, unit.head_slot, config.mask_heads > 1),
            ),
        )
    return Operands(bias, part.score_consts)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _backward(config, schedule, consts, operands, q, k, v, out, lse, d_out, d_lse):
    xs = _unit_inputs(config, schedule)
    arrays = [_split_units(config, a) for a in (q, k, v, out, lse, d_out, d_lse)]

    def one(grads, args):
        unit = _make_unit(config, args[0])
        part = _unit_grad_slice(config, grads, unit)
        dqkv, part = _unit_backward(config, unit, consts, operands, part, *args[1])
        return _unit_grad_merge(config, grads, part, unit), dqkv

    grads = _zero_grads(config, operands)
    if config.units == 1:
        grads, dqkv = one(grads, (_first(xs), [a[0] for a in arrays]))
        dqkv = jax.tree_util.tree_map(lambda r: r[None], dqkv)
    else:
        grads, dqkv = lax.scan(one, grads, (xs, arrays))
    dqkv = jax.tree_util.tree_map(lambda r: _join_units(config, r), dqkv)
    return dqkv, grads


@_backward.defjvp
def _backward_jvp(config, primals, tangents):
    raise NotImplementedError(
        "masked_attention_via_map supports first-order reverse-mode derivatives (grad, "
        "vjp, value_and_grad) only: its backward pass is a recomputing custom VJP whose "
        "loops run a data-dependent number of blocks, so it cannot be differentiated "
        "again (grad of grad, hessian, jvp of grad). Use jax.nn.dot_product_attention "
        "where second-order derivatives are needed."
    )


# ------------------------------------------------------------------------ custom VJP


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def block_attention(
    config: KernelConfig,
    q: Array,
    k: Array,
    v: Array,
    schedule: tuple,
    consts: tuple,
    operands: Operands,
) -> tuple[Array, Array]:
    """Attention over the padded, kernel-layout inputs: the output in ``q``'s dtype and
    the per-row log-sum-exp (float32, ``-inf`` for rows with nothing visible)."""
    out, lse = _forward(config, schedule, consts, operands, q, k, v)
    return out.astype(q.dtype), lse


def _block_attention_fwd(config, q, k, v, schedule, consts, operands):
    out, lse = _forward(config, schedule, consts, operands, q, k, v)
    out = out.astype(q.dtype)
    return (out, lse), (q, k, v, schedule, consts, operands, out, lse)


def _block_attention_bwd(config, residuals, cotangents):
    q, k, v, schedule, consts, operands, out, lse = residuals
    d_out, d_lse = cotangents
    lse, d_lse = backward_statistics(lse, d_lse)
    (dq, dk, dv), grads = _backward(
        config, schedule, consts, operands, q, k, v, out, lse, d_out, d_lse
    )
    positions = config.scores.score.differentiable if config.scores.score else ()
    d_score = [zero_cotangent(c) for c in operands.score_consts]
    for i, g in zip(positions, grads.score_consts, strict=True):
        d_score[i] = g.astype(jnp.result_type(operands.score_consts[i]))
    d_operands = Operands(
        None if operands.bias is None else grads.bias.astype(operands.bias.dtype),
        tuple(d_score),
        None if operands.seeds is None else zero_cotangent(operands.seeds),
    )
    zeros = jax.tree_util.tree_map(zero_cotangent, (schedule, consts))
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *zeros, d_operands)


block_attention.defvjp(_block_attention_fwd, _block_attention_bwd)
