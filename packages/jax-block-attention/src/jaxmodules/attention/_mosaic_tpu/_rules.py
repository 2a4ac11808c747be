"""Mosaic TPU backend: which primitives of a user's ``mask_fn``/``score_mod`` the Mosaic
TPU lowering takes, read from the installed jax at run time (never listed here: they
differ across jax versions). Off a TPU the kernels run in interpret mode, where any
primitive runs; without this check a program would pass on a CPU and fail on a TPU."""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.extend.core import Primitive

from .._tile_program import Lowerable


@functools.cache
def _lowering_rules() -> Any:
    """The installed jax's Mosaic TPU lowering rules for the TensorCore, or ``None``."""
    try:
        from jax._src.pallas.mosaic import lowering
    except ImportError:  # pragma: no cover - depends on the installed jax
        return None
    rules = getattr(lowering, "lowering_rules", None)
    if isinstance(rules, dict) and rules and not isinstance(next(iter(rules)), Primitive):
        # Keyed by kernel type: take the TensorCore's.
        core = next((k for k in rules if str(k).lower() in ("tc", "kerneltype.tc")), None)
        rules = rules.get(core) if core is not None else None
    return rules


@functools.cache
def mosaic_tpu_problem() -> str | None:
    """Why this jax cannot build the Mosaic TPU kernels (an older Pallas TPU API), or
    ``None`` when it can."""
    try:
        from jax.experimental.pallas import tpu as pltpu
    except ImportError:  # pragma: no cover - depends on the installed jax
        return f"this jax ({jax.__version__}) has no Pallas TPU module"
    missing = [
        name
        for name in ("CompilerParams", "PrefetchScalarGridSpec", "VMEM")
        if not hasattr(pltpu, name)
    ]
    if missing or _lowering_rules() is None:
        return (
            f"this jax ({jax.__version__}) lacks the Pallas TPU API its kernels use "
            f'({", ".join(missing) or "lowering rules"}): use implementation="xla"'
        )
    return None


def mosaic_lowering_problem(primitive: Any) -> str | None:
    """Why the Mosaic TPU lowering cannot take ``primitive``, or ``None`` when it can."""
    rules = _lowering_rules()
    if rules is None:
        return f"this jax ({jax.__version__}) has no Pallas Mosaic TPU lowering"
    if primitive in rules:
        return None
    return (
        f"{primitive.name!r} has no Mosaic TPU lowering in jax {jax.__version__}, so the "
        "compiled kernel could not run it"
    )


MOSAIC_TPU = Lowerable("mosaic_tpu", mosaic_lowering_problem)
