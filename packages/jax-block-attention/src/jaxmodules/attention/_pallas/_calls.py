"""Pallas backend, the ``pallas_call``s of each pass and their custom VJP."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from .._scores import backward_statistics, merge_by_lse, zero_cotangent
from ._kernels import _dkdv_kernel, _dq_kernel, _forward_kernel
from ._tile_math import TileConfig, _array_grad_width
from ._tile_program import PallasUnsupportedError

Array = Any  # jax.Array, or a Pallas ref inside a kernel
_F32 = jnp.float32


def _triton_params(num_warps: int, num_stages: int) -> Any:
    """Triton compiler parameters; their class was renamed across jax versions."""
    from jax.experimental.pallas import triton as pl_triton

    params = getattr(pl_triton, "CompilerParams", None) or getattr(
        pl_triton, "TritonCompilerParams", None
    )
    if params is None:  # pragma: no cover - only on jax versions without Pallas Triton
        raise PallasUnsupportedError(
            f"this jax ({jax.__version__}) has no Triton compiler parameters for Pallas"
        )
    return params(num_warps=num_warps, num_stages=num_stages)


# ------------------------------------------------------------------- pallas_calls


def _whole(x: Any) -> Any:
    """A BlockSpec that hands every program the whole array."""
    ndim = len(x.shape)
    return pl.BlockSpec(tuple(x.shape), lambda *_: (0,) * ndim)


def _call(
    config: TileConfig,
    kernel: Callable[..., None],
    grid: tuple[int, ...],
    lists: Sequence[Any],
    consts: Sequence[Any],
    inputs: Sequence[tuple[Any, Any]],
    outputs: Sequence[tuple[jax.ShapeDtypeStruct, Any]],
    name: str,
) -> Any:
    """One ``pallas_call``: the block-mask lists and closed-over arrays go whole to every
    program, ahead of the blocked ``inputs``; ``outputs`` pairs shapes with specs."""
    in_specs = [_whole(x) for x in (*lists, *consts)] + [spec for _, spec in inputs]
    return pl.pallas_call(
        partial(kernel, config),
        grid=grid,
        in_specs=in_specs,
        out_specs=[spec for _, spec in outputs],
        out_shape=[shape for shape, _ in outputs],
        interpret=config.interpret,
        compiler_params=_triton_params(config.num_warps, config.num_stages),
        name=name,
    )(*lists, *consts, *(x for x, _ in inputs))


def _bias_specs(config: TileConfig, bias: Any) -> tuple[Any, Any]:
    """The bias's BlockSpecs: one ``(b, h)`` slab per program of the query-major passes,
    one batch row (all its heads) per program of the key-major pass."""
    assert config.scores.bias is not None
    along_b, along_h, _, _ = config.scores.bias
    _, heads, lq, lk = bias.shape

    def row(b: Any) -> Any:
        return b if along_b else 0

    def head(h: Any) -> Any:
        return h if along_h else 0

    query_major = pl.BlockSpec((None, None, lq, lk), lambda b, h, *_: (row(b), head(h), 0, 0))
    key_major = pl.BlockSpec((None, heads, lq, lk), lambda b, h, j: (row(b), 0, 0, 0))
    return query_major, key_major


def _seeds_input(seeds: Array | None) -> list[tuple[Any, Any]]:
    """Dropout's ``(B, Hq)`` seeds as a whole input of every program, or nothing."""
    return [] if seeds is None else [(seeds, _whole(seeds))]


def _forward(
    config: TileConfig,
    q: Array,
    k: Array,
    v: Array,
    bias: Array | None,
    seeds: Array | None,
    kv_lists: tuple,
    consts: tuple,
) -> tuple[Array, Array]:
    bsz, _, lq, d = q.shape
    dv = v.shape[-1]
    bq, g, splits = config.q_block, config.groups, config.kv_splits
    # The grid is (batch row, query head, query block[, split]).
    q_spec = pl.BlockSpec((None, None, bq, d), lambda b, h, i, *_: (b, h, i, 0))
    k_spec = pl.BlockSpec((None, None, k.shape[2], d), lambda b, h, *_: (b, h // g, 0, 0))
    v_spec = pl.BlockSpec((None, None, v.shape[2], dv), lambda b, h, *_: (b, h // g, 0, 0))
    bias_input = [] if bias is None else [(bias, _bias_specs(config, bias)[0])]
    grid: tuple[int, ...] = (bsz, config.q_heads, config.n_q_blocks)
    if splits == 1:
        outputs = [
            (
                jax.ShapeDtypeStruct((bsz, config.q_heads, lq, dv), q.dtype),
                pl.BlockSpec((None, None, bq, dv), lambda b, h, i: (b, h, i, 0)),
            ),
            (
                jax.ShapeDtypeStruct((bsz, config.q_heads, lq), _F32),
                pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
            ),
        ]
    else:
        grid += (splits,)
        # Float32 partial results per split, merged below.
        outputs = [
            (
                jax.ShapeDtypeStruct((splits, bsz, config.q_heads, lq, dv), _F32),
                pl.BlockSpec((None, None, None, bq, dv), lambda b, h, i, s: (s, b, h, i, 0)),
            ),
            (
                jax.ShapeDtypeStruct((splits, bsz, config.q_heads, lq), _F32),
                pl.BlockSpec((None, None, None, bq), lambda b, h, i, s: (s, b, h, i)),
            ),
        ]
    out, lse = _call(
        config,
        _forward_kernel,
        grid,
        kv_lists,
        consts,
        [*bias_input, *_seeds_input(seeds), (q, q_spec), (k, k_spec), (v, v_spec)],
        outputs,
        "block_attention_forward",
    )
    if splits > 1:
        out, lse = merge_by_lse(out, lse)
        out = out.astype(q.dtype)
    return out, lse


def _backward(
    config: TileConfig,
    q: Array,
    k: Array,
    v: Array,
    bias: Array | None,
    seeds: Array | None,
    out: Array,
    lse: Array,
    d_out: Array,
    d_lse: Array,
    kv_lists: tuple,
    q_lists: tuple,
    consts: tuple,
) -> tuple[Array, Array, Array, Array | None, list[Array]]:
    """dQ, dK, dV, the bias gradient and the gradients of the differentiable
    ``score_mod`` arrays (flattened, float32, padded: see ``_array_cotangents``)."""
    bsz, _, lq, d = q.shape
    lk, dv = v.shape[2], v.shape[-1]
    bq, bk, g = config.q_block, config.k_block, config.groups
    # d lse / d s = p, so an lse cotangent only shifts each row's delta.
    lse, d_lse = backward_statistics(lse, d_lse)
    delta = jnp.einsum("bhqd,bhqd->bhq", d_out.astype(_F32), out.astype(_F32)) - d_lse

    def row_spec(width: int | None) -> Any:
        if width is None:
            return pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
        return pl.BlockSpec((None, None, bq, width), lambda b, h, i: (b, h, i, 0))

    kv_whole = pl.BlockSpec((None, None, lk, d), lambda b, h, i: (b, h // g, 0, 0))
    v_whole = pl.BlockSpec((None, None, lk, dv), lambda b, h, i: (b, h // g, 0, 0))
    bias_specs = None if bias is None else _bias_specs(config, bias)
    dq_outputs = [(jax.ShapeDtypeStruct(q.shape, q.dtype), row_spec(d))]
    # dbias of every (b, h) in float32 (broadcast axes are summed afterwards): tiles or
    # row sums from the dQ kernel, column sums from the dK/dV kernel.
    if config.bias_gradient == "tiles":
        dq_outputs.append((jax.ShapeDtypeStruct((bsz, config.q_heads, lq, lk), _F32), row_spec(lk)))
    elif config.bias_gradient == "rows":
        dq_outputs.append((jax.ShapeDtypeStruct((bsz, config.q_heads, lq), _F32), row_spec(None)))
    # Each program's share of the score_mod arrays' gradients, summed afterwards.
    for n in config.score_grads:
        width = _array_grad_width(config.score_array_shape(n))
        dq_outputs.append(
            (
                jax.ShapeDtypeStruct((bsz, config.q_heads, config.n_q_blocks, width), _F32),
                pl.BlockSpec((None, None, None, width), lambda b, h, i: (b, h, i, 0)),
            )
        )
    dq, *dq_extra = _call(
        config,
        _dq_kernel,
        (bsz, config.q_heads, config.n_q_blocks),
        kv_lists,
        consts,
        [
            *([] if bias_specs is None else [(bias, bias_specs[0])]),
            *_seeds_input(seeds),
            (q, row_spec(d)),
            (k, kv_whole),
            (v, v_whole),
            (d_out, row_spec(dv)),
            (lse, row_spec(None)),
            (delta, row_spec(None)),
        ],
        dq_outputs,
        "block_attention_dq",
    )
    dbias = dq_extra[: len(dq_extra) - len(config.score_grads)]
    d_arrays = [x.sum(axis=(0, 1, 2)) for x in dq_extra[len(dbias) :]]

    def per_batch(width: int | None) -> Any:
        if width is None:
            return pl.BlockSpec((None, config.q_heads, lq), lambda b, h, j: (b, 0, 0))
        return pl.BlockSpec((None, config.q_heads, lq, width), lambda b, h, j: (b, 0, 0, 0))

    def key_spec(width: int) -> Any:
        return pl.BlockSpec((None, None, bk, width), lambda b, h, j: (b, h, j, 0))

    dkdv_outputs = [
        (jax.ShapeDtypeStruct(k.shape, k.dtype), key_spec(d)),
        (jax.ShapeDtypeStruct(v.shape, v.dtype), key_spec(dv)),
    ]
    if config.bias_gradient == "columns":
        dkdv_outputs.append(
            (
                jax.ShapeDtypeStruct((bsz, config.q_heads, lk), _F32),
                pl.BlockSpec((None, g, bk), lambda b, h, j: (b, h, j)),
            )
        )
    dk, dv_, *dbias_columns = _call(
        config,
        _dkdv_kernel,
        (bsz, config.kv_heads, config.n_k_blocks),
        q_lists,
        consts,
        [
            *([] if bias_specs is None else [(bias, bias_specs[1])]),
            *_seeds_input(seeds),
            (q, per_batch(d)),
            (k, key_spec(d)),
            (v, key_spec(dv)),
            (d_out, per_batch(dv)),
            (lse, per_batch(None)),
            (delta, per_batch(None)),
        ],
        dkdv_outputs,
        "block_attention_dkdv",
    )
    d_bias = None
    if bias is not None:
        d_bias = _bias_cotangent(config, bias, dbias, dbias_columns)
    return dq, dk, dv_, d_bias, d_arrays


def _bias_cotangent(config: TileConfig, bias: Array, tiles_or_rows: list, columns: list) -> Array:
    """The kernels' float32 bias gradient, per batch row and head, summed over the axes
    along which ``bias`` broadcasts and cut to its (padded) shape and dtype."""
    if config.bias_gradient == "columns":
        grad = columns[0][:, :, None, :]
    elif config.bias_gradient == "rows":
        grad = tiles_or_rows[0][:, :, :, None]
    else:
        grad = tiles_or_rows[0]
    broadcast = tuple(n for n in range(4) if bias.shape[n] == 1 and grad.shape[n] > 1)
    if broadcast:
        grad = grad.sum(axis=broadcast, keepdims=True)
    grad = grad[: bias.shape[0], : bias.shape[1], : bias.shape[2], : bias.shape[3]]
    return grad.astype(bias.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_attention(
    config: TileConfig,
    q: Array,
    k: Array,
    v: Array,
    bias: Array | None,
    seeds: Array | None,
    kv_lists: tuple,
    q_lists: tuple,
    consts: tuple,
) -> tuple[Array, Array]:
    """Attention over padded kernel-layout inputs: output (``q``'s dtype) and lse.
    ``seeds``: dropout's ``(B, Hq)`` seeds when ``config.scores.dropout_rate`` is set."""
    return _forward(config, q, k, v, bias, seeds, kv_lists, consts)


def _kernel_attention_fwd(config, q, k, v, bias, seeds, kv_lists, q_lists, consts):
    out, lse = _forward(config, q, k, v, bias, seeds, kv_lists, consts)
    return (out, lse), (q, k, v, bias, seeds, out, lse, kv_lists, q_lists, consts)


def _kernel_attention_bwd(config, residuals, cotangents):
    q, k, v, bias, seeds, out, lse, kv_lists, q_lists, consts = residuals
    d_out, d_lse = cotangents
    dq, dk, dv, d_bias, d_arrays = _backward(
        config, q, k, v, bias, seeds, out, lse, d_out, d_lse, kv_lists, q_lists, consts
    )
    d_seeds, d_kv_lists, d_q_lists = jax.tree_util.tree_map(
        zero_cotangent, (seeds, kv_lists, q_lists)
    )
    d_consts = _array_cotangents(config, consts, d_arrays)
    return (dq, dk, dv, d_bias, d_seeds, d_kv_lists, d_q_lists, d_consts)


def _array_cotangents(config: TileConfig, consts: tuple, d_arrays: list[Array]) -> tuple:
    """Cotangents of the kernel's closed-over arrays (``mask_fn``'s, then
    ``score_mod``'s): the summed gradients for the differentiable score_mod arrays, cut
    from their padding to the kernel layout; zeros for the rest."""
    cotangents = [zero_cotangent(c) for c in consts]
    first = len(config.const_dtypes)
    for n, grad in zip(config.score_grads, d_arrays, strict=True):
        const = consts[first + n]
        size = int(np.prod(jnp.shape(const), dtype=np.int64))
        cotangents[first + n] = grad[:size].reshape(jnp.shape(const)).astype(const.dtype)
    return tuple(cotangents)


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)
