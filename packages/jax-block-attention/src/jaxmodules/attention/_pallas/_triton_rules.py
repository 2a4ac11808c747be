"""Pallas backend: whether this jax can lower the kernels to Triton, and which primitives
of a user's ``mask_fn``/``score_mod`` it can lower.

jax 0.12 deprecates Pallas Triton; a jax without it (or with its deprecation turned into
an error) makes every call ineligible, so that ``implementation=None`` runs the block
loop instead. A user program runs inside the kernels, so each of its primitives must have a rule in
Pallas's Triton lowering. Off a GPU (interpret mode) any primitive runs, so without this
check a program with, say, ``erf`` would pass on a CPU and fail to compile on a GPU. The
rules are read from the installed jax at run time, never listed here: they differ across
jax versions.
"""

from __future__ import annotations

import functools
from typing import Any

import jax


@functools.cache
def _lowering_rules() -> Any:
    """The installed jax's Triton lowering rules (primitive -> rule), or ``None`` when
    this jax has no Pallas Triton backend."""
    try:
        from jax._src.pallas.triton import lowering
    except ImportError:
        return None
    return getattr(lowering, "triton_lowering_rules", None)


def triton_backend_problem() -> str | None:
    """Why this jax cannot lower Pallas kernels to Triton, or ``None`` when it can."""
    if _lowering_rules() is None:
        return f"this jax ({jax.__version__}) has no Pallas Triton backend"
    try:
        from jax._src import deprecations

        removed = deprecations.is_accelerated("jax-pallas-triton")
    except (ImportError, AttributeError, KeyError, ValueError):
        removed = False  # a jax that has not deprecated it
    if removed:
        return f"this jax ({jax.__version__}) has turned Pallas Triton's deprecation into an error"
    return None


def triton_lowering_problem(primitive: Any) -> str | None:
    """Why the Triton lowering cannot take ``primitive``, or ``None`` when it can."""
    rules = _lowering_rules()
    if rules is None:
        return f"this jax ({jax.__version__}) has no Pallas Triton lowering"
    if primitive in rules:
        return None
    return (
        f"{primitive.name!r} has no Triton lowering in jax {jax.__version__}, so the "
        "compiled kernel could not run it"
    )
