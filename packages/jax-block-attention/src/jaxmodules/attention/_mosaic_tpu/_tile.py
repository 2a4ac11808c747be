"""Mosaic TPU backend, the per-tile math: positions, visibility, the shared score
pipeline and dropout's keep decisions on a ``(query block, key block)`` tile, as
functions of arrays. Row statistics are ``(rows, 1)`` columns (2-D, as Mosaic lays out
vectors), exponentials natural (the TPU's ``exp``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
from jax import lax

from .._band import in_band
from .._config import BlockConfig
from .._dropout import keep_tile, threshold
from .._scores import ScoreMod, tile_score_gradients, tile_scores
from .._tile_program import evaluate_on_tile
from ._reads import ReadSpec, replaying
from ._rules import MOSAIC_TPU

Array = Any
_F32 = jnp.float32


@dataclass(frozen=True, kw_only=True)
class MosaicConfig(BlockConfig):
    """Everything static about one call of the kernels."""

    q_heads: int
    kv_heads: int
    const_dtypes: tuple[Any, ...]
    score_dtypes: tuple[Any, ...]
    interpret: Any  # False (compiled), True or a pltpu.InterpretParams
    kv_steps: int  # steps per query block over its key blocks (the widest row)
    q_steps: int  # steps per key block over its query blocks
    vmem_limit_bytes: int | None = None
    # The reads of the closed-over arrays of mask_fn and score_mod, made before the
    # kernels and handed to them as tiles (``_reads``).
    mask_reads: tuple[ReadSpec, ...] = ()
    score_reads: tuple[ReadSpec, ...] = ()

    @property
    def groups(self) -> int:
        return self.q_heads // self.kv_heads


def mask_row(config: MosaicConfig, b: Array, h: Array) -> tuple[Array, Array]:
    """The ``(Bm, Hm)`` row of the block mask for batch row ``b`` and query head ``h``."""
    return (b if config.mask_batch > 1 else 0), (h if config.mask_heads > 1 else 0)


def positions(config: MosaicConfig, i: Array, j: Array, offset: Array) -> tuple[Array, Array]:
    """``(bq, 1)`` query and ``(1, bk)`` key positions of tile ``(i, j)``; padded query
    rows repeat the last real row so a ``mask_fn`` may index arrays of length ``Lq``."""
    bq, bk = config.q_block, config.k_block
    rows = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    q_pos = jnp.minimum(rows, config.q_len - 1) + offset
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    return q_pos, k_pos


def _index(config: MosaicConfig, b: Array, h: Array, q_pos: Array, k_pos: Array) -> list:
    k_safe = jnp.minimum(k_pos, config.k_len - 1)
    return [jnp.asarray(x, jnp.int32) for x in (b, h, q_pos, k_safe)]


def visible(
    config: MosaicConfig, mask_refs: Any, b: Array, h: Array, q_pos: Array, k_pos: Array
) -> Array:
    """The element-wise mask of a partial tile: band, key padding and ``mask_fn``."""
    seen = in_band(q_pos, k_pos, config.lo, config.hi, config.k_len)
    if config.program is not None:
        # A mask kept for one head is evaluated at head 0, as the block-mask build does.
        h = h if config.mask_heads > 1 else 0
        index = _index(config, b, h, q_pos, k_pos)
        seen = seen & evaluate_on_tile(
            config.program,
            [None] * len(config.const_dtypes),
            config.const_dtypes,
            *index,
            reader=replaying(mask_refs, config.mask_reads),
            lowerable=MOSAIC_TPU,
        )
    return seen


def score_mod(
    config: MosaicConfig, score_refs: Any, b: Array, h: Array, q_pos: Array, k_pos: Array
) -> ScoreMod | None:
    """``score_mod`` on the tile, as the shared score pipeline takes it."""
    program = config.scores.score
    if program is None:
        return None
    index = _index(config, b, h, q_pos, k_pos)

    def apply(s2: Array, values: Any = None) -> Array:
        out = evaluate_on_tile(
            program,
            [None] * len(config.score_dtypes),
            config.score_dtypes,
            s2,
            *index,
            reader=replaying(score_refs, config.score_reads),
            lowerable=MOSAIC_TPU,
        )
        return jnp.broadcast_to(out, s2.shape).astype(_F32)

    return apply


def scores(config: MosaicConfig, s0: Array, bias: Array | None, mod: ScoreMod | None) -> Array:
    """Final float32 scores of a tile from ``s0 = scale * q.k`` (shared pipeline)."""
    if not config.scores.changes_scores:
        return s0
    return tile_scores(config.scores, s0, bias, mod)


def score_gradient(
    config: MosaicConfig, s0: Array, bias: Array | None, ds: Array, mod: ScoreMod | None
) -> Array:
    """The gradient of the final scores mapped back to ``s0 + bias`` (shared)."""
    if not config.scores.changes_scores:
        return ds
    return tile_score_gradients(config.scores, s0, bias, ds, mod)[0]


def keep(config: MosaicConfig, seed: Array | None, q_pos: Array, k_pos: Array) -> Array | None:
    """Dropout's keep decisions on the tile (the same hash as every backend)."""
    if seed is None:
        return None
    return keep_tile(seed, q_pos, k_pos, threshold(config.scores.dropout_rate))


def dropout_scale(config: MosaicConfig) -> float:
    return 1.0 / (1.0 - config.scores.dropout_rate)


def matmul_t(a: Array, b: Array) -> Array:
    """``a @ b.T`` in float32 (float32 operands at full precision)."""
    precision = lax.Precision.HIGHEST if a.dtype == _F32 else None
    dims = (((1,), (1,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def matmul(a: Array, b: Array) -> Array:
    precision = lax.Precision.HIGHEST if a.dtype == _F32 else None
    dims = (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def matmul_tn(a: Array, b: Array) -> Array:
    """``a.T @ b`` in float32 (the dK/dV pass's sums over query rows)."""
    precision = lax.Precision.HIGHEST if a.dtype == _F32 else None
    dims = (((0,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)
