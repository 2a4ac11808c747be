"""Mosaic GPU backend, as the dispatcher calls it: compiled on an NVIDIA GPU (sm_90+),
in Mosaic GPU interpret mode on any other platform; refusals for what its kernels do not
compute (yet), each naming a backend that does."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .._call import Call
from .._tile_program import tile_problem
from ._entry import attend, block_sizes, fits
from ._rules import MOSAIC_GPU, mosaic_gpu_problem

__all__ = ["MOSAIC_GPU", "block_sizes", "fits", "refusal", "run", "variant"]

_MAX_WIDTH = 128  # K and V slots of 128 x 256 for two stages exceed shared memory
_OTHERS = "triton or xla"


def variant(platform: str) -> bool:
    """Compiled (on an NVIDIA GPU) or interpreted: the one difference between platforms."""
    return platform == "cuda"


def _device_problem(platform: str) -> str | None:
    """A local CUDA GPU older than Hopper (no wgmma); a compile-only or absent device
    says nothing."""
    if platform != "cuda":
        return None
    try:
        devices = jax.devices("cuda")
    except RuntimeError:
        return None
    capability = getattr(devices[0], "compute_capability", None) if devices else None
    if capability is not None and float(capability) < 9.0:
        return f"its kernels need sm_90+ (wgmma, TMA); this GPU is sm_{capability}: use {_OTHERS}"
    return None


def _score_problem(call: Call) -> str | None:
    scores = call.scores
    if scores.bias is not None:
        return f"bias is not in its kernels yet: use {_OTHERS}"
    if scores.score is not None:
        if call.operands.score_consts:
            return (
                "a score_mod that closes over arrays (ALiBi slopes, tables) is not in its "
                f"kernels yet: use {_OTHERS}"
            )
        return tile_problem(scores.score, (), MOSAIC_GPU, with_score=True)
    return None


def refusal(call: Call, platform: str) -> str | None:
    """Why the kernels cannot compute ``call`` when lowered for ``platform``."""
    if call.empty:
        return None
    problem = mosaic_gpu_problem() or _device_problem(platform)
    if problem is not None:
        return problem
    dtypes = {jnp.dtype(x.dtype) for x in (call.args.q, call.args.k, call.args.v)}
    if not dtypes <= {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)} or len(dtypes) > 1:
        names = ", ".join(sorted(str(d) for d in dtypes))
        return (
            f"its kernels take bfloat16 or float16 inputs of one dtype, got {names}: "
            f"float32 runs on {_OTHERS}"
        )
    if call.head_dim > _MAX_WIDTH:
        return (
            f"head dimensions above {_MAX_WIDTH} (got {call.head_dim}) are not in its "
            f"kernels yet: use {_OTHERS}"
        )
    if isinstance(call.scale, jax.core.Tracer):
        return f"a traced scale is not in its kernels yet: use {_OTHERS}"
    problem = _score_problem(call)
    if problem is not None:
        return problem
    block_mask = call.block_mask(block_sizes, fits, platform)
    if block_mask.program is not None:
        if block_mask.mask_consts:
            return (
                "a mask_fn that closes over arrays (document ids, lengths) is not in its "
                f"kernels yet: use {_OTHERS}"
            )
        return tile_problem(block_mask.program, (), MOSAIC_GPU, with_score=False)
    return None


def run(call: Call, platform: str) -> tuple[Any, Any]:
    """``(out, lse)`` of ``call`` by the kernels, interpreted off an NVIDIA GPU."""
    if call.empty:
        return call.empty_result()
    block_mask = call.block_mask(block_sizes, fits, platform)
    args = call.args
    return attend(
        args.q,
        args.k,
        args.v,
        block_mask,
        call.scale,
        call.scores,
        call.operands.seeds,
        interpret=platform != "cuda",
    )
