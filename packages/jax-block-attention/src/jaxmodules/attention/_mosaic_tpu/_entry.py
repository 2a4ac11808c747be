"""Mosaic TPU backend, the entry point: block sizes, why a call cannot run on the
kernels, and the kernel layout and padding around them."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from .._block_mask import BlockMask
from .._cache import LRUCache
from .._config import block_fields
from .._scores import Operands, ScoreConfig, bias_axes
from .._tile_program import UnsupportedCallError, kernel_consts, mask_program_problem, tile_problem
from ._calls import kernel_attention
from ._lists import kernel_schedule
from ._reads import ReadSpec, outside_reads, read_problem
from ._rules import MOSAIC_TPU
from ._tile import MosaicConfig

Array = Any
_LANES, _SUBLANES = 128, 8


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_sizes(*, q_len: int, k_len: int, head_dim: int = 128, **_: Any) -> tuple[int, int]:
    """The kernels' default ``(query block, key block)``: query blocks a multiple of 8
    (sublanes), key blocks a multiple of 128 (lanes: the key block is the lane axis of
    the score tile); 512 each up to d = 128 and 256 beyond, as far as the lengths
    reach (the kernels pad the last block)."""
    side = 512 if head_dim <= 128 else 256
    return min(side, _round_up(q_len, _SUBLANES)), min(side, _round_up(k_len, _LANES))


def fits(block_size: tuple[int, int]) -> bool:
    """Whether the kernels tile these blocks: queries by 8, keys by 128."""
    bq, bk = block_size
    return bq % _SUBLANES == 0 and bk % _LANES == 0


def _traced_score_arrays(scores: ScoreConfig, consts: tuple) -> tuple[int, ...]:
    program = scores.score
    if program is None:
        return ()
    return tuple(i for i in program.differentiable if isinstance(consts[i], jax.core.Tracer))


# Answers of call_problem, by everything they depend on (no arrays): the dispatcher asks
# on every traced call, for the TPU branch of every platform_dependent.
_PROBLEMS = LRUCache[str | None](64)


def _avals(consts: Any) -> tuple:
    return tuple((tuple(jnp.shape(c)), str(jnp.result_type(c))) for c in consts)


def call_problem(block_mask: BlockMask, scores: ScoreConfig, operands: Operands) -> str | None:
    """Why the kernels cannot compute a call, or ``None`` when they can (the same
    answer compiled and interpreted)."""
    score_consts = tuple(operands.score_consts) if scores.score is not None else ()
    key = (
        block_mask.block_size,
        block_mask.shape,
        block_mask.program,
        _avals(block_mask.mask_consts),
        scores.score,
        _avals(score_consts),
        _traced_score_arrays(scores, score_consts),
    )
    return _PROBLEMS.get(key, lambda: _problem(block_mask, scores, operands))


def _problem(block_mask: BlockMask, scores: ScoreConfig, operands: Operands) -> str | None:
    bq, bk = block_mask.block_size
    _, _, q_len, k_len = block_mask.shape
    # A block that covers its whole length needs no alignment (the BlockSpec is the array).
    if (bq % _SUBLANES and bq < q_len) or (bk % _SUBLANES and bk < k_len):
        return (
            f"block_size={block_mask.block_size} is not a pair of multiples of 8 (or the "
            "whole lengths)"
        )
    problem = mask_program_problem(block_mask.program, block_mask.mask_consts, MOSAIC_TPU)
    if problem is None and block_mask.program is not None:
        problem = read_problem(block_mask.program, block_mask.mask_consts, with_score=False)
    if problem is not None or scores.score is None:
        return problem
    consts = tuple(operands.score_consts)
    if _traced_score_arrays(scores, consts):
        return (
            "score_mod closes over traced floating arrays, whose gradients the mosaic_tpu "
            'kernels do not compute yet: use implementation="xla", or a bias'
        )
    problem = tile_problem(scores.score, consts, MOSAIC_TPU, with_score=True)
    return problem or read_problem(scores.score, consts, with_score=True)


def attend(
    q: Array,
    k: Array,
    v: Array,
    block_mask: BlockMask,
    scale: float,
    scores: ScoreConfig | None = None,
    operands: Operands | None = None,
    *,
    interpret: Any = True,
    vmem_limit_bytes: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Attention under ``block_mask`` with the fused Mosaic TPU kernels, and its lse
    (called as the other backends' ``attend``).

    Args:
        q: Queries ``(B, Lq, Hq, d)``.
        k: Keys ``(B, Lk, Hkv, d)``, ``Hq`` a multiple of ``Hkv``.
        v: Values ``(B, Lk, Hkv, dv)``.
        block_mask: The mask; block sizes multiples of 8 (key blocks of 128 suit the
            TPU's lanes: see ``block_sizes``).
        scale: Factor for the scores ``q @ k^T``.
        scores: The score changes (soft-cap, ``score_mod``, bias axes, dropout rate).
        operands: Their arrays (bias, ``score_mod``'s arrays, dropout's seeds).
        interpret: ``False`` to compile for a TPU; ``True`` (jax's generic interpreter)
            or a ``pltpu.InterpretParams`` to run on any platform.
        vmem_limit_bytes: Scoped VMEM limit of each kernel (``None``: the compiler's).

    Returns:
        ``(out, lse)``: ``(B, Lq, Hq, dv)`` in ``q``'s dtype and ``(B, Hq, Lq)``
        float32, ``-inf`` on rows without a visible key (whose output is 0).

    Raises:
        ValueError: Shapes that do not fit the block mask, or a call the kernels
            cannot compute (``UnsupportedCallError``, which says why).
    """
    scores = scores or ScoreConfig()
    operands = operands or Operands(None, ())
    bsz, q_len, q_heads, _ = q.shape
    _, k_len, kv_heads, _ = v.shape
    if block_mask.shape[2:] != (q_len, k_len) or q_heads % kv_heads:
        raise ValueError(f"block_mask {block_mask.shape} does not fit q {q.shape} and k {k.shape}")
    problem = call_problem(block_mask, scores, operands)
    if problem is not None:
        raise UnsupportedCallError(problem)
    _, dtypes = kernel_consts(block_mask.mask_consts)
    _, score_dtypes = kernel_consts(operands.score_consts)
    reads, mask_reads, score_reads = _reads(block_mask, scores, operands, bsz, q_heads)
    bias = operands.bias
    if bias is not None:
        bias = jnp.asarray(bias)
        scores = ScoreConfig(
            scores.soft_cap, scores.score, bias_axes(bias.shape), scores.dropout_rate
        )
    kv, qs = kernel_schedule(block_mask, "kv"), kernel_schedule(block_mask, "q")
    fields = block_fields(block_mask, q_len=q_len, k_len=k_len, scale=scale)
    config = MosaicConfig(
        **{**fields, "walk": kv.walk},
        scores=scores,
        q_heads=q_heads,
        kv_heads=kv_heads,
        const_dtypes=tuple(dtypes),
        score_dtypes=tuple(score_dtypes),
        interpret=interpret,
        kv_steps=kv.steps,
        q_steps=qs.steps,
        vmem_limit_bytes=vmem_limit_bytes,
        mask_reads=tuple(mask_reads),
        score_reads=tuple(score_reads),
    )
    offsets = jnp.asarray(block_mask.q_offset, jnp.int32).reshape(-1)
    seeds = jnp.zeros((1,), jnp.int32)
    if scores.dropout_rate:
        if operands.seeds is None:
            raise ValueError("dropout needs its (B, Hq) seeds in operands.seeds")
        seeds = jax.lax.bitcast_convert_type(jnp.asarray(operands.seeds, jnp.uint32), jnp.int32)
        seeds = jnp.broadcast_to(seeds, (bsz, q_heads)).reshape(-1)
    kv_prefetch = (*kv.arrays, offsets, seeds)
    q_prefetch = (*qs.arrays, offsets, seeds)
    return _attend_padded(config, (q, k, v), bias, kv_prefetch, q_prefetch, tuple(reads))


def _reads(
    block_mask: BlockMask, scores: ScoreConfig, operands: Operands, batch: int, heads: int
) -> tuple[list[Array], list[ReadSpec], list[ReadSpec]]:
    """The reads of the closed-over arrays of ``mask_fn`` and ``score_mod`` on every
    (padded) query and key position, and their specs (``_reads``)."""
    _, _, q_len, k_len = block_mask.shape
    n_q, n_k = block_mask.num_blocks
    bq, bk = block_mask.block_size
    offset = jnp.asarray(block_mask.q_offset, jnp.int32).reshape(-1, 1, 1, 1)
    # As in the kernels: padded query rows repeat the last row, padded keys the last key.
    q = jnp.minimum(jnp.arange(n_q * bq, dtype=jnp.int32), q_len - 1)[None, None, :, None]
    k = jnp.minimum(jnp.arange(n_k * bk, dtype=jnp.int32), k_len - 1)[None, None, None, :]
    b = jnp.arange(batch, dtype=jnp.int32).reshape(-1, 1, 1, 1)
    arrays: list[Array] = []
    mask_specs: list[ReadSpec] = []
    score_specs: list[ReadSpec] = []
    if block_mask.program is not None and block_mask.mask_consts:
        h = jnp.arange(block_mask.mask_heads, dtype=jnp.int32).reshape(1, -1, 1, 1)
        index = (b, h, q + offset, k)
        values, mask_specs = outside_reads(
            block_mask.program, block_mask.mask_consts, index, with_score=False
        )
        arrays += values
    if scores.score is not None and operands.score_consts:
        h = jnp.arange(heads, dtype=jnp.int32).reshape(1, -1, 1, 1)
        index = (b, h, q + offset, k)
        values, score_specs = outside_reads(
            scores.score, operands.score_consts, index, with_score=True
        )
        arrays += values
    return arrays, mask_specs, score_specs


@partial(jax.jit, static_argnums=(0,))
def _attend_padded(config, qkv, bias, kv_prefetch, q_prefetch, consts):
    """Kernel layout ``(B, H, L, d)`` and padding of the lengths to whole blocks (padded
    keys sit in the last key block, which is never full; padded query rows are cut)."""
    q, k, v = qkv
    q_len = q.shape[1]
    q_pad = config.n_q_blocks * config.q_block - q_len
    k_pad = config.n_k_blocks * config.k_block - config.k_len
    qk = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, q_pad), (0, 0)))
    kk = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, k_pad), (0, 0)))
    vk = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, k_pad), (0, 0)))
    padded_bias = bias
    if bias is not None:
        pads = [(0, 0), (0, 0), (0, q_pad if bias.shape[2] > 1 else 0)]
        padded_bias = jnp.pad(bias, (*pads, (0, k_pad if bias.shape[3] > 1 else 0)))
    out, lse = kernel_attention(config, qk, kk, vk, padded_bias, kv_prefetch, q_prefetch, consts)
    out = out[:, :, :q_len].transpose(0, 2, 1, 3)
    return out, lse[:, :, 0, :q_len]


__all__ = ["attend", "block_sizes", "call_problem", "fits"]
