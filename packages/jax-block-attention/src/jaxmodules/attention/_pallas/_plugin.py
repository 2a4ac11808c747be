"""Triton backend, as the dispatcher calls it: compiled on an NVIDIA or AMD GPU,
in Pallas interpret mode on any other platform."""

from __future__ import annotations

from typing import Any

from .._call import Call
from .._platforms import GPUS
from ._eligibility import call_problem
from ._entry import attend, block_sizes
from ._tile_math import _is_tile
from ._tile_program import TRITON

__all__ = ["TRITON", "block_sizes", "fits", "refusal", "run", "variant"]


def variant(platform: str) -> bool:
    """Compiled (on a GPU) or interpreted: the one difference between platforms."""
    return platform in GPUS


def fits(block_size: tuple[int, int]) -> bool:
    """Whether the kernels tile blocks of this size: powers of two ``>= 16``."""
    return _is_tile(block_size[0]) and _is_tile(block_size[1])


def refusal(call: Call, platform: str) -> str | None:
    """Why the kernels cannot compute ``call`` when lowered for ``platform``."""
    if call.empty:
        return None
    block_mask = call.block_mask(block_sizes, fits, platform)
    return call_problem(
        block_mask,
        call.scores,
        call.operands,
        head_dim=call.head_dim,
        dtype=call.args.q.dtype,
        interpret=platform not in GPUS,
    )


def run(call: Call, platform: str) -> tuple[Any, Any]:
    """``(out, lse)`` of ``call`` by the kernels, interpreted off a GPU."""
    return call.run_on_block_mask(
        attend, block_sizes, fits, platform, interpret=platform not in GPUS
    )
