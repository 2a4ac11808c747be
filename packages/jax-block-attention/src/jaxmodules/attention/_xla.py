"""The block-loop backend: online softmax over a block mask's lists, recomputing VJP.

Layout inside this module: queries ``(B, Hk, Lq_pad * G, d)`` (rows ordered query
position major, head within the group minor), keys ``(B, Hk, Lk_pad, d)``, values
``(B, Hk, Lk_pad, dv)``; ``Hk`` is ``Hkv`` (a group's ``G`` query heads share each key
block's matmul) or, when the mask depends on the head, ``Hq`` with ``G = 1``. Scores,
softmax statistics and accumulators are float32.

The work is split into *units*, one per (batch row, head) slice that has its own block
lists (a single unit when the mask depends on neither); within a unit, every query
block runs two loops whose trip counts are read from the block mask: over its full key
blocks (no mask evaluated) and over its partial ones (element-wise mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._band import in_band
from ._mask_fn import MaskProgram

Array = jax.Array
_F32 = jnp.float32


@dataclass(frozen=True)
class KernelConfig:
    """Everything static about one call of the block loop (hashable: a jit static
    argument and a ``custom_vjp`` non-differentiable argument)."""

    batch: int
    kv_heads: int  # Hk: heads of the kernel layout
    groups: int  # G: query heads per kernel head
    q_len: int
    k_len: int
    q_block: int
    k_block: int
    scale: float
    lo: int | None
    hi: int | None
    program: MaskProgram | None
    mask_batch: int  # 1 or B
    mask_heads: int  # 1 or Hk (then G == 1)
    any_full: bool
    any_partial: bool

    @property
    def n_q_blocks(self) -> int:
        return -(-self.q_len // self.q_block)

    @property
    def n_k_blocks(self) -> int:
        return -(-self.k_len // self.k_block)

    @property
    def rows_per_block(self) -> int:
        return self.q_block * self.groups

    @property
    def units(self) -> int:
        return self.mask_batch * self.mask_heads


@dataclass(frozen=True)
class _Unit:
    """One unit's share of the schedule and of the mask inputs (arrays)."""

    partial_count: Array  # (n_q,)
    partial_index: Array  # (n_q, W)
    full_count: Array  # (n_q,)
    full_index: Array  # (n_q, W_full)
    offset: Array  # ()
    batch_index: Array  # (bs,) batch rows of this unit
    head_index: Array  # (1,) query head of this unit, or 0 when the mask ignores heads


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
        custom = config.program.evaluate(
            consts,
            unit.batch_index.reshape(-1, 1, 1, 1),
            unit.head_index.reshape(1, -1, 1, 1),
            q_pos[None, None],
            jnp.minimum(k_pos, config.k_len - 1)[None, None],
        )
        visible = visible & custom
    b1, h1 = visible.shape[:2]
    visible = jnp.broadcast_to(visible[:, :, :, None, :], (b1, h1, bq, g, bk))
    return visible.reshape(b1, h1, bq * g, bk)


def _prescaled(config: KernelConfig, q_blk: Array) -> tuple[Array, float]:
    """A query block for the score matmul and the factor still to apply to its result.

    Scaling a float32 query block once saves a multiply over every score block of its
    loop; lower precision queries are not rounded again, their scores are scaled in
    float32 instead.
    """
    if q_blk.dtype == _F32:
        return q_blk * _F32(config.scale), 1.0
    return q_blk, config.scale


def _scores(q_blk: Array, k_blk: Array, scale: float) -> Array:
    s = jnp.einsum("bhrd,bhkd->bhrk", q_blk, k_blk, preferred_element_type=_F32)
    return s if scale == 1.0 else s * _F32(scale)


# --------------------------------------------------------------------------- forward


def _unit_forward(
    config: KernelConfig, unit: _Unit, consts: tuple, q: Array, k: Array, v: Array
) -> tuple[Array, Array]:
    """One unit: output ``(bs, hs, rows, dv)`` (float32) and the per-row log-sum-exp."""
    rows, bk = config.rows_per_block, config.k_block
    bsz, hk = q.shape[0], q.shape[1]
    dv = v.shape[-1]

    def update(carry, q_blk, score_scale, j, visible=None):
        m, l, acc = carry
        k_blk = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
        v_blk = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
        s = _scores(q_blk, k_blk, score_scale)
        if visible is not None:
            s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        # A row that has seen no visible key keeps m = -inf; shift by 0 instead so that
        # exp() gives 0 rather than NaN.
        m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_shift[..., None])
        alpha = jnp.exp(m - m_shift)
        l = alpha * l + p.sum(axis=-1)
        pv = jnp.einsum("bhrk,bhkd->bhrd", p, v_blk, preferred_element_type=_F32)
        acc = alpha[..., None] * acc + pv
        return m_new, l, acc

    def one_query_block(i):
        q_blk, score_scale = _prescaled(config, lax.dynamic_slice_in_dim(q, i * rows, rows, 2))
        carry = (
            jnp.full((bsz, hk, rows), -jnp.inf, _F32),
            jnp.zeros((bsz, hk, rows), _F32),
            jnp.zeros((bsz, hk, rows, dv), _F32),
        )
        if config.any_full:
            full_row = unit.full_index[i]
            carry = lax.fori_loop(
                0,
                unit.full_count[i],
                lambda t, c: update(c, q_blk, score_scale, full_row[t]),
                carry,
            )
        if config.any_partial:
            part_row = unit.partial_index[i]

            def masked(t, c):
                j = part_row[t]
                return update(c, q_blk, score_scale, j, _visible(config, unit, consts, i, j))

            carry = lax.fori_loop(0, unit.partial_count[i], masked, carry)
        m, l, acc = carry
        empty = l == 0.0
        out = acc / jnp.where(empty, 1.0, l)[..., None]
        # +inf for rows without any visible key makes exp(s - lse) vanish in the backward.
        lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
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
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    lse: Array,
    d_out: Array,
) -> tuple[Array, Array, Array]:
    """FlashAttention-2 style backward of one unit: recompute each listed block once,
    query block by query block, accumulating dK and dV over the whole key range."""
    rows, bk = config.rows_per_block, config.k_block
    bsz, hk = q.shape[0], q.shape[1]
    d, dv = q.shape[-1], v.shape[-1]
    scale = _F32(config.scale)
    delta = jnp.einsum("bhrd,bhrd->bhr", d_out.astype(_F32), out.astype(_F32))
    # XLA:CPU multiplies (d, rows) x (rows, keys) about twice as fast as it contracts the
    # row axis of (rows, keys) and (rows, d); so dK and dV are accumulated transposed,
    # from transposed query and output-gradient blocks.

    def update(carry, blk, j, visible=None):
        dq_blk, dk_acc, dv_acc = carry
        q_blk, score_scale, q_t_blk, do_blk, do_t_blk, lse_blk, delta_blk = blk
        k_blk = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
        v_blk = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
        s = _scores(q_blk, k_blk, score_scale)
        if visible is not None:
            s = jnp.where(visible, s, -jnp.inf)
        p = jnp.exp(s - lse_blk[..., None])
        dv_blk = jnp.einsum("bhdr,bhrk->bhdk", do_t_blk, p, preferred_element_type=_F32)
        dp = jnp.einsum("bhrd,bhkd->bhrk", do_blk, v_blk, preferred_element_type=_F32)
        ds = p * (dp - delta_blk[..., None]) * scale
        dq_blk = dq_blk + jnp.einsum("bhrk,bhkd->bhrd", ds, k_blk, preferred_element_type=_F32)
        dk_blk = jnp.einsum("bhdr,bhrk->bhdk", q_t_blk, ds, preferred_element_type=_F32)
        start = j * bk
        dk_acc = lax.dynamic_update_slice_in_dim(
            dk_acc, lax.dynamic_slice_in_dim(dk_acc, start, bk, axis=3) + dk_blk, start, axis=3
        )
        dv_acc = lax.dynamic_update_slice_in_dim(
            dv_acc, lax.dynamic_slice_in_dim(dv_acc, start, bk, axis=3) + dv_blk, start, axis=3
        )
        return dq_blk, dk_acc, dv_acc

    def one_query_block(acc, i):
        start = i * rows
        q_blk = lax.dynamic_slice_in_dim(q, start, rows, axis=2)
        do_blk = lax.dynamic_slice_in_dim(d_out, start, rows, axis=2)
        blk = (
            *_prescaled(config, q_blk),
            jnp.swapaxes(q_blk, 2, 3),
            do_blk,
            jnp.swapaxes(do_blk, 2, 3),
            lax.dynamic_slice_in_dim(lse, start, rows, axis=2),
            lax.dynamic_slice_in_dim(delta, start, rows, axis=2),
        )
        carry = (jnp.zeros((bsz, hk, rows, d), _F32), *acc)
        if config.any_full:
            full_row = unit.full_index[i]
            carry = lax.fori_loop(
                0, unit.full_count[i], lambda t, c: update(c, blk, full_row[t]), carry
            )
        if config.any_partial:
            part_row = unit.partial_index[i]

            def masked(t, c):
                j = part_row[t]
                return update(c, blk, j, _visible(config, unit, consts, i, j))

            carry = lax.fori_loop(0, unit.partial_count[i], masked, carry)
        dq_blk, dk_acc, dv_acc = carry
        return (dk_acc, dv_acc), dq_blk

    init = (
        jnp.zeros((bsz, hk, d, k.shape[2]), _F32),
        jnp.zeros((bsz, hk, dv, v.shape[2]), _F32),
    )
    blocks = jnp.arange(config.n_q_blocks, dtype=jnp.int32)
    (dk_t, dv_t), dq = lax.scan(one_query_block, init, blocks)
    dq = jnp.moveaxis(dq, 0, 2).reshape(bsz, hk, -1, d)
    return dq, jnp.swapaxes(dk_t, 2, 3), jnp.swapaxes(dv_t, 2, 3)


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
    partial_count, partial_index, full_count, full_index, offset = schedule
    bm, hm = config.mask_batch, config.mask_heads
    flat = [x.reshape(bm * hm, *x.shape[2:]) for x in (partial_count, partial_index)]
    flat += [x.reshape(bm * hm, *x.shape[2:]) for x in (full_count, full_index)]
    unit = jnp.arange(bm * hm, dtype=jnp.int32)
    unit_batch, unit_head = unit // hm, unit % hm
    offsets = jnp.asarray(offset, jnp.int32)[unit_batch]
    return (*flat, offsets, unit_batch, unit_head)


def _make_unit(config: KernelConfig, xs: tuple) -> _Unit:
    partial_count, partial_index, full_count, full_index, offset, unit_batch, unit_head = xs
    slab = config.batch // config.mask_batch
    if config.mask_batch == 1:
        batch_index = jnp.arange(config.batch, dtype=jnp.int32)
    else:
        batch_index = unit_batch.reshape(1) * slab + jnp.arange(slab, dtype=jnp.int32)
    return _Unit(
        partial_count,
        partial_index,
        full_count,
        full_index,
        offset,
        batch_index,
        unit_head.reshape(1),
    )


def _for_each_unit(config: KernelConfig, fn: Any, schedule: tuple, *arrays: Array) -> Any:
    """Run ``fn(unit, *unit_slices)`` for every unit and reassemble its outputs."""
    xs = _unit_inputs(config, schedule)
    split = [_split_units(config, a) for a in arrays]
    if config.units == 1:
        result = fn(_make_unit(config, tuple(x[0] for x in xs)), *(a[0] for a in split))
        return jax.tree_util.tree_map(lambda r: _join_units(config, r[None]), result)
    result = lax.map(lambda args: fn(_make_unit(config, args[0]), *args[1]), (xs, split))
    return jax.tree_util.tree_map(lambda r: _join_units(config, r), result)


def _forward(config, schedule, consts, q, k, v):
    return _for_each_unit(
        config,
        lambda unit, q, k, v: _unit_forward(config, unit, consts, q, k, v),
        schedule,
        q,
        k,
        v,
    )


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _backward(config, schedule, consts, q, k, v, out, lse, d_out):
    return _for_each_unit(
        config,
        lambda unit, *a: _unit_backward(config, unit, consts, *a),
        schedule,
        q,
        k,
        v,
        out,
        lse,
        d_out,
    )


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
    config: KernelConfig, q: Array, k: Array, v: Array, schedule: tuple, consts: tuple
) -> Array:
    """Attention over the padded, kernel-layout inputs; output in ``q``'s dtype."""
    out, _ = _forward(config, schedule, consts, q, k, v)
    return out.astype(q.dtype)


def _block_attention_fwd(config, q, k, v, schedule, consts):
    out, lse = _forward(config, schedule, consts, q, k, v)
    out = out.astype(q.dtype)
    return out, (q, k, v, schedule, consts, out, lse)


def _zero_cotangent(x: Any) -> Any:
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(jnp.shape(x), dtype=jax.dtypes.float0)


def _block_attention_bwd(config, residuals, d_out):
    q, k, v, schedule, consts, out, lse = residuals
    dq, dk, dv = _backward(config, schedule, consts, q, k, v, out, lse, d_out)
    zeros = jax.tree_util.tree_map(_zero_cotangent, (schedule, consts))
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *zeros)


block_attention.defvjp(_block_attention_fwd, _block_attention_bwd)
