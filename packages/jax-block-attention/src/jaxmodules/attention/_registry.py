"""The backends, one line each: a new backend is its folder and one more line in
``BACKENDS``.

Each entry says where the backend compiles natively (``platforms``; elsewhere a kernel
backend runs in its interpret mode when asked for by name), its place in the order that
``implementation=None`` tries on those platforms (``priority``, lowest first), its default
block sizes and which block sizes its kernels tile (a block mask built for others is
re-planned for it), which primitives its kernels lower inside a ``mask_fn``/``score_mod``,
why it refuses a call on a platform, and how it runs one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from . import _cudnn as cudnn
from ._call import Call, Fits, any_blocks
from ._mosaic_gpu import _plugin as mosaic_gpu
from ._mosaic_tpu import _plugin as mosaic_tpu
from ._pallas import _plugin as triton
from ._plan import BlockSizes
from ._tile_program import Lowerable
from ._xla import _plugin as xla


@dataclass(frozen=True)
class Backend:
    """One backend of ``implementation=``.

    Attributes:
        name: The value of ``implementation`` that names it.
        platforms: Where it runs compiled (``platform_dependent``'s names: ``"cpu"``,
            ``"cuda"``, ``"rocm"``, ``"tpu"``); ``None``: everywhere.
        priority: Its place in the order of ``implementation=None`` on those platforms,
            lowest first.
        refusal: ``refusal(call, platform)``: why it cannot compute a ``_call.Call``
            lowered for ``platform`` (``None``: it can). Asked on every platform, its
            own included: a kernel backend answers for its interpret mode elsewhere.
        run: ``run(call, platform) -> (out, lse)`` on 4-D inputs; ``lse`` is ``-inf``
            on rows without a visible key, or ``None`` from a backend that refuses
            calls needing it.
        where: The module that holds its code.
        aliases: Other accepted names.
        block_sizes: Its default ``(query block, key block)`` (the keywords of
            ``_plan.BlockSizes`` and ``platform``); ``None``: it takes no block mask.
        fits: Whether its kernels tile a pair of block sizes as it is.
        lowerable: The primitives its kernels lower in a ``mask_fn``/``score_mod``
            (``None``: it evaluates no program on tiles).
        variant: What of its program depends on the platform (platforms with equal
            variants share one branch of a traced call).
    """

    name: str
    platforms: tuple[str, ...] | None
    priority: int
    refusal: Callable[[Call, str], str | None]
    run: Callable[[Call, str], tuple[Any, Any]]
    where: str
    aliases: tuple[str, ...] = ()
    block_sizes: BlockSizes | None = None
    fits: Fits = any_blocks
    lowerable: Lowerable | None = None
    variant: Callable[[str], Hashable] = lambda platform: None

    def native(self, platform: str) -> bool:
        """Whether it runs compiled on ``platform``."""
        return self.platforms is None or platform in self.platforms


# fmt: off
BACKENDS = (
    Backend("cudnn", ("cuda",), 0, cudnn.refusal, cudnn.run, "_cudnn"),
    Backend("triton", ("cuda", "rocm"), 1, triton.refusal, triton.run, "_pallas", ("pallas",),
            triton.block_sizes, triton.fits, triton.TRITON, triton.variant),
    # After Triton until a GPU's numbers decide; first where Triton refuses (missing).
    Backend("mosaic_gpu", ("cuda",), 2, mosaic_gpu.refusal, mosaic_gpu.run, "_mosaic_gpu", (),
            mosaic_gpu.block_sizes, mosaic_gpu.fits, mosaic_gpu.MOSAIC_GPU, mosaic_gpu.variant),
    Backend("mosaic_tpu", ("tpu",), 1, mosaic_tpu.refusal, mosaic_tpu.run, "_mosaic_tpu", (),
            mosaic_tpu.block_sizes, mosaic_tpu.fits, mosaic_tpu.MOSAIC_TPU, mosaic_tpu.variant),
    Backend("xla", None, 99, xla.refusal, xla.run, "_xla", (), xla.block_sizes,
            variant=xla.variant),
)
# fmt: on

_BY_NAME = {name: b for b in BACKENDS for name in (b.name, *b.aliases)}


def names() -> str:
    """The accepted values of ``implementation`` besides ``None``, for messages."""
    return ", ".join(repr(n) for n in _BY_NAME)


def check_implementation(implementation: Any) -> str | None:
    """``implementation`` checked: ``None`` or the name of a backend (an alias becomes
    the backend's name)."""
    if not (implementation is None or isinstance(implementation, str)):
        raise TypeError(
            f"implementation must be None or one of {names()}, got "
            f"{type(implementation).__name__}: {implementation!r}"
        )
    if implementation is None:
        return None
    if implementation not in _BY_NAME:
        raise ValueError(f"implementation must be None or one of {names()}, got {implementation!r}")
    return _BY_NAME[implementation].name


def backend(name: str) -> Backend:
    """The backend named ``name`` (or one of its aliases)."""
    return _BY_NAME[name]


def candidates(platform: str) -> list[Backend]:
    """The backends ``implementation=None`` tries on ``platform``, in order."""
    return sorted((b for b in BACKENDS if b.native(platform)), key=lambda b: b.priority)
