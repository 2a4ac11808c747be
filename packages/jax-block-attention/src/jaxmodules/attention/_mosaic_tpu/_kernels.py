"""Mosaic TPU backend, the kernel bodies: forward, dQ and dK/dV.

Every kernel's innermost grid axis walks one row of the scalar-prefetched schedule
(``_lists``: the band's ranges by arithmetic, stored ranges, or lists); a step past the
row's count does nothing (its block index repeats the last one, so the pipeline copies
nothing new). Full blocks skip the element-wise mask.
Statistics and accumulators live in VMEM scratch, float32, across the steps of a row.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _tile as tm
from ._lists import WALK_ARRAYS, step_block
from ._tile import MosaicConfig

Array = Any
_F32 = jnp.float32


def _split(config: MosaicConfig, refs: tuple) -> tuple:
    """Prefetched schedule (then query offsets and dropout seeds), ``mask_fn`` arrays,
    ``score_mod`` arrays, the bias (or ``None``), then the pass's own refs."""
    n = WALK_ARRAYS[config.walk] + 2
    lists, refs = refs[:n], refs[n:]
    n_mask, n_score = len(config.mask_reads), len(config.score_reads)
    mask_refs, score_refs = refs[:n_mask], refs[n_mask : n_mask + n_score]
    rest = refs[n_mask + n_score :]
    bias_ref = None
    if config.scores.bias is not None:
        bias_ref, rest = rest[0], rest[1:]
    return lists, mask_refs, score_refs, bias_ref, rest


def _seed(config: MosaicConfig, seeds_ref: Any, b: Array, h: Array) -> Array | None:
    """Dropout's seed of ``(b, h)`` (prefetched as int32), or ``None``."""
    if not config.scores.dropout_rate:
        return None
    word = seeds_ref[b * config.q_heads + h]
    return lax.bitcast_convert_type(word, jnp.uint32)


def _column(row_ref: Any) -> Array:
    """A lane-dense ``(1, rows)`` block of per-row statistics as the ``(rows, 1)``
    column the tile math broadcasts (the relayout splash attention's dQ kernel makes)."""
    return jnp.expand_dims(row_ref[0], -1)


def _row(column: Array) -> Array:
    """The ``(1, rows)`` lane-dense row of a ``(rows, 1)`` column."""
    return jnp.expand_dims(column[:, 0], 0)


def _bias(bias_ref: Any) -> Array | None:
    return None if bias_ref is None else bias_ref[...].astype(_F32)


def _when_listed(active: Array, is_full: Array, body: Any) -> None:
    """``body(masked)`` on a listed step: unmasked on a full block, masked otherwise."""

    @pl.when(active & is_full)
    def _() -> None:
        body(False)

    @pl.when(active & jnp.logical_not(is_full))
    def _() -> None:
        body(True)


def forward_kernel(config: MosaicConfig, *refs: Any) -> None:
    lists, mask_refs, score_refs, bias_ref, rest = _split(config, refs)
    q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
    b, h, i, t = (pl.program_id(n) for n in range(4))
    mb = tm.mask_row(config, b, h)[0]
    j, active, is_full = step_block(config, "kv", lists, b, h, i, t)

    @pl.when(t == 0)
    def _() -> None:
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, _F32)
        l_sc[...] = jnp.zeros(l_sc.shape, _F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

    def step(masked: bool) -> None:
        q_pos, k_pos = tm.positions(config, i, j, lists[-2][mb])
        s0 = tm.matmul_t(q_ref[...], k_ref[...]) * _F32(config.scale)
        mod = tm.score_mod(config, score_refs, b, h, q_pos, k_pos)
        s = tm.scores(config, s0, _bias(bias_ref), mod)
        if masked:
            s = jnp.where(tm.visible(config, mask_refs, b, h, q_pos, k_pos), s, -jnp.inf)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        # A row that has seen no visible key keeps m = -inf: shift by 0 so exp gives 0.
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - shift)
        alpha = jnp.exp(m_prev - shift)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        keep = tm.keep(config, _seed(config, lists[-1], b, h), q_pos, k_pos)
        if keep is not None:
            p = jnp.where(keep, p, 0.0)
        v = v_ref[...]
        acc_sc[...] = alpha * acc_sc[...] + tm.matmul(p.astype(v.dtype), v)
        m_sc[...] = m_new

    _when_listed(active, is_full, step)

    @pl.when(t == config.kv_steps - 1)
    def _() -> None:
        l = l_sc[...]
        empty = l == 0.0
        safe = jnp.where(empty, 1.0, l)
        out = acc_sc[...] / safe
        if config.scores.dropout_rate:
            out = out * _F32(tm.dropout_scale(config))
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = _row(jnp.where(empty, -jnp.inf, m_sc[...] + jnp.log(safe)))


def _tile_gradient(
    config: MosaicConfig,
    refs: tuple,
    tile: tuple[Array, Array, Array, Array],
    blocks: tuple[Array, Array, Array, Array, Array, Array],
    masked: bool,
) -> tuple[Array, Array]:
    """Kept probabilities ``p`` (times dropout's scale) and the gradient ``ds`` of
    ``s0 = scale * q.k`` on one ``(query block, key block)`` tile."""
    lists, mask_refs, score_refs, bias_ref = refs
    b, h, i, j = tile
    q, k, v, do, lse, delta = blocks
    mb = tm.mask_row(config, b, h)[0]
    q_pos, k_pos = tm.positions(config, i, j, lists[-2][mb])
    s0 = tm.matmul_t(q, k) * _F32(config.scale)
    bias = _bias(bias_ref)
    mod = tm.score_mod(config, score_refs, b, h, q_pos, k_pos)
    s = tm.scores(config, s0, bias, mod)
    # lse is +inf on rows without a visible key: p = 0 there.
    p = jnp.exp(s - lse)
    seen = tm.visible(config, mask_refs, b, h, q_pos, k_pos) if masked else None
    if seen is not None:
        p = jnp.where(seen, p, 0.0)
    dp = tm.matmul_t(do, v)
    keep = tm.keep(config, _seed(config, lists[-1], b, h), q_pos, k_pos)
    if keep is not None:
        scale = _F32(tm.dropout_scale(config))
        dp = jnp.where(keep, dp * scale, 0.0)
        p_kept = jnp.where(keep, p * scale, 0.0)
    else:
        p_kept = p
    ds = tm.score_gradient(config, s0, bias, p * (dp - delta), mod)
    if seen is not None and config.scores.changes_scores:
        ds = jnp.where(seen, ds, 0.0)
    return p_kept, ds


def dq_kernel(config: MosaicConfig, *refs: Any) -> None:
    lists, mask_refs, score_refs, bias_ref, rest = _split(config, refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *rest = rest
    dbias_ref = rest[0] if bias_ref is not None else None
    dq_sc = rest[-1]
    b, h, i, t = (pl.program_id(n) for n in range(4))
    j, active, is_full = step_block(config, "kv", lists, b, h, i, t)

    @pl.when(t == 0)
    def _() -> None:
        dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)
        if dbias_ref is not None:
            # This program owns these rows of the bias gradient: unlisted blocks are 0.
            dbias_ref[...] = jnp.zeros(dbias_ref.shape, _F32)

    def step(masked: bool) -> None:
        k = k_ref[...]
        blocks = (q_ref[...], k, v_ref[...], do_ref[...], _column(lse_ref), _column(delta_ref))
        refs4 = (lists, mask_refs, score_refs, bias_ref)
        _, ds = _tile_gradient(config, refs4, (b, h, i, j), blocks, masked)
        if dbias_ref is not None:
            bk = config.k_block
            dbias_ref[:, pl.ds(pl.multiple_of(j * bk, bk), bk)] = ds
        dq_sc[...] += tm.matmul(ds.astype(k.dtype), k)

    _when_listed(active, is_full, step)

    @pl.when(t == config.kv_steps - 1)
    def _() -> None:
        # The scale of s0 = scale * q.k, applied once.
        dq_ref[...] = (dq_sc[...] * _F32(config.scale)).astype(dq_ref.dtype)


def dkdv_kernel(config: MosaicConfig, *refs: Any) -> None:
    lists, mask_refs, score_refs, bias_ref, rest = _split(config, refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc = rest
    b, hk, j, g, t = (pl.program_id(n) for n in range(5))
    h = hk * config.groups + g
    i, active, is_full = step_block(config, "q", lists, b, h, j, t)

    @pl.when((g == 0) & (t == 0))
    def _() -> None:
        dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)

    def step(masked: bool) -> None:
        q, do = q_ref[...], do_ref[...]
        blocks = (q, k_ref[...], v_ref[...], do, _column(lse_ref), _column(delta_ref))
        refs4 = (lists, mask_refs, score_refs, bias_ref)
        p, ds = _tile_gradient(config, refs4, (b, h, i, j), blocks, masked)
        dv_sc[...] += tm.matmul_tn(p.astype(do.dtype), do)
        dk_sc[...] += tm.matmul_tn(ds.astype(q.dtype), q)

    _when_listed(active, is_full, step)

    @pl.when((g == config.groups - 1) & (t == config.q_steps - 1))
    def _() -> None:
        dk_ref[...] = (dk_sc[...] * _F32(config.scale)).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)
