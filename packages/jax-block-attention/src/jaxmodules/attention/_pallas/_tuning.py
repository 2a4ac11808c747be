"""Tiles, warps and pipeline stages of the compiled Pallas kernels, per head dimension,
input dtype and kernel.

Each kernel's program owns ``rows`` rows of its output (query rows for the forward and
dQ kernels, key rows for dK/dV) and walks the listed blocks of the other side in
slices of ``cols`` (keys for the forward and dQ, queries for dK/dV). Both are cut from
the block mask's blocks, which stay the unit of skipping: a tile never exceeds its
block, and a block larger than a tile is walked in several tiles.

The table was chosen from a Triton compile report (the kernels lowered for CUDA and
compiled by Triton 3.6.0 for sm_90 and sm_80; its figures are in the history of
``benchmarks/results/attention_gpu_compile.md``, whose report now compiles the kernels
through XLA's own GPU pipeline) so that
every kernel fits the shared memory of both (227 / 163 KiB), the 16-bit kernels spill
no more on sm_90 than jax's own Pallas ``mha`` at the same head dimension, and none
spills more than 256 bytes. It has not been timed on a GPU yet: the GPU run
(``benchmarks/gpu/tune.py``) refines it.

How it was read off the report: at d=256 and for float32 the 128 x 128 tiles do not fit
(320 KiB of shared memory for the d=256 forward) or spill (up to 5 KiB), so rows and key
tiles shrink until neither happens; below d=256 the dK/dV kernel's two float32
accumulators need 8 warps or 64-row tiles. Where the registers already hold an SM to one
program (16-bit, d <= 128) the kernels take a third pipeline stage, which shared memory
then has room for; at d=256 and for float32 they keep two. Tiles of 32 rows or fewer (d=256 dK/dV,
float32 at d = 128) compile to ``mma.sync`` rather than Hopper's ``wgmma``, as jax's
own backward does at every head dimension. float32 dots run as three TF32 products
(``tf32x3``), which need more registers than one: float32 tiles are smaller than 16-bit
ones at the same head dimension, and above d=128 no float32 tile fits (the dK/dV kernel
spills at least 372 B on sm_90 at d=256), so compiled float32 calls stop at d=128
(``compiled_problem``). The 16-bit d=512 row was compiled by the same method, outside
the report's cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class KernelTiles:
    """One kernel's launch: output rows per program, inner slice, warps, stages."""

    rows: int
    cols: int
    warps: int
    stages: int


@dataclass(frozen=True)
class Tuning:
    """The three kernels' launches for one call."""

    forward: KernelTiles
    dq: KernelTiles
    dkdv: KernelTiles

    @property
    def kernels(self) -> tuple[KernelTiles, KernelTiles, KernelTiles]:
        return self.forward, self.dq, self.dkdv


# (16-bit inputs?, padded head dimension) -> forward, dQ, dK/dV.
_TABLE: dict[tuple[bool, int], Tuning] = {}


def _row(half: bool, d: int, fwd: tuple, dq: tuple, dkdv: tuple) -> None:
    _TABLE[half, d] = Tuning(KernelTiles(*fwd), KernelTiles(*dq), KernelTiles(*dkdv))


#     16-bit   d    forward (rows, cols, warps, stages), dQ, dK/dV (d=64 serves d=16, 32)
_row(True, 64, (128, 64, 4, 3), (128, 32, 4, 3), (128, 32, 8, 3))
_row(True, 128, (128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 8, 3))
_row(True, 256, (64, 64, 8, 2), (64, 16, 8, 2), (32, 64, 8, 2))
_row(True, 512, (32, 16, 8, 2), (32, 16, 8, 2), (32, 16, 8, 2))
# float32 (not among the compile report's gated cases; compiled for H100 through XLA
# apart): the d=64 dK/dV spilled 28 B with 4 warps, none with 8; at d=128 the 32-wide
# tiles spilled 584 B (forward), 8 B (dQ) and 24 B (dK/dV), these halved ones none.
_row(False, 64, (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 8, 2))
_row(False, 128, (32, 16, 8, 2), (16, 16, 8, 2), (16, 32, 8, 2))
# float32 above d=128 is refused (compiled_problem below): no row.


# float32 above this padded head dimension: no tile keeps the dK/dV kernel's float32
# accumulators and three-product TF32 dots in sm_90's registers (the compile report's
# smallest, 16 x 16 with 8 warps, still spilled 372 B; 4 or 16 warps or one stage spill
# more), so compiled calls go to the block loop or are refused.
MAX_FLOAT32_HEAD_DIM = 128


def compiled_problem(head_dim: int, dtype: Any) -> str | None:
    """Why compiled kernels cannot take inputs of this (padded) head dimension and dtype,
    or ``None`` when the table has a launch that fits."""
    if np.dtype(dtype).itemsize > 2 and head_dim > MAX_FLOAT32_HEAD_DIM:
        return (
            f"float32 inputs with head dimension {head_dim} > {MAX_FLOAT32_HEAD_DIM} do not "
            "fit the compiled dK/dV kernel's registers (it would spill); use bfloat16 or "
            'float16 inputs, or implementation="xla"'
        )
    return None


def compiled_tuning(head_dim: int, dtype: Any) -> Tuning:
    """The table's launch for a padded head dimension (a power of two ``>= 16``) and
    input dtype; head dimensions above 512 take the 512 row."""
    problem = compiled_problem(head_dim, dtype)
    if problem is not None:
        raise ValueError(problem)
    half = np.dtype(dtype).itemsize <= 2
    return _TABLE[half, min(max(head_dim, 64), 512)]


def whole_blocks(q_block: int, k_block: int) -> Tuning:
    """Every kernel on whole blocks (interpret mode: fewer, larger steps)."""
    return Tuning(
        KernelTiles(q_block, k_block, 4, 2),
        KernelTiles(q_block, k_block, 4, 2),
        KernelTiles(k_block, q_block, 4, 2),
    )
