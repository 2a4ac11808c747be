"""Mosaic TPU backend, one ``pallas_call`` per pass (grids, BlockSpecs reading the
prefetched schedule) and the custom VJP that ties them together."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .._scores import backward_statistics, zero_cotangent
from ._kernels import dkdv_kernel, dq_kernel, forward_kernel
from ._lists import step_block
from ._tile import MosaicConfig

Array = Any
_F32 = jnp.float32


def _call(
    config: MosaicConfig,
    kernel: Callable[..., None],
    grid: tuple[int, ...],
    prefetch: tuple,
    consts: Sequence[Any],
    tile_spec: Callable[[tuple[bool, ...], bool], Any],
    inputs: Sequence[tuple[Any, Any]],
    outputs: Sequence[tuple[jax.ShapeDtypeStruct, Any]],
    scratch: Sequence[Any],
    name: str,
    semantics: Any,
) -> Any:
    """One ``pallas_call``: the prefetched schedule (``_lists``), the query offsets and
    dropout's seeds, then the reads of the closed-over
    arrays (``consts``, each a tile by ``tile_spec(along, query_row)``), then ``inputs``."""
    reads = (*config.mask_reads, *config.score_reads)
    in_specs = [tile_spec(r.along, r.query_row) for r in reads] + [spec for _, spec in inputs]
    params = pltpu.CompilerParams(
        dimension_semantics=semantics, vmem_limit_bytes=config.vmem_limit_bytes
    )
    call = pl.pallas_call(
        partial(kernel, config),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=grid,
            in_specs=in_specs,
            out_specs=[spec for _, spec in outputs],
            scratch_shapes=list(scratch),
        ),
        out_shape=[shape for shape, _ in outputs],
        interpret=config.interpret,
        compiler_params=params,
        name=name,
    )
    return call(*prefetch, *consts, *(x for x, _ in inputs))


def _tile(
    config: MosaicConfig, along: tuple[bool, ...], row: bool, b: Any, h: Any, i: Any, j: Any
) -> tuple[tuple, tuple]:
    """Block shape and index of tile ``(i, j)`` of an array that varies along some of
    (batch, head, query, key), 1 along the others; ``row``: a query row stored
    lane-dense ``(.., 1, Lq)``, whose tile is ``(1, query block)``."""
    along_b, along_h, along_q, along_k = along
    lead = (b if along_b else 0, h if along_h else 0)
    if row:
        return (None, None, 1, config.q_block), (*lead, 0, i)
    shape = (None, None, config.q_block if along_q else 1, config.k_block if along_k else 1)
    return shape, (*lead, i if along_q else 0, j if along_k else 0)


def _query_major_tile(config: MosaicConfig) -> Callable[..., Any]:
    """BlockSpecs of arrays that vary along some of (batch, head, query, key), 1 along
    the others (the bias, the reads of closed-over arrays): the tile ``(query block |
    1, key block | 1)`` at the listed key block of a query-major pass, grid ``(b, h, i,
    t)``."""

    def spec(along: tuple[bool, ...], row: bool = False) -> Any:
        def index(b, h, i, t, *refs):
            j = step_block(config, "kv", refs, b, h, i, t)[0]
            return _tile(config, along, row, b, h, i, j)[1]

        return pl.BlockSpec(_tile(config, along, row, 0, 0, 0, 0)[0], index)

    return spec


def _key_major_tile(config: MosaicConfig) -> Callable[..., Any]:
    """The same tiles in the dK/dV pass, grid ``(b, key/value head, j, group head, t)``."""

    def spec(along: tuple[bool, ...], row: bool = False) -> Any:
        def index(b, hk, j, gi, t, *refs):
            h = hk * config.groups + gi
            i = step_block(config, "q", refs, b, h, j, t)[0]
            return _tile(config, along, row, b, h, i, j)[1]

        return pl.BlockSpec(_tile(config, along, row, 0, 0, 0, 0)[0], index)

    return spec


def forward(
    config: MosaicConfig, q: Array, k: Array, v: Array, bias: Any, prefetch: tuple, consts: tuple
) -> tuple[Array, Array]:
    """``(out, lse)`` in kernel layout: ``(B, Hq, Lq_pad, dv)`` and, lane-dense,
    ``(B, Hq, 1, Lq_pad)`` (a ``(.., Lq_pad, 1)`` column would be padded to 128 lanes
    in HBM, 128 times its size)."""
    bsz, heads, lq, d = q.shape
    dv = v.shape[-1]
    bq, bk, g, steps = config.q_block, config.k_block, config.groups, config.kv_steps

    def key_block(b, h, i, t, *refs):
        j = step_block(config, "kv", refs, b, h, i, t)[0]
        return (b, lax.div(h, g), j, 0)

    def query_block(b, h, i, t, *_):
        return (b, h, i, 0)

    def query_row(b, h, i, t, *_):
        return (b, h, 0, i)

    tile = _query_major_tile(config)
    bias_along = config.scores.bias or (False,) * 4
    inputs = [] if bias is None else [(bias, tile(bias_along))]
    inputs += [
        (q, pl.BlockSpec((None, None, bq, d), query_block)),
        (k, pl.BlockSpec((None, None, bk, d), key_block)),
        (v, pl.BlockSpec((None, None, bk, dv), key_block)),
    ]
    outputs = [
        (
            jax.ShapeDtypeStruct((bsz, heads, lq, dv), q.dtype),
            pl.BlockSpec((None, None, bq, dv), query_block),
        ),
        (
            jax.ShapeDtypeStruct((bsz, heads, 1, lq), _F32),
            pl.BlockSpec((None, None, 1, bq), query_row),
        ),
    ]
    scratch = [pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, dv), _F32)]
    grid = (bsz, heads, config.n_q_blocks, steps)
    semantics = ("parallel", "parallel", "parallel", "arbitrary")
    out, lse = _call(
        config,
        forward_kernel,
        grid,
        prefetch,
        consts,
        tile,
        inputs,
        outputs,
        scratch,
        "block_attention_forward_tpu",
        semantics,
    )
    return out, lse


def backward(config, q, k, v, bias, out, lse, d_out, d_lse, kv_prefetch, q_prefetch, consts):
    """dQ, dK, dV and the bias gradient (``None`` without a bias) in kernel layout."""
    bsz, heads, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    bq, bk, g = config.q_block, config.k_block, config.groups
    lse, d_lse = backward_statistics(lse, d_lse)
    # Lane-dense rows (B, H, 1, Lq_pad), as the lse.
    delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1)[:, :, None, :] - d_lse
    steps = config.kv_steps

    def key_block(b, h, i, t, *refs):
        j = step_block(config, "kv", refs, b, h, i, t)[0]
        return (b, lax.div(h, g), j, 0)

    def query_block(b, h, i, t, *_):
        return (b, h, i, 0)

    def query_row(b, h, i, t, *_):
        return (b, h, 0, i)

    tile = _query_major_tile(config)
    bias_along = config.scores.bias or (False,) * 4
    inputs = [] if bias is None else [(bias, tile(bias_along))]
    inputs += [
        (q, pl.BlockSpec((None, None, bq, d), query_block)),
        (k, pl.BlockSpec((None, None, bk, d), key_block)),
        (v, pl.BlockSpec((None, None, bk, dv), key_block)),
        (d_out, pl.BlockSpec((None, None, bq, dv), query_block)),
        (lse, pl.BlockSpec((None, None, 1, bq), query_row)),
        (delta, pl.BlockSpec((None, None, 1, bq), query_row)),
    ]
    outputs = [
        (jax.ShapeDtypeStruct(q.shape, q.dtype), pl.BlockSpec((None, None, bq, d), query_block))
    ]
    if bias is not None:
        # Float32 per (b, h): rows of the bias gradient, owned by one program each.
        outputs.append(
            (
                jax.ShapeDtypeStruct((bsz, heads, lq, lk), _F32),
                pl.BlockSpec((None, None, bq, lk), query_block),
            )
        )
    semantics = ("parallel", "parallel", "parallel", "arbitrary")
    dq, *dbias = _call(
        config,
        dq_kernel,
        (bsz, heads, config.n_q_blocks, steps),
        kv_prefetch,
        consts,
        tile,
        inputs,
        outputs,
        [pltpu.VMEM((bq, d), _F32)],
        "block_attention_dq_tpu",
        semantics,
    )
    dk, dv_ = _dkdv(config, q, k, v, bias, d_out, lse, delta, q_prefetch, consts)
    d_bias = None
    if bias is not None:
        grad = dbias[0]
        axes = tuple(n for n in range(4) if bias.shape[n] == 1 and grad.shape[n] > 1)
        d_bias = grad.sum(axis=axes, keepdims=True).astype(bias.dtype)
    return dq, dk, dv_, d_bias


def _dkdv(config, q, k, v, bias, d_out, lse, delta, q_prefetch, consts):
    bsz, _, _, d = q.shape
    dv = v.shape[-1]
    bq, bk, g, steps = config.q_block, config.k_block, config.groups, config.q_steps

    # The grid is (b, key/value head, key block, query head of its group, listed query
    # block): dK and dV of one key block are summed over the group in scratch.
    def query_block(b, hk, j, gi, t, *refs):
        h = hk * g + gi
        i = step_block(config, "q", refs, b, h, j, t)[0]
        return (b, h, i, 0)

    def query_row(b, hk, j, gi, t, *refs):
        h = hk * g + gi
        i = step_block(config, "q", refs, b, h, j, t)[0]
        return (b, h, 0, i)

    def key_block(b, hk, j, *_):
        return (b, hk, j, 0)

    tile = _key_major_tile(config)
    inputs = [] if bias is None else [(bias, tile(config.scores.bias))]
    inputs += [
        (q, pl.BlockSpec((None, None, bq, d), query_block)),
        (k, pl.BlockSpec((None, None, bk, d), key_block)),
        (v, pl.BlockSpec((None, None, bk, dv), key_block)),
        (d_out, pl.BlockSpec((None, None, bq, dv), query_block)),
        (lse, pl.BlockSpec((None, None, 1, bq), query_row)),
        (delta, pl.BlockSpec((None, None, 1, bq), query_row)),
    ]
    outputs = [
        (jax.ShapeDtypeStruct(k.shape, k.dtype), pl.BlockSpec((None, None, bk, d), key_block)),
        (jax.ShapeDtypeStruct(v.shape, v.dtype), pl.BlockSpec((None, None, bk, dv), key_block)),
    ]
    scratch = [pltpu.VMEM((bk, d), _F32), pltpu.VMEM((bk, dv), _F32)]
    grid = (bsz, config.kv_heads, config.n_k_blocks, g, steps)
    semantics = ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
    dk, dv_ = _call(
        config,
        dkdv_kernel,
        grid,
        q_prefetch,
        consts,
        tile,
        inputs,
        outputs,
        scratch,
        "block_attention_dkdv_tpu",
        semantics,
    )
    return dk, dv_


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def kernel_attention(
    config: MosaicConfig,
    q: Array,
    k: Array,
    v: Array,
    bias: Any,
    kv_prefetch: tuple,
    q_prefetch: tuple,
    consts: tuple,
) -> tuple[Array, Array]:
    """Attention over padded kernel-layout inputs: output and lse ``(.., 1, Lq_pad)``."""
    return forward(config, q, k, v, bias, kv_prefetch, consts)


def _fwd(config, q, k, v, bias, kv_prefetch, q_prefetch, consts):
    out, lse = forward(config, q, k, v, bias, kv_prefetch, consts)
    return (out, lse), (q, k, v, bias, out, lse, kv_prefetch, q_prefetch, consts)


def _bwd(config, residuals, cotangents):
    q, k, v, bias, out, lse, kv_prefetch, q_prefetch, consts = residuals
    d_out, d_lse = cotangents
    dq, dk, dv, d_bias = backward(
        config, q, k, v, bias, out, lse, d_out, d_lse, kv_prefetch, q_prefetch, consts
    )
    rest = jax.tree_util.tree_map(zero_cotangent, (kv_prefetch, q_prefetch, consts))
    return (dq, dk, dv, d_bias, *rest)


kernel_attention.defvjp(_fwd, _bwd)
