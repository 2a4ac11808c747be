"""XLA backend, its default block sizes (also those of ``create_block_mask``).

On XLA:CPU the block loop picks the cheapest schedule under a cost model measured there
(below). On GPU and TPU it uses fixed tiles that fill a matrix unit. (The Triton
backend's sizes are in ``_pallas._entry``.)

The XLA:CPU cost model, measured (float32, d = 64): the matmuls of a block run on one core at any
block size, while the element-wise work on a score block (scale, mask, exponential,
sums) is split across cores only once the block holds about ``2**19`` scores (all
batch rows and heads together). Blocks at or above that size therefore cost about 3 ns
per score, smaller ones about 5 ns, whatever their shape; partial blocks add the mask;
every block pair and every query block adds a small fixed cost. Large blocks also waste
work on the causal diagonal and around windows, which the schedule counts exactly.
Only the ratios of the constants matter.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._band import band_limits, range_counts
from .._platforms import default_platform, known_platform

_QUERY_BLOCK_COST = 50e-6  # seconds per query block
_STEP_COST = 20e-6  # seconds per scheduled block pair
_SCORE_COST = 5e-9 / 128  # seconds per score and unit of d + dv, one core
_PARALLEL_SPEEDUP = 5 / 3  # element-wise work split across cores
_PARALLEL_SCORES = 1 << 19  # scores per block from which XLA:CPU splits that work
_MASK_OVERHEAD = 0.4  # partial blocks cost this much more per score
# Caps that keep the block temporaries (a few score blocks, each 4 bytes per score) in
# cache and far below one L x L score matrix: scores per block over all batch rows and
# heads, and block area per head.
_MAX_BLOCK_SCORES = 1 << 19
_MAX_BLOCK_AREA = 1 << 17
_Q_BLOCKS = (64, 128, 256, 512)
_K_BLOCKS = (64, 128, 256)


def _candidates(length: int, sizes: tuple[int, ...]) -> list[int]:
    return sorted({min(size, length) for size in sizes})


def xla_cpu_block_sizes(
    *,
    q_len: int,
    k_len: int,
    batch: int,
    q_heads: int,
    head_dim: int,
    value_dim: int,
    is_causal: bool,
    window: tuple[int | None, int | None],
) -> tuple[int, int]:
    """The (query block, key block) pair with the lowest estimated time on XLA:CPU."""
    rows = batch * q_heads
    pairs = [
        (q_block, k_block)
        for q_block in _candidates(q_len, _Q_BLOCKS)
        for k_block in _candidates(k_len, _K_BLOCKS)
    ]
    allowed = [
        (q_block, k_block)
        for q_block, k_block in pairs
        if q_block * k_block <= _MAX_BLOCK_AREA and rows * q_block * k_block <= _MAX_BLOCK_SCORES
    ] or pairs[:1]
    per_score = (head_dim + value_dim) * _SCORE_COST
    lo, hi = band_limits(is_causal, window)
    best, best_cost = allowed[0], np.inf
    for q_block, k_block in allowed:
        # Block pairs per row range, O(query blocks): no per-pair grid at long context.
        n_q, n_full, n_partial = range_counts(q_len, k_len, q_block, k_block, lo, hi)
        scores = rows * q_block * k_block
        block_cost = scores * per_score
        if scores >= _PARALLEL_SCORES:
            block_cost /= _PARALLEL_SPEEDUP
        cost = n_q * _QUERY_BLOCK_COST
        cost += (n_full + n_partial) * (_STEP_COST + block_cost)
        cost += n_partial * block_cost * _MASK_OVERHEAD
        if cost < best_cost:
            best, best_cost = (q_block, k_block), cost
    return best


_ACCELERATOR_BLOCKS = (128, 128)


def block_sizes(
    *, q_len: int, k_len: int, platform: str | None = None, **shape: Any
) -> tuple[int, int]:
    """The block loop's default ``(query block, key block)`` on ``platform`` (``None``:
    the one the call runs on when known now, else the default device's), clamped to the
    lengths: on a CPU the choice of ``xla_cpu_block_sizes`` (``shape`` holds its other
    keywords), else ``(128, 128)``."""
    if platform is None:
        platform = known_platform() or default_platform()
    if platform != "cpu":
        return min(_ACCELERATOR_BLOCKS[0], q_len), min(_ACCELERATOR_BLOCKS[1], k_len)
    return xla_cpu_block_sizes(q_len=q_len, k_len=k_len, **shape)
