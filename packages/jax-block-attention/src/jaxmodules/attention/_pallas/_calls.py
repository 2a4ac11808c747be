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
from ._tile_math import LOG2E, TileConfig, _array_grad_width, compiled_dots
from ._tile_program import PallasUnsupportedError
from ._tuning import KernelTiles

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
    tiles: KernelTiles,
) -> Any:
    """One ``pallas_call``: the block-mask lists and closed-over arrays go whole to every
    program, ahead of the blocked ``inputs``; ``outputs`` pairs shapes with specs."""
    in_specs = [_whole(x) for x in (*lists, *consts)] + [spec for _, spec in inputs]
    call = pl.pallas_call(
        partial(kernel, config),
        grid=grid,
        in_specs=in_specs,
        out_specs=[spec for _, spec in outputs],
        out_shape=[shape for shape, _ in outputs],
        interpret=config.interpret,
        compiler_params=_triton_params(tiles.warps, tiles.stages),
        name=name,
    )
    with compiled_dots(not config.interpret):  # the kernel is traced here
        return call(*lists, *consts, *(x for x, _ in inputs))


def _bias_specs(config: TileConfig, bias: Any) -> tuple[Any, Any]:
    """The bias's BlockSpecs: one ``(b, h)`` slab per program of the query-major passes
    (grid ``(rows[, split], head, batch)``), one batch row (all its heads) per program
    of the key-major pass."""
    assert config.scores.bias is not None
    along_b, along_h, _, _ = config.scores.bias
    _, heads, lq, lk = bias.shape

    def row(b: Any) -> Any:
        return b if along_b else 0

    def head(h: Any) -> Any:
        return h if along_h else 0

    query_major = pl.BlockSpec(
        (None, None, lq, lk), lambda *ids: (row(ids[-1]), head(ids[-2]), 0, 0)
    )
    key_major = pl.BlockSpec((None, heads, lq, lk), lambda *ids: (row(ids[-1]), 0, 0, 0))
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
    g, splits = config.groups, config.kv_splits
    rows, _ = config.tiles("forward")

    def tile(r: Any) -> Any:
        return config.row_tile("forward", r)

    # The grid is (query tile[, split], query head, batch row): query tiles on the
    # fastest axis, as in FlashAttention-2 and jax's own Pallas GPU attention.
    q_spec = pl.BlockSpec((None, None, rows, d), lambda r, *ids: (ids[-1], ids[-2], tile(r), 0))
    k_spec = pl.BlockSpec((None, None, k.shape[2], d), lambda *ids: (ids[-1], ids[-2] // g, 0, 0))
    v_spec = pl.BlockSpec((None, None, v.shape[2], dv), lambda *ids: (ids[-1], ids[-2] // g, 0, 0))
    bias_input = [] if bias is None else [(bias, _bias_specs(config, bias)[0])]
    grid: tuple[int, ...] = (config.row_tiles("forward"), config.q_heads, bsz)
    if splits == 1:
        outputs = [
            (
                jax.ShapeDtypeStruct((bsz, config.q_heads, lq, dv), q.dtype),
                pl.BlockSpec((None, None, rows, dv), lambda r, h, b: (b, h, tile(r), 0)),
            ),
            (
                jax.ShapeDtypeStruct((bsz, config.q_heads, lq), _F32),
                pl.BlockSpec((None, None, rows), lambda r, h, b: (b, h, tile(r))),
            ),
        ]
    else:
        grid = (grid[0], splits, *grid[1:])
        # Float32 partial results per split, merged below.
        outputs = [
            (
                jax.ShapeDtypeStruct((splits, bsz, config.q_heads, lq, dv), _F32),
                pl.BlockSpec(
                    (None, None, None, rows, dv), lambda r, s, h, b: (s, b, h, tile(r), 0)
                ),
            ),
            (
                jax.ShapeDtypeStruct((splits, bsz, config.q_heads, lq), _F32),
                pl.BlockSpec((None, None, None, rows), lambda r, s, h, b: (s, b, h, tile(r))),
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
        config.tuning.forward,
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
    g = config.groups
    # d lse / d s = p, so an lse cotangent only shifts each row's delta.
    lse, d_lse = backward_statistics(lse, d_lse)
    delta = jnp.einsum("bhqd,bhqd->bhq", d_out.astype(_F32), out.astype(_F32)) - d_lse
    # The kernels take the lse in base 2, as their scores (+inf stays +inf).
    lse = lse * _F32(LOG2E)
    rows, _ = config.tiles("dq")

    def tile(r: Any) -> Any:
        return config.row_tile("dq", r)

    def row_spec(width: int | None) -> Any:
        if width is None:
            return pl.BlockSpec((None, None, rows), lambda r, h, b: (b, h, tile(r)))
        return pl.BlockSpec((None, None, rows, width), lambda r, h, b: (b, h, tile(r), 0))

    kv_whole = pl.BlockSpec((None, None, lk, d), lambda r, h, b: (b, h // g, 0, 0))
    v_whole = pl.BlockSpec((None, None, lk, dv), lambda r, h, b: (b, h // g, 0, 0))
    bias_specs = None if bias is None else _bias_specs(config, bias)
    dq_outputs = [(jax.ShapeDtypeStruct(q.shape, q.dtype), row_spec(d))]
    # dbias of every (b, h) in float32 (broadcast axes are summed afterwards): tiles or
    # row sums from the dQ kernel, column sums from the dK/dV kernel.
    if config.bias_gradient == "tiles":
        dq_outputs.append((jax.ShapeDtypeStruct((bsz, config.q_heads, lq, lk), _F32), row_spec(lk)))
    elif config.bias_gradient == "rows":
        dq_outputs.append((jax.ShapeDtypeStruct((bsz, config.q_heads, lq), _F32), row_spec(None)))
    # Each program's share of the score_mod arrays' gradients, summed afterwards.
    n_rows = config.row_tiles("dq")
    for n in config.score_grads:
        width = _array_grad_width(config.score_array_shape(n))
        dq_outputs.append(
            (
                jax.ShapeDtypeStruct((bsz, config.q_heads, n_rows, width), _F32),
                pl.BlockSpec((None, None, None, width), lambda r, h, b: (b, h, r, 0)),
            )
        )
    dq, *dq_extra = _call(
        config,
        _dq_kernel,
        (n_rows, config.q_heads, bsz),
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
        config.tuning.dq,
    )
    dbias = dq_extra[: len(dq_extra) - len(config.score_grads)]
    d_arrays = [x.sum(axis=(0, 1, 2)) for x in dq_extra[len(dbias) :]]

    bias_input = [] if bias_specs is None else [(bias, bias_specs[1])]
    dk, dv_, dbias_columns = _dkdv_pass(
        config, q, k, v, bias_input, seeds, d_out, lse, delta, q_lists, consts
    )
    d_bias = None
    if bias is not None:
        d_bias = _bias_cotangent(config, bias, dbias, dbias_columns)
    return dq, dk, dv_, d_bias, d_arrays


def _dkdv_pass(
    config: TileConfig,
    q: Array,
    k: Array,
    v: Array,
    bias_input: list[tuple[Any, Any]],
    seeds: Array | None,
    d_out: Array,
    lse: Array,
    delta: Array,
    q_lists: tuple,
    consts: tuple,
) -> tuple[Array, Array, list[Array]]:
    """The dK/dV kernel's pallas_call: dK, dV and the bias's column sums (a list, empty
    unless the bias varies only along keys)."""
    bsz, _, lq, d = q.shape
    lk, dv = v.shape[2], v.shape[-1]
    g, splits = config.groups, config.group_splits
    key_rows, _ = config.tiles("dkdv")

    def key_tile(r: Any) -> Any:
        return config.row_tile("dkdv", r)

    # The grid is (key tile[, share of the group's query heads], key/value head, batch).
    def per_batch(width: int | None) -> Any:
        if width is None:
            return pl.BlockSpec((None, config.q_heads, lq), lambda *ids: (ids[-1], 0, 0))
        return pl.BlockSpec((None, config.q_heads, lq, width), lambda *ids: (ids[-1], 0, 0, 0))

    def key_spec(width: int) -> Any:
        return pl.BlockSpec(
            (None, None, key_rows, width), lambda r, *ids: (ids[-1], ids[-2], key_tile(r), 0)
        )

    def key_out(width: int, like: Array) -> tuple:
        if splits == 1:
            return jax.ShapeDtypeStruct(like.shape, like.dtype), key_spec(width)
        # Float32 partial sums per share of the group, added below.
        return (
            jax.ShapeDtypeStruct((splits, *like.shape), _F32),
            pl.BlockSpec(
                (None, None, None, key_rows, width),
                lambda r, s, hk, b: (s, b, hk, key_tile(r), 0),
            ),
        )

    dkdv_outputs = [key_out(d, k), key_out(dv, v)]
    if config.bias_gradient == "columns":
        heads = g // splits
        dkdv_outputs.append(
            (
                jax.ShapeDtypeStruct((bsz, config.q_heads, lk), _F32),
                pl.BlockSpec(
                    (None, heads, key_rows),
                    lambda r, *ids: (
                        ids[-1],
                        ids[-2] * splits + (ids[0] if splits > 1 else 0),
                        key_tile(r),
                    ),
                ),
            )
        )
    grid = (config.row_tiles("dkdv"), *((splits,) if splits > 1 else ()), config.kv_heads, bsz)
    dk, dv_, *dbias_columns = _call(
        config,
        _dkdv_kernel,
        grid,
        q_lists,
        consts,
        [
            *bias_input,
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
        config.tuning.dkdv,
    )
    if splits > 1:
        dk, dv_ = dk.sum(axis=0).astype(k.dtype), dv_.sum(axis=0).astype(v.dtype)
    return dk, dv_, dbias_columns


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
def _kernel_attention(config: TileConfig, *inputs: Any) -> tuple[Array, Array]:
    """Attention over padded kernel-layout inputs ``(q, k, v, bias, seeds, kv_lists,
    q_lists, consts)``: output (``q``'s dtype) and lse. ``seeds``: dropout's ``(B, Hq)``
    seeds when ``config.scores.dropout_rate`` is set; ``q_lists`` serve the backward."""
    q, k, v, bias, seeds, kv_lists, _, consts = inputs
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
