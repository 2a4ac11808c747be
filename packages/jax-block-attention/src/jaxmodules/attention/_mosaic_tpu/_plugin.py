"""Mosaic TPU backend, as the dispatcher calls it: compiled on a TPU, in jax's generic
Pallas interpreter (``interpret=True``) on any other platform. The generic interpreter
was measured faster than the TPU simulator (``pltpu.InterpretParams()``) on the same
call, with the same results: 11.5 s against 28.7 s for a forward and gradient at
L = 200, d = 32 on two CPU cores."""

from __future__ import annotations

from typing import Any

from .._call import Call
from ._entry import attend, block_sizes, call_problem, fits
from ._rules import MOSAIC_TPU, mosaic_tpu_problem

__all__ = ["MOSAIC_TPU", "block_sizes", "fits", "refusal", "run", "variant"]


def variant(platform: str) -> bool:
    """Compiled (on a TPU) or interpreted: the one difference between platforms."""
    return platform == "tpu"


def refusal(call: Call, platform: str) -> str | None:
    """Why the kernels cannot compute ``call`` when lowered for ``platform``."""
    problem = mosaic_tpu_problem()
    if problem is not None:
        return problem
    if call.empty:
        return None
    block_mask = call.block_mask(block_sizes, fits, platform)
    return call_problem(block_mask, call.scores, call.operands)


def run(call: Call, platform: str) -> tuple[Any, Any]:
    """``(out, lse)`` of ``call`` by the kernels, interpreted off a TPU."""
    return call.run_on_block_mask(attend, block_sizes, fits, platform, interpret=platform != "tpu")
