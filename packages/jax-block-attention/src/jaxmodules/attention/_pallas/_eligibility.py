"""Triton backend, eligibility: why a call cannot run on the kernels (``None`` when it
can), from its block mask and score changes, by trial traces on the smallest tile;
answers are cached by everything they depend on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .._block_mask import BlockMask
from .._cache import LRUCache
from .._platforms import GPUS, default_platform, known_platform
from .._scores import Operands, ScoreConfig
from ._tile_math import _array_grad_width, _is_tile, _tile_width, walked_entries
from ._tile_program import ArrayRead, _tile_problem, mask_program_problem
from ._triton_rules import triton_backend_problem
from ._tuning import compiled_problem

# Gradients of traced arrays that score_mod closes over: each dQ program keeps the whole
# flattened gradient (at most this many entries) and walks an index that varies across a
# tile entry by entry (at most this many).
_MAX_ARRAY_GRADIENT = 1024
_MAX_READ_ENTRIES = 256


def block_mask_problem(block_mask: BlockMask) -> str | None:
    """Why ``block_mask`` cannot run on the Triton kernel as it is, or ``None`` when it
    can (the dispatcher re-plans a prebuilt block mask whose block sizes do not fit)."""
    bq, bk = block_mask.block_size
    if not (_is_tile(bq) and _is_tile(bk)):
        return f"block_size={block_mask.block_size} is not a pair of powers of two >= 16"
    return mask_program_problem(block_mask.program, block_mask.mask_consts)


def traced_score_arrays(program: Any, consts: Sequence[Any]) -> tuple[int, ...]:
    """Positions of the ``score_mod`` arrays that may need gradients: traced, floating."""
    return tuple(i for i in program.differentiable if isinstance(consts[i], jax.core.Tracer))


def score_program_problem(program: Any, consts: Sequence[Any]) -> str | None:
    """Why the kernel cannot run a ``score_mod`` program, or ``None`` when it can."""
    grads = traced_score_arrays(program, consts)
    for n in grads:
        shape = tuple(jnp.shape(consts[n]))
        if _array_grad_width(shape) > _MAX_ARRAY_GRADIENT:
            return (
                f"score_mod closes over a traced array of shape {shape}; the Triton kernel "
                f"keeps the gradient of such arrays per program, up to {_MAX_ARRAY_GRADIENT} "
                'entries: use implementation="xla", or a bias'
            )
    reads: list[ArrayRead] = []
    problem = _tile_problem(program, consts, with_score=True, reads=reads, recorded=grads)
    if problem is not None:
        return problem
    walked = [walked_entries(read, jnp.shape(consts[read.const])) for read in reads]
    if walked and max(walked) > _MAX_READ_ENTRIES:
        return (
            "score_mod reads a traced array at indices that vary within a tile over "
            f"{max(walked)} entries; the Pallas kernel sums their gradient entry by entry, "
            f'up to {_MAX_READ_ENTRIES}: use implementation="xla"'
        )
    return None


# Answers of call_problem, by everything they depend on (no arrays): the dispatcher
# and the kernel entry ask the same question, and eager calls ask it again each time.
_PROBLEMS = LRUCache[str | None](64)


def _avals(consts: Sequence[Any]) -> tuple:
    return tuple((tuple(jnp.shape(c)), str(jnp.result_type(c))) for c in consts)


def call_problem(
    block_mask: BlockMask,
    scores: ScoreConfig,
    operands: Operands,
    *,
    head_dim: int | None = None,
    dtype: Any = None,
    interpret: bool | None = None,
) -> str | None:
    """Why a call cannot run on the Pallas kernel, or ``None`` when it can: its block
    mask and score changes; for compiled kernels also its head dimension (the larger of
    the query's and the value's) and input dtype. ``interpret=None``: compiled on a GPU,
    interpreted elsewhere (the platform the call runs on when known now, else the
    default device's)."""
    # Outside the cache below: jax's deprecation switch may be flipped during a run.
    backend = triton_backend_problem()
    if backend is not None:
        return backend
    if interpret is None:
        compiled = (known_platform() or default_platform()) in GPUS
    else:
        compiled = not interpret
    if compiled and head_dim is not None:
        problem = compiled_problem(_tile_width(head_dim), dtype)
        if problem is not None:
            return problem
    score_consts = () if scores.score is None else tuple(operands.score_consts)
    grads = () if scores.score is None else traced_score_arrays(scores.score, score_consts)
    key = (
        block_mask.block_size,
        block_mask.program,
        _avals(block_mask.mask_consts),
        scores.score,
        _avals(score_consts),
        grads,
    )

    def answer() -> str | None:
        problem = block_mask_problem(block_mask)
        if problem is None and scores.score is not None:
            problem = score_program_problem(scores.score, score_consts)
        return problem

    return _PROBLEMS.get(key, answer)
