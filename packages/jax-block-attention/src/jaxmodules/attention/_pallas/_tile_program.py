"""Triton backend, its binding of the shared tile-program evaluator (``.._tile_program``):
a ``mask_fn`` / ``score_mod`` on a tile may use only primitives that Pallas's Triton
lowering has rules for (``_triton_rules``)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from .._elementwise import ElementwiseProgram
from .._tile_program import (
    _MIN_TILE,
    ArrayRead,
    Lowerable,
    UnsupportedCallError,
    kernel_consts,
    reader_for,
    tile_problem,
)
from .._tile_program import evaluate_on_tile as _evaluate_on_tile
from .._tile_program import mask_program_problem as _mask_program_problem
from ._triton_rules import triton_lowering_problem

# The name the kernel refusals of this backend have always raised (a ValueError).
PallasUnsupportedError = UnsupportedCallError

TRITON = Lowerable("triton", triton_lowering_problem)

evaluate_on_tile = partial(_evaluate_on_tile, lowerable=TRITON)
_tile_problem = partial(tile_problem, lowerable=TRITON)


def mask_program_problem(program: ElementwiseProgram | None, consts: Sequence[Any]) -> str | None:
    """Why the Triton kernel cannot evaluate ``program`` on tiles, or ``None``."""
    return _mask_program_problem(program, consts, TRITON)


__all__ = [
    "TRITON",
    "_MIN_TILE",
    "ArrayRead",
    "PallasUnsupportedError",
    "evaluate_on_tile",
    "kernel_consts",
    "mask_program_problem",
    "reader_for",
]
