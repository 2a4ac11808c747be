"""The platform a call is lowered for: known now for an eager call, at lowering time for
a traced one (``jax.lax.platform_dependent``), so that ``jax.jit(f).lower`` for another
device and ``jax.export(..., platforms=[...])`` get that platform's backend.

A jax whose lowering keeps every branch of a ``platform_dependent`` (jax 0.5 lowers them
all into one ``case``, and a Triton kernel cannot be lowered for a CPU) falls back to the
default device's platform, as when the choice was made at trace time.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

# The platforms a choice is made for; any other platform takes the "default" branch.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT = "default"
GPUS = ("cuda", "rocm")

# The platforms a traced call prepares a branch for: all of them unless this variable
# names some (comma-separated). Tracing the branches costs time (a CPU program also
# traces the GPU and TPU kernels); a process that lowers for one platform can skip the
# others. Read when a call is traced: jax reuses a function's cached trace, so set it
# before tracing. Lowering for a platform left out fails (jax finds no lowering rule
# for ``platform_index`` there).
PLATFORMS_VARIABLE = "JAXMODULES_ATTENTION_PLATFORMS"


def prepared_platforms() -> tuple[str, ...]:
    """The platforms a traced call prepares a branch for: those named by
    ``$JAXMODULES_ATTENTION_PLATFORMS``, else all of them and ``"default"``."""
    text = os.environ.get(PLATFORMS_VARIABLE, "")
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        return (*PLATFORMS, DEFAULT)
    unknown = [n for n in names if n not in PLATFORMS]
    if unknown:
        raise ValueError(
            f"${PLATFORMS_VARIABLE} must name platforms among {', '.join(PLATFORMS)} "
            f"(comma-separated); got {text!r}"
        )
    return names


def default_platform() -> str:
    """The default device's platform, in ``platform_dependent``'s names."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return device.platform
    client = getattr(device, "client", None)
    version = str(getattr(client, "platform_version", "")).lower()
    return "rocm" if "rocm" in version or "hip" in version else "cuda"


@functools.cache
def lowering_keeps_one_branch() -> bool:
    """Whether this jax lowers a ``platform_dependent`` to the one branch of the platform
    it lowers for (else every branch is lowered, for every platform)."""
    try:
        platform_dependent = jax.lax.platform_dependent
    except AttributeError:
        return False

    def probe(x: Any) -> Any:
        return platform_dependent(x, cpu=lambda x: x + 1, default=lambda x: x + 2)

    text = jax.jit(probe).lower(np.float32(0)).as_text()
    return "case" not in text


def known_platform() -> str | None:
    """The platform the current call runs on when it is known now (an eager call, or a
    jax that cannot defer the choice: the default device's), ``None`` when the call is
    being traced and the platform is the one it will be lowered for."""
    if not lowering_keeps_one_branch():
        return default_platform()
    names = (*PLATFORMS, DEFAULT)
    branches = {p: functools.partial(np.int32, n) for n, p in enumerate(PLATFORMS)}
    index = jax.lax.platform_dependent(default=lambda: np.int32(len(PLATFORMS)), **branches)
    try:
        return names[int(index)]
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def on_platforms(branches: dict[str, Callable[[], Any]]) -> Any:
    """``branches[p]()`` for the platform ``p`` the program is lowered for; ``branches``
    maps platform names of ``PLATFORMS`` and ``DEFAULT`` to functions of nothing (they
    close over their arrays). One function for every platform is called directly."""
    kinds = list(dict.fromkeys(branches.values()))
    if len(kinds) == 1 and (DEFAULT in branches or set(PLATFORMS) <= set(branches)):
        return kinds[0]()
    named = {p: fn for p, fn in branches.items() if p != DEFAULT}
    return jax.lax.platform_dependent(default=branches.get(DEFAULT), **named)
