"""Block-wise attention with an online softmax and a recomputing custom VJP.

Layout inside this module: queries ``(B, Hkv, Lq_pad * G, d)`` (rows ordered query
position major, head within the group minor), keys ``(B, Hkv, Lk_pad, d)``, values
``(B, Hkv, Lk_pad, dv)``. Scores, softmax statistics and accumulators are float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._plan import Plan

MaskFn = Callable[..., Any]
Array = jax.Array

_F32 = jnp.float32


def _block_mask(
    plan: Plan, mask_fn: MaskFn | None, consts: Sequence[Array], i: Array, j: Array
) -> Array:
    """Visibility of query block ``i`` x key block ``j``, shaped to broadcast against
    the ``(B, Hkv, rows, k_block)`` scores."""
    bq, bk, g = plan.q_block, plan.k_block, plan.groups
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    visible = k_pos < plan.k_len
    if plan.is_causal:
        visible &= k_pos <= q_pos
    left, right = plan.window
    if left is not None:
        visible &= k_pos >= q_pos - left
    if right is not None:
        visible &= k_pos <= q_pos + right
    visible = visible[None, None, :, None, :]
    if mask_fn is not None:
        custom = _evaluate_mask_fn(plan, mask_fn, consts, i, j)
        visible = visible & custom
    b1, h1 = visible.shape[0], visible.shape[1]
    visible = jnp.broadcast_to(visible, (b1, h1, bq, g, bk))
    return visible.reshape(b1, h1, bq * g, bk)


def _evaluate_mask_fn(
    plan: Plan, mask_fn: MaskFn, consts: Sequence[Array], i: Array, j: Array
) -> Array:
    """``mask_fn`` on one block, as ``(B|1, Hkv|1, q_block, G|1, k_block)``."""
    bq, bk = plan.q_block, plan.k_block
    # Padded positions are clamped to real ones so that ``mask_fn`` may index arrays
    # of length Lq / Lk; padded keys are masked separately, padded queries discarded.
    q_idx = jnp.minimum(i * bq + jnp.arange(bq, dtype=jnp.int32), plan.q_len - 1)
    k_idx = jnp.minimum(j * bk + jnp.arange(bk, dtype=jnp.int32), plan.k_len - 1)
    b_idx = jnp.arange(plan.batch, dtype=jnp.int32)
    h_idx = jnp.arange(plan.query_heads, dtype=jnp.int32)
    out = mask_fn(
        b_idx[:, None, None, None],
        h_idx[None, :, None, None],
        q_idx[None, None, :, None],
        k_idx[None, None, None, :],
        *consts,
    )
    out = jnp.asarray(out)
    out = out.reshape((1,) * (4 - out.ndim) + out.shape)
    b1, h1 = out.shape[0], out.shape[1]
    out = jnp.broadcast_to(out, (b1, h1, bq, bk))
    if h1 == 1:
        return out[:, :, :, None, :]
    out = out.reshape(b1, plan.kv_heads, plan.groups, bq, bk)
    return out.transpose(0, 1, 3, 2, 4)


def _prescaled(plan: Plan, q_blk: Array) -> tuple[Array, float]:
    """A query block for the score matmul and the factor still to apply to its result.

    Scaling a float32 query block once saves a multiply over every score block of its
    loop; lower precision queries are not rounded again, their scores are scaled in
    float32 instead.
    """
    if q_blk.dtype == _F32:
        return q_blk * _F32(plan.scale), 1.0
    return q_blk, plan.scale


def _scores(q_blk: Array, k_blk: Array, scale: float) -> Array:
    s = jnp.einsum("bhrd,bhkd->bhrk", q_blk, k_blk, preferred_element_type=_F32)
    return s if scale == 1.0 else s * _F32(scale)


def _tables(blocks: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, np.ndarray]:
    width = max((len(b) for b in blocks), default=0)
    table = np.zeros((len(blocks), max(width, 1)), np.int32)
    for row, b in enumerate(blocks):
        table[row, : len(b)] = b
    counts = np.array([len(b) for b in blocks], np.int32)
    return table, counts


def _block_schedule(plan: Plan) -> tuple[tuple[Array, ...], bool, bool]:
    """The per-query-block inputs of the loop over query blocks (block index, full key
    blocks and their count, partial key blocks and their count), and whether any full or
    any partial block exists at all, shared by the forward and the backward pass."""
    full_table, full_count = _tables(plan.full)
    part_table, part_count = _tables(plan.partial)
    xs = (
        jnp.arange(plan.n_q_blocks, dtype=jnp.int32),
        jnp.asarray(full_table),
        jnp.asarray(full_count),
        jnp.asarray(part_table),
        jnp.asarray(part_count),
    )
    return xs, bool(full_count.any()), bool(part_count.any())


# --------------------------------------------------------------------------- forward


def _forward(
    plan: Plan, mask_fn: MaskFn | None, consts: Sequence[Array], q: Array, k: Array, v: Array
) -> tuple[Array, Array]:
    """Returns the output ``(B, Hkv, rows, dv)`` (float32) and the per-row log-sum-exp."""
    rows, bk = plan.rows_per_block, plan.k_block
    bsz, hkv = q.shape[0], q.shape[1]
    dv = v.shape[-1]
    xs, any_full, any_partial = _block_schedule(plan)

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

    def masked_update(carry, q_blk, score_scale, i, j):
        visible = _block_mask(plan, mask_fn, consts, i, j)
        if not plan.mask_on_device:
            return update(carry, q_blk, score_scale, j, visible)
        # The mask depends on traced values: skip the block on device when it is empty.
        return lax.cond(
            visible.any(), lambda c: update(c, q_blk, score_scale, j, visible), lambda c: c, carry
        )

    def one_query_block(xs):
        i, full_row, n_full, part_row, n_part = xs
        q_blk, score_scale = _prescaled(plan, lax.dynamic_slice_in_dim(q, i * rows, rows, axis=2))
        carry = (
            jnp.full((bsz, hkv, rows), -jnp.inf, _F32),
            jnp.zeros((bsz, hkv, rows), _F32),
            jnp.zeros((bsz, hkv, rows, dv), _F32),
        )
        if any_full:
            carry = lax.fori_loop(
                0, n_full, lambda t, c: update(c, q_blk, score_scale, full_row[t]), carry
            )
        if any_partial:
            carry = lax.fori_loop(
                0,
                n_part,
                lambda t, c: masked_update(c, q_blk, score_scale, i, part_row[t]),
                carry,
            )
        m, l, acc = carry
        empty = l == 0.0
        out = acc / jnp.where(empty, 1.0, l)[..., None]
        # +inf for rows without any visible key makes exp(s - lse) vanish in the backward.
        lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
        return out, lse

    out, lse = lax.map(one_query_block, xs)
    # (n_q_blocks, B, Hkv, rows, ...) -> (B, Hkv, n_q_blocks * rows, ...)
    out = jnp.moveaxis(out, 0, 2).reshape(bsz, hkv, -1, dv)
    lse = jnp.moveaxis(lse, 0, 2).reshape(bsz, hkv, -1)
    return out, lse


# -------------------------------------------------------------------------- backward


def _backward(
    plan: Plan,
    mask_fn: MaskFn | None,
    consts: Sequence[Array],
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    lse: Array,
    d_out: Array,
) -> tuple[Array, Array, Array]:
    """FlashAttention-2 style backward: recompute each scheduled block once."""
    rows, bk = plan.rows_per_block, plan.k_block
    bsz, hkv = q.shape[0], q.shape[1]
    d = q.shape[-1]
    dv = v.shape[-1]
    scale = _F32(plan.scale)
    xs, any_full, any_partial = _block_schedule(plan)
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

    def masked_update(carry, blk, i, j):
        visible = _block_mask(plan, mask_fn, consts, i, j)
        if not plan.mask_on_device:
            return update(carry, blk, j, visible)
        return lax.cond(visible.any(), lambda c: update(c, blk, j, visible), lambda c: c, carry)

    def one_query_block(acc, xs):
        i, full_row, n_full, part_row, n_part = xs
        start = i * rows
        q_blk = lax.dynamic_slice_in_dim(q, start, rows, axis=2)
        do_blk = lax.dynamic_slice_in_dim(d_out, start, rows, axis=2)
        blk = (
            *_prescaled(plan, q_blk),
            jnp.swapaxes(q_blk, 2, 3),
            do_blk,
            jnp.swapaxes(do_blk, 2, 3),
            lax.dynamic_slice_in_dim(lse, start, rows, axis=2),
            lax.dynamic_slice_in_dim(delta, start, rows, axis=2),
        )
        carry = (jnp.zeros((bsz, hkv, rows, d), _F32), *acc)
        if any_full:
            carry = lax.fori_loop(0, n_full, lambda t, c: update(c, blk, full_row[t]), carry)
        if any_partial:
            carry = lax.fori_loop(
                0, n_part, lambda t, c: masked_update(c, blk, i, part_row[t]), carry
            )
        dq_blk, dk_acc, dv_acc = carry
        return (dk_acc, dv_acc), dq_blk

    init = (
        jnp.zeros((bsz, hkv, d, k.shape[2]), _F32),
        jnp.zeros((bsz, hkv, dv, v.shape[2]), _F32),
    )
    (dk_t, dv_t), dq = lax.scan(one_query_block, init, xs)
    dq = jnp.moveaxis(dq, 0, 2).reshape(bsz, hkv, -1, d)
    dk = jnp.swapaxes(dk_t, 2, 3)
    dv_ = jnp.swapaxes(dv_t, 2, 3)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv_.astype(v.dtype)


# ------------------------------------------------------------------------ custom VJP


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def block_attention(
    plan: Plan, mask_fn: MaskFn | None, q: Array, k: Array, v: Array, consts: tuple
) -> Array:
    """Attention over the padded, kernel-layout inputs; output in ``q``'s dtype."""
    out, _ = _forward(plan, mask_fn, consts, q, k, v)
    return out.astype(q.dtype)


def _block_attention_fwd(plan, mask_fn, q, k, v, consts):
    out, lse = _forward(plan, mask_fn, consts, q, k, v)
    out = out.astype(q.dtype)
    return out, (q, k, v, consts, out, lse)


def _zero_cotangent(x: Array) -> Any:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def _block_attention_bwd(plan, mask_fn, residuals, d_out):
    q, k, v, consts, out, lse = residuals
    dq, dk, dv = _backward(plan, mask_fn, consts, q, k, v, out, lse, d_out)
    return dq, dk, dv, tuple(_zero_cotangent(c) for c in consts)


block_attention.defvjp(_block_attention_fwd, _block_attention_bwd)
