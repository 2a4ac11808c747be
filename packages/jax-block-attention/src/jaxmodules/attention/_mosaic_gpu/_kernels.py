"""Mosaic GPU backend, the kernels: forward (with the lse), dQ and dK/dV, each a
``plgpu.kernel`` in the warp-specialised design of FlashAttention-3.

Every program owns one block of rows (``ROWS_PER_WG`` per consumer warpgroup, two
consumer warpgroups) and walks the block mask's plan for its row (``_blocks.row_walk``:
the band's ranges computed here from the offset, stored ranges, or lists): a producer
warpgroup streams the walked blocks of the other side into ``SLOTS`` shared-memory
slots by TMA, each slot guarded by a "ready" barrier (TMA completion) and a "consumed"
barrier (both consumers done with it); the consumers run ``wgmma`` from shared memory,
the partial blocks first (element-wise mask on the tile in registers), then the full
ones (none).

Compiled for an H100 (ptxas 13.0, sm_90a; forward and gradient at L=8192, 16 heads;
``benchmarks/compile_report``): every forward and dQ kernel, and the dK/dV kernel at
d=64, use no local memory; the dK/dV kernel at d=128 spills 20-36 B (332 B with
dropout): its two 64 x 128 float32 accumulators per consumer warpgroup leave little of
the 240 registers beside the score, dP and dS tiles. Not yet tuned on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .._band import in_band
from .._config import BlockConfig
from .._dropout import keep_tile, threshold
from .._scores import tile_score_gradients, tile_scores
from .._tile_program import evaluate_on_tile
from ._blocks import OFFSET, SEED, row_walk, table_row
from ._rules import MOSAIC_GPU

_F32 = jnp.float32
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
ROWS_PER_WG = 64  # wgmma's M per warpgroup
# Two consumer warpgroups of 64 rows over one producer, two slots: FlashAttention-3's
# Hopper layout, and jax's attention_mgpu's setting that compiles without spills
# (block_q=64 per warpgroup, two concurrent steps; 128 rows per warpgroup spilled).
CONSUMERS = 2  # consumer warpgroups per program
SLOTS = 2  # pipeline depth of the producer
# The 64K registers of an SM over 3 x 128 threads: the producer keeps 24 (the least
# setmaxnreg allows), each consumer thread 240 (128 x 24 + 256 x 240 = 64,512).
_PRODUCER_REGISTERS = 24
_CONSUMER_REGISTERS = 240


@dataclass(frozen=True, kw_only=True)
class KernelConfig(BlockConfig):
    """What is static about one call: the shared ``BlockConfig``, heads, the padded
    head dimensions, and whether the kernels run in GPU interpret mode."""

    q_heads: int
    kv_heads: int
    head_dim: int  # both padded to this width
    key_dim: int
    value_dim: int
    interpret: bool
    # Tables kept per batch row and query head (dropout's seed rides in their header).
    per_head_tables: bool = False

    @property
    def groups(self) -> int:
        return self.q_heads // self.kv_heads


def _transforms() -> tuple:
    # 128-byte swizzle over 64 16-bit columns: wgmma's shared-memory operand layout.
    tiling = plgpu.TilingTransform((8, 64))  # type: ignore[abstract]
    return (tiling, plgpu.SwizzleTransform(128))  # type: ignore[abstract]


def _reduce_layout(axis: int) -> Any:
    return plgpu.Layout.WGMMA.reduce(axis)


def _filled(shape: tuple[int, ...], value: float, layout: Any) -> Any:
    return plgpu.layout_cast(jnp.full(shape, value, _F32), layout)


def _table_row(table_ref: Any, config: KernelConfig, row: Any, smem: Any, barrier: Any) -> None:
    """The program's table row into shared memory, copied by the producer, awaited by
    every warpgroup (the mask is kept per batch row / head, or shared)."""
    b, h = lax.axis_index("b"), lax.axis_index("h")
    bm = b if config.mask_batch > 1 or config.per_head_tables else 0
    hm = h if config.mask_heads > 1 or config.per_head_tables else 0

    @pl.when(lax.axis_index("wg") == CONSUMERS)
    def _copy() -> None:
        plgpu.copy_gmem_to_smem(table_ref.at[bm, hm, table_row(config, row)], smem, barrier)

    plgpu.barrier_wait(barrier)


def _produce(
    walk: tuple, loads: list[tuple[Callable[[Any], Any], Any]], ready: Any, consumed: Any
) -> None:
    """The producer warpgroup: every walked block's operands by TMA into a free slot
    (``walk``: ``_blocks.row_walk``'s; ``loads``: for each operand, its global view of a
    block index and its slots)."""
    plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
    count, _, block_at = walk

    @pl.loop(0, count)
    def _step(t: Any) -> None:
        slot = lax.rem(t, SLOTS)
        block = block_at(t)

        @pl.when(t >= SLOTS)
        def _wait() -> None:
            plgpu.barrier_wait(consumed.at[slot])

        for i, (view, slots) in enumerate(loads):
            plgpu.copy_gmem_to_smem(view(block), slots.at[slot], ready[i].at[slot])


def _positions(
    config: KernelConfig, shape: tuple[int, int], q_first: Any, k_first: Any, transposed: bool
) -> tuple[Any, Any]:
    """Query and key positions of a tile (queries along axis 0, or 1 when transposed);
    padded query rows repeat the last real one so that a ``mask_fn`` may index arrays of
    length ``Lq`` (their results are dropped)."""
    qa, ka = (1, 0) if transposed else (0, 1)
    layout = plgpu.Layout.WGMMA
    q = plgpu.broadcasted_iota(jnp.int32, shape, qa, layout=layout) + q_first
    k = plgpu.broadcasted_iota(jnp.int32, shape, ka, layout=layout) + k_first
    return q, k


def tile_visible(config: KernelConfig, q: Any, k: Any, offset: Any) -> Any:
    """The element-wise mask of a partial tile (band, key padding, ``mask_fn``) on
    full-tile position arrays; ``q`` before the offset."""
    q_pos = jnp.minimum(q, config.q_len - 1) + offset
    visible = in_band(q_pos, k, config.lo, config.hi, config.k_len)
    if config.program is not None:
        b = lax.axis_index("b")
        h = lax.axis_index("h") if config.mask_heads > 1 else 0
        k_safe = jnp.minimum(k, config.k_len - 1)
        index = [jnp.asarray(x, jnp.int32) for x in (b, h, q_pos, k_safe)]
        custom = evaluate_on_tile(config.program, (), (), *index, lowerable=MOSAIC_GPU)
        visible = visible & custom
    return visible


def _score_mod(config: KernelConfig, q_pos: Any, k: Any) -> Any:
    """``score_mod`` on a tile as the shared score pipeline takes it (``f(s2)``), or
    ``None``; its program closes over no arrays (the plug-in refuses those)."""
    program = config.scores.score
    if program is None:
        return None
    b, h = lax.axis_index("b"), lax.axis_index("h")
    k_safe = jnp.minimum(k, config.k_len - 1)

    def score_mod(s2: Any, values: Any = None) -> Any:
        del values  # no differentiable arrays
        out = evaluate_on_tile(program, (), (), s2, b, h, q_pos, k_safe, lowerable=MOSAIC_GPU)
        return jnp.broadcast_to(out, s2.shape).astype(_F32)

    return score_mod


def tile(
    config: KernelConfig,
    raw: Any,
    first: tuple[Any, Any],
    table: Any,
    masked: bool,
    transposed: bool = False,
    gradient: bool = False,
) -> tuple[Any, Callable[[Any], Any], Any]:
    """The base-2 final scores of a tile from its raw products ``q . k`` (``-inf``
    where a partial block's mask hides them), and the map from the gradient of the
    final scores to that of the scaled products ``s0`` (the shared score pipeline,
    ``_scores.tile_scores``). ``first``: the tile's first query and key positions
    (before the offset); ``table``: the program's table row (the offset, dropout's
    seed). Also dropout's keep decisions as a function that computes them (``None``
    without dropout): called where they are used rather than kept in registers.

    ``gradient`` (the backward passes): the derivative of the final scores with respect
    to ``s0`` is taken now, in the same forward-mode pass as the scores (``score_mod``
    and the cap are element-wise), so that the map is one product and neither ``s0``
    nor the positions stay live until the gradient arrives."""
    scores = config.scores
    s0 = raw * _F32(config.scale)
    if not (masked or scores.changes_scores or scores.dropout_rate):
        return s0 * _F32(LOG2E), lambda ds: ds, None
    offset = table[OFFSET]
    q, k = _positions(config, raw.shape, first[0], first[1], transposed)
    keep: Callable[[], Any] | None = None
    if scores.dropout_rate:

        def decisions() -> Any:
            q, k = _positions(config, raw.shape, first[0], first[1], transposed)
            seed = table[SEED].astype(jnp.uint32)  # the same bits (two's complement)
            q_pos = jnp.minimum(q, config.q_len - 1) + table[OFFSET]
            return keep_tile(seed, q_pos, k, threshold(scores.dropout_rate))

        keep = decisions

    mod = _score_mod(config, jnp.minimum(q, config.q_len - 1) + offset, k)
    back: Callable[[Any], Any] = lambda ds: ds  # noqa: E731
    if gradient and scores.changes_scores:
        ones = jnp.ones_like(s0)
        s, slope = jax.jvp(lambda x: tile_scores(scores, x, None, mod), (s0,), (ones,))
        back = lambda ds: ds * slope  # noqa: E731
        s = s * _F32(LOG2E)
    else:
        s = tile_scores(scores, s0, None, mod) * _F32(LOG2E)
        if scores.changes_scores:

            def back(ds: Any) -> Any:
                return tile_score_gradients(scores, s0, None, ds, mod)[0]

    if masked:
        s = jnp.where(tile_visible(config, q, k, offset), s, -jnp.inf)
    return s, back, keep


def kept(config: KernelConfig, keep: Any, x: Any) -> Any:
    """``x`` where dropout keeps the weight (``keep()``), scaled by ``1 / (1 - rate)``;
    0 elsewhere (``x`` itself without dropout)."""
    if keep is None:
        return x
    return jnp.where(keep(), x * _F32(1.0 / (1.0 - config.scores.dropout_rate)), 0.0)


def _matmul(a: Any, b: Any, shape: tuple[int, int]) -> Any:
    """``a @ b`` by wgmma into a float32 accumulator (``a`` in registers or shared
    memory, ``b`` in shared memory)."""

    def body(acc_ref: Any) -> Any:
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, _F32))


def _accumulate(acc: Any, a: Any, b: Any) -> Any:
    """``acc + a @ b`` by wgmma."""

    def body(acc_ref: Any) -> None:
        plgpu.wgmma(acc_ref, a, b)

    return pl.run_state(body)(plgpu.ACC.init(acc))


def _consume(walk: tuple, step: Callable[..., Any], carry: Any) -> Any:
    """The consumers' walk (``_blocks.row_walk``'s): partial blocks (masked) first, then
    full blocks."""
    count, n_partial, block_at = walk

    def at(masked: bool) -> Callable[[Any, Any], Any]:
        def body(t: Any, c: Any) -> Any:
            return step(t, lax.rem(t, SLOTS), block_at(t), masked, c)

        return body

    carry = lax.fori_loop(0, n_partial, at(True), carry)
    return lax.fori_loop(n_partial, count, at(False), carry)


# ------------------------------------------------------------------------------ forward


def forward(config: KernelConfig, q: Any, k: Any, v: Any, table: Any) -> tuple[Any, Any]:
    """``(out, lse)`` of padded ``q (B, Lq', Hq, d')``, ``k``/``v (B, Lk', Hkv, d')``: the
    output in ``q``'s dtype, the lse ``(B, Hq, Lq')`` in natural log, ``-inf`` on rows
    without a visible key."""
    bsz, q_pad_len, q_heads, d = q.shape
    dv = v.shape[-1]
    bq, bk = config.q_block, config.k_block
    rows = ROWS_PER_WG
    width = table.shape[-1]
    dtype = q.dtype

    def body(q_ref, k_ref, v_ref, table_ref, out_ref, lse_ref, scratch):
        (q_smem, k_smem, v_smem, lse_smem, t_smem), (t_bar, q_bar, ready, consumed) = scratch
        wg = lax.axis_index("wg")
        b, h, qb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("qb")
        _table_row(table_ref, config, qb, t_smem, t_bar.at[0])
        walk = row_walk(config, t_smem, qb, "kv")
        kv_head = lax.div(h, jnp.int32(config.groups))

        @pl.when(wg == CONSUMERS)
        def _producer() -> None:
            loads = [
                (lambda j: k_ref.at[b, pl.ds(j * bk, bk), kv_head], k_smem),
                (lambda j: v_ref.at[b, pl.ds(j * bk, bk), kv_head], v_smem),
            ]
            _produce(walk, loads, ready, consumed)

        @pl.when(wg < CONSUMERS)
        def _consumer() -> None:
            plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")
            first = qb * bq + wg * rows
            my_q = q_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(first, rows), h], my_q, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])

            def step(t, slot, block, masked, carry):
                m, l, acc = carry
                plgpu.barrier_wait(ready[0].at[slot])
                raw = _matmul(my_q, k_smem.at[slot].T, (rows, bk))
                s, _, keep = tile(config, raw, (first, block * bk), t_smem, masked)
                m_new = jnp.maximum(m, s.max(axis=1))
                m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_shift, s.shape, [0]))
                alpha = jnp.exp2(m - m_shift)
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                plgpu.barrier_wait(ready[1].at[slot])
                acc = _accumulate(acc, kept(config, keep, p).astype(dtype), v_smem.at[slot])
                plgpu.barrier_arrive(consumed.at[slot])
                return m_new, l, acc

            carry = (
                _filled((rows,), -jnp.inf, _reduce_layout(1)),
                _filled((rows,), 0.0, _reduce_layout(1)),
                _filled((rows, dv), 0.0, plgpu.Layout.WGMMA),
            )
            m, l, acc = _consume(walk, step, carry)
            empty = l == 0.0
            safe = jnp.where(empty, 1.0, l)
            out = acc / lax.broadcast_in_dim(safe, acc.shape, [0])
            lse = jnp.where(empty, -jnp.inf, (m + jnp.log2(safe)) * _F32(LN2))
            o_smem = my_q  # the wrapper pads d and dv to one width
            o_smem[...] = out.astype(dtype)
            lse_smem.at[wg][...] = lse
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, out_ref.at[b, pl.ds(first, rows), h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(first, rows)])
            plgpu.wait_smem_to_gmem(0)

    tr = _transforms()
    scratch = (
        (
            plgpu.SMEM((CONSUMERS, rows, d), dtype, transforms=tr),
            plgpu.SMEM((SLOTS, bk, d), dtype, transforms=tr),
            plgpu.SMEM((SLOTS, bk, dv), dtype, transforms=tr),
            plgpu.SMEM((CONSUMERS, rows), _F32),
            plgpu.SMEM((width,), jnp.int32),
        ),
        (
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_barriers=CONSUMERS),
            (plgpu.Barrier(num_barriers=SLOTS),) * 2,
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=SLOTS),
        ),
    )
    return _launch(
        config,
        body,
        (q, k, v, table),
        (
            jax.ShapeDtypeStruct((bsz, q_pad_len, q_heads, dv), dtype),
            jax.ShapeDtypeStruct((bsz, q_heads, q_pad_len), _F32),
        ),
        scratch,
        q_pad_len // bq,
        bsz,
        q_heads,
        "forward",
    )


def _launch(
    config: KernelConfig,
    body: Callable,
    args: tuple,
    out: tuple,
    scratch: tuple,
    rows_grid: int,
    bsz: int,
    heads: int,
    name: str,
) -> Any:
    """Runs ``body`` over the grid ``(row blocks, heads, batch)`` with ``CONSUMERS`` + 1
    warpgroups, compiled or in GPU interpret mode."""
    interpret = plgpu.InterpretGPUParams() if config.interpret else None

    def entry(*refs: Any) -> None:
        n = len(args) + len(out)
        ins_outs, _ = refs[:n], refs[n:]
        pl.run_scoped(
            lambda *s: body(*ins_outs, s),
            *scratch,
            collective_axes="wg",
        )

    # The kernel's name in compiled programs and ptxas logs: jaxmodules_<pass>.
    entry.__name__ = f"jaxmodules_{name}"

    kernel = plgpu.kernel(
        entry,
        out_type=out,
        grid=(rows_grid, heads, bsz),
        grid_names=("qb", "h", "b"),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )
    if not config.interpret:
        return kernel(*args)
    # Interpret mode threads an ordered IO effect through the program, which a
    # platform_dependent lowered for a GPU (its branch pruned) cannot carry: the
    # simulation runs as a pure host callback of its own jitted CPU program instead.
    simulate = jax.jit(kernel)
    return jax.pure_callback(lambda *a: simulate(*a), out, *args)


# ----------------------------------------------------------------------------- backward


def _scratch_barriers(n_ready: int, own: int) -> tuple:
    """Barriers: the table row's, the consumers' own operands' (``own`` per consumer),
    ``n_ready`` ready barriers per slot and the consumed ones."""
    return (
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_barriers=CONSUMERS * own),
        (plgpu.Barrier(num_barriers=SLOTS),) * n_ready,
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=SLOTS),
    )


def dq(
    config: KernelConfig, q: Any, k: Any, v: Any, do: Any, lse2: Any, delta: Any, table: Any
) -> Any:
    """dQ of padded inputs (``lse2``: base-2 lse, ``+inf`` on empty rows; ``delta``:
    the rows' ``dO . O``), walking each query block's key blocks."""
    bsz, q_pad_len, q_heads, d = q.shape
    bk, rows, dtype = config.k_block, ROWS_PER_WG, q.dtype

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, table_ref, dq_ref, scratch):
        (q_smem, do_smem, stat_smem, k_smem, v_smem, t_smem), bars = scratch
        t_bar, own_bar, ready, consumed = bars
        wg = lax.axis_index("wg")
        b, h, qb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("qb")
        _table_row(table_ref, config, qb, t_smem, t_bar.at[0])
        walk = row_walk(config, t_smem, qb, "kv")
        kv_head = lax.div(h, jnp.int32(config.groups))

        @pl.when(wg == CONSUMERS)
        def _producer() -> None:
            loads = [
                (lambda j: k_ref.at[b, pl.ds(j * bk, bk), kv_head], k_smem),
                (lambda j: v_ref.at[b, pl.ds(j * bk, bk), kv_head], v_smem),
            ]
            _produce(walk, loads, ready, consumed)

        @pl.when(wg < CONSUMERS)
        def _consumer() -> None:
            plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")
            first = qb * config.q_block + wg * rows
            mine = (b, pl.ds(first, rows), h)
            stats = (b, h, pl.ds(first, rows))
            my_q, my_do = q_smem.at[wg], do_smem.at[wg]
            copies = (
                (q_ref.at[mine], my_q),
                (do_ref.at[mine], my_do),
                (lse_ref.at[stats], stat_smem.at[wg, 0]),
                (delta_ref.at[stats], stat_smem.at[wg, 1]),
            )
            for i, (src, dst) in enumerate(copies):
                plgpu.copy_gmem_to_smem(src, dst, own_bar.at[wg * 4 + i])
            for i in range(4):
                plgpu.barrier_wait(own_bar.at[wg * 4 + i])
            lse = plgpu.load(stat_smem.at[wg, 0], layout=_reduce_layout(1))
            dlt = plgpu.load(stat_smem.at[wg, 1], layout=_reduce_layout(1))

            def step(t, slot, block, masked, acc):
                plgpu.barrier_wait(ready[0].at[slot])
                plgpu.barrier_wait(ready[1].at[slot])
                # The key block in slices of 64 (as the dK/dV kernel slices queries).
                for part in range(bk // rows):
                    at = pl.ds(part * rows, rows)
                    k_t, v_t = k_smem.at[slot, at], v_smem.at[slot, at]
                    raw = _matmul(my_q, k_t.T, (rows, rows))
                    at_k = block * bk + part * rows
                    s, back, keep = tile(config, raw, (first, at_k), t_smem, masked, gradient=True)
                    p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
                    dp = kept(config, keep, _matmul(my_do, v_t.T, (rows, rows)))
                    ds = back(p * (dp - lax.broadcast_in_dim(dlt, s.shape, [0])))
                    acc = _accumulate(acc, ds.astype(dtype), k_t)
                plgpu.barrier_arrive(consumed.at[slot])
                return acc

            acc = _consume(walk, step, _filled((rows, d), 0.0, plgpu.Layout.WGMMA))
            my_q[...] = (acc * _F32(config.scale)).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_q, dq_ref.at[mine])
            plgpu.wait_smem_to_gmem(0)

    tr = _transforms()
    scratch = (
        (
            plgpu.SMEM((CONSUMERS, rows, d), dtype, transforms=tr),
            plgpu.SMEM((CONSUMERS, rows, d), dtype, transforms=tr),
            plgpu.SMEM((CONSUMERS, 2, rows), _F32),
            plgpu.SMEM((SLOTS, bk, d), dtype, transforms=tr),
            plgpu.SMEM((SLOTS, bk, d), dtype, transforms=tr),
            plgpu.SMEM((table.shape[-1],), jnp.int32),
        ),
        _scratch_barriers(2, 4),
    )
    out = jax.ShapeDtypeStruct(q.shape, dtype)
    args = (q, k, v, do, lse2, delta, table)
    return _launch(
        config, body, args, (out,), scratch, q_pad_len // config.q_block, bsz, q_heads, "dq"
    )[0]


def dkdv(
    config: KernelConfig, q: Any, k: Any, v: Any, do: Any, lse2: Any, delta: Any, table: Any
) -> tuple[Any, Any]:
    """dK and dV per query head ``(B, Lk', Hq, d')`` (summed over a GQA group by the
    caller), walking each key block's query blocks."""
    bsz, k_pad_len, _, d = k.shape
    q_heads = q.shape[2]
    bq, rows, dtype = config.q_block, ROWS_PER_WG, q.dtype
    # Query slices of 64 rows: wgmma's K (the slice, for dV and dK) is a multiple of 64
    # for 16-bit operands in 128-byte swizzle.
    cols = 64

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, table_ref, dk_ref, dv_ref, scratch):
        (k_smem, v_smem, q_slots, do_slots, lse_slots, dl_slots, t_smem), bars = scratch
        t_bar, own_bar, ready, consumed = bars
        wg = lax.axis_index("wg")
        b, h, kb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("qb")
        _table_row(table_ref, config, kb, t_smem, t_bar.at[0])
        walk = row_walk(config, t_smem, kb, "q")
        kv_head = lax.div(h, jnp.int32(config.groups))

        @pl.when(wg == CONSUMERS)
        def _producer() -> None:
            loads = [
                (lambda i: q_ref.at[b, pl.ds(i * bq, bq), h], q_slots),
                (lambda i: do_ref.at[b, pl.ds(i * bq, bq), h], do_slots),
                (lambda i: lse_ref.at[b, h, pl.ds(i * bq, bq)], lse_slots),
                (lambda i: delta_ref.at[b, h, pl.ds(i * bq, bq)], dl_slots),
            ]
            _produce(walk, loads, ready, consumed)

        @pl.when(wg < CONSUMERS)
        def _consumer() -> None:
            plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")
            first = kb * config.k_block + wg * rows
            mine = (b, pl.ds(first, rows), kv_head)
            my_k, my_v = k_smem.at[wg], v_smem.at[wg]
            plgpu.copy_gmem_to_smem(k_ref.at[mine], my_k, own_bar.at[wg * 2])
            plgpu.copy_gmem_to_smem(v_ref.at[mine], my_v, own_bar.at[wg * 2 + 1])
            plgpu.barrier_wait(own_bar.at[wg * 2])
            plgpu.barrier_wait(own_bar.at[wg * 2 + 1])

            def step(t, slot, block, masked, carry):
                for r in ready:
                    plgpu.barrier_wait(r.at[slot])

                # The query block in slices of ``cols``, a loop rather than unrolled:
                # four 64 x 128 float32 tiles live at once spilled at d=64, and the
                # unrolled slices at d=128 (ptxas for sm_90a).
                def part(i, accs):
                    dk_acc, dv_acc = accs
                    at = pl.ds(pl.multiple_of(i * cols, cols), cols)
                    q_t, do_t = q_slots.at[slot, at], do_slots.at[slot, at]
                    raw = _matmul(my_k, q_t.T, (rows, cols))
                    at_q = block * bq + i * cols
                    s, back, keep = tile(
                        config, raw, (at_q, first), t_smem, masked, True, gradient=True
                    )
                    # The rows' statistics loaded where used (each is 16 registers a
                    # thread as a column of the tile's layout).
                    lse = plgpu.load(lse_slots.at[slot, at], layout=_reduce_layout(0))
                    p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [1]))
                    dv_acc = _accumulate(dv_acc, kept(config, keep, p).astype(dtype), do_t)
                    dp = kept(config, keep, _matmul(my_v, do_t.T, (rows, cols)))
                    dlt = plgpu.load(dl_slots.at[slot, at], layout=_reduce_layout(0))
                    ds = back(p * (dp - lax.broadcast_in_dim(dlt, s.shape, [1])))
                    return _accumulate(dk_acc, ds.astype(dtype), q_t), dv_acc

                dk_acc, dv_acc = lax.fori_loop(0, bq // cols, part, carry)
                plgpu.barrier_arrive(consumed.at[slot])
                return dk_acc, dv_acc

            zeros = _filled((rows, d), 0.0, plgpu.Layout.WGMMA)
            dk_acc, dv_acc = _consume(walk, step, (zeros, zeros))
            my_k[...] = (dk_acc * _F32(config.scale)).astype(dtype)
            my_v[...] = dv_acc.astype(dtype)
            plgpu.commit_smem()
            out_at = (b, pl.ds(first, rows), h)
            plgpu.copy_smem_to_gmem(my_k, dk_ref.at[out_at])
            plgpu.copy_smem_to_gmem(my_v, dv_ref.at[out_at])
            plgpu.wait_smem_to_gmem(0)

    tr = _transforms()
    scratch = (
        (
            plgpu.SMEM((CONSUMERS, rows, d), dtype, transforms=tr),
            plgpu.SMEM((CONSUMERS, rows, d), dtype, transforms=tr),
            plgpu.SMEM((SLOTS, bq, d), dtype, transforms=tr),
            plgpu.SMEM((SLOTS, bq, d), dtype, transforms=tr),
            plgpu.SMEM((SLOTS, bq), _F32),
            plgpu.SMEM((SLOTS, bq), _F32),
            plgpu.SMEM((table.shape[-1],), jnp.int32),
        ),
        _scratch_barriers(4, 2),
    )
    out = jax.ShapeDtypeStruct((bsz, k_pad_len, q_heads, d), dtype)
    args = (q, k, v, do, lse2, delta, table)
    return tuple(
        _launch(
            config,
            body,
            args,
            (out, out),
            scratch,
            k_pad_len // config.k_block,
            bsz,
            q_heads,
            "dkdv",
        )
    )
