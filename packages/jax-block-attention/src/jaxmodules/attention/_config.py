"""The static description of one attention call that both backends share.

A backend's configuration is hashable: it is a ``jit`` static argument and a
``custom_vjp`` non-differentiable argument, so equal configurations reuse compiled
programs. ``BlockConfig`` holds what follows from the block mask and the score changes;
each backend adds its own layout and tuning fields in a subclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._band import band_limits, block_grid
from ._block_mask import BlockMask
from ._elementwise import ElementwiseProgram
from ._scores import ScoreConfig


@dataclass(frozen=True, kw_only=True)
class BlockConfig:
    """Lengths, blocks, the band, the mask program and the score changes of a call."""

    q_len: int
    k_len: int
    q_block: int
    k_block: int
    scale: float
    lo: int | None  # the band: lo <= k - q <= hi (None: unbounded)
    hi: int | None
    program: ElementwiseProgram | None
    mask_batch: int  # 1 or B: batch rows the block mask keeps lists for
    mask_heads: int  # 1 or Hq: query heads the block mask keeps lists for
    # How the block mask is walked: "band" (ranges by arithmetic), "ranges" or "lists"
    # (see ``BlockMask.walk``).
    walk: str = "lists"
    scores: ScoreConfig = field(default_factory=ScoreConfig)

    @property
    def n_q_blocks(self) -> int:
        return block_grid(self.q_len, self.k_len, self.q_block, self.k_block)[0]

    @property
    def n_k_blocks(self) -> int:
        return block_grid(self.q_len, self.k_len, self.q_block, self.k_block)[1]


def block_fields(block_mask: BlockMask, *, q_len: int, k_len: int, scale: float) -> dict[str, Any]:
    """The ``BlockConfig`` fields of a call under ``block_mask`` (all but ``scores``)."""
    lo, hi = band_limits(block_mask.is_causal, block_mask.window)
    return {
        "q_len": q_len,
        "k_len": k_len,
        "q_block": block_mask.block_size[0],
        "k_block": block_mask.block_size[1],
        "scale": float(scale),
        "lo": lo,
        "hi": hi,
        "program": block_mask.program,
        "mask_batch": block_mask.mask_batch,
        "mask_heads": block_mask.mask_heads,
        "walk": block_mask.walk,
    }
