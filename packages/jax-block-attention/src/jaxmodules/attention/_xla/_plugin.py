"""XLA backend, as the dispatcher calls it: it takes every call on every platform."""

from __future__ import annotations

from typing import Any

from .._call import Call, any_blocks
from ._block_sizes import block_sizes
from ._entry import attend

__all__ = ["block_sizes", "refusal", "run", "variant"]


def variant(platform: str) -> bool:
    """The block sizes: XLA:CPU's cost model on a CPU, fixed tiles elsewhere."""
    return platform == "cpu"


def refusal(call: Call, platform: str) -> str | None:
    """Why the block loop cannot compute ``call``: never."""
    return None


def run(call: Call, platform: str) -> tuple[Any, Any]:
    """``(out, lse)`` of ``call`` by the block loop."""
    return call.run_on_block_mask(attend, block_sizes, any_blocks, platform)
