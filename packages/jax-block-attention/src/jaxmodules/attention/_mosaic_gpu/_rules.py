"""Mosaic GPU backend, which primitives of a user's ``mask_fn``/``score_mod`` its
kernels lower: those with a rule in the installed jax's Mosaic GPU lowering for
warpgroup-level arrays (read at run time, as the Triton backend reads Triton's). A
program's closed-over arrays would be gathers from global memory, which the kernels do
not do yet: such programs are refused."""

from __future__ import annotations

import functools
from typing import Any

import jax

from .._tile_program import Lowerable


@functools.cache
def _lowering_rules() -> Any:
    """The Mosaic GPU lowering rules for the warpgroup semantics the consumer
    warpgroups run in, or ``None`` when this jax has none."""
    try:
        from jax._src.pallas.mosaic_gpu import core as gpu_core
        from jax._src.pallas.mosaic_gpu import lowering
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError:
        return None
    needed = ("kernel", "InterpretGPUParams", "set_max_registers", "wgmma", "Layout")
    if not all(hasattr(plgpu, name) for name in needed):
        return None
    rules = getattr(lowering, "mosaic_lowering_rules", None)
    semantics = getattr(gpu_core, "LANExWG_SEMANTICS", None)
    if rules is None or semantics is None:
        return None
    return rules.get(semantics)


def mosaic_gpu_problem() -> str | None:
    """Why this jax cannot build the Mosaic GPU kernels, or ``None`` when it can."""
    if _lowering_rules() is None:
        return f"this jax ({jax.__version__}) has no Pallas Mosaic GPU lowering"
    return None


def lowering_problem(primitive: Any) -> str | None:
    """Why the Mosaic GPU lowering cannot take ``primitive``, or ``None``."""
    rules = _lowering_rules()
    if rules is None:
        return f"this jax ({jax.__version__}) has no Pallas Mosaic GPU lowering"
    if primitive in rules:
        return None
    return (
        f"{primitive.name!r} has no Mosaic GPU lowering in jax {jax.__version__}, so the "
        "compiled kernel could not run it"
    )


MOSAIC_GPU = Lowerable("mosaic_gpu", lowering_problem)
