"""Triton backend, the entry point: block sizes, the block mask's checks, and the kernel
layout and padding around the kernels (why a call cannot run on them is ``_eligibility``)."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from .._block_mask import BlockMask
from .._config import block_fields
from .._platforms import DEFAULT, GPUS, known_platform, on_platforms
from .._scores import Operands, ScoreConfig, bias_axes
from ._calls import _kernel_attention
from ._eligibility import call_problem, traced_score_arrays
from ._tile_math import TileConfig, _is_tile, _tile_width
from ._tile_program import _MIN_TILE, PallasUnsupportedError, kernel_consts
from ._tuning import Tuning, compiled_tuning, whole_blocks

Array = Any  # jax.Array, or a Pallas ref inside a kernel
_F32 = jnp.float32

# Split-K when compiled: split the key lists of a forward with fewer programs than this
# (about two per SM of a 132-SM H100/H200) into at most as many shares as bring it
# there, each of at least _MIN_SPLIT_BLOCKS key blocks; likewise split the query heads
# of a GQA group across dK/dV programs. Not yet tuned on a GPU.
_TARGET_PROGRAMS = 256
_MIN_SPLIT_BLOCKS = 4


# ------------------------------------------------------------------------ entry points


def _block_side(length: int) -> int:
    return min(128, 1 << (max(_MIN_TILE, length) - 1).bit_length())


def block_sizes(*, q_len: int, k_len: int, **_: Any) -> tuple[int, int]:
    """The kernel's default ``(query block, key block)``: for each length a power of two
    in ``[16, 128]``, not clamped to the length (the kernel pads). The other keywords
    of the backends' ``block_sizes`` (batch, heads, head dimensions, band) do not
    change it."""
    return _block_side(q_len), _block_side(k_len)


def _check_block_mask(block_mask: BlockMask, q: Any, k: Any, v: Any) -> None:
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a BlockMask, got {type(block_mask).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name} must be 4-D (B, L, H, d), got shape {jnp.shape(x)}")
    bsz, q_len, q_heads, d = q.shape
    kb, k_len, kv_heads, kd = k.shape
    if kb != bsz or kd != d or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"q {q.shape}, k {k.shape} and v {v.shape} do not fit: expected q (B, Lq, Hq, d), "
            "k (B, Lk, Hkv, d), v (B, Lk, Hkv, dv)"
        )
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of k/v heads ({kv_heads})")
    _, _, mask_q, mask_k = block_mask.shape
    if (mask_q, mask_k) != (q_len, k_len):
        raise ValueError(
            f"block_mask is for q_len={mask_q}, k_len={mask_k}, but q has length {q_len} "
            f"and k has length {k_len}"
        )
    if block_mask.mask_batch not in (1, bsz) or block_mask.mask_heads not in (1, q_heads):
        raise ValueError(
            f"block_mask lists are kept for {block_mask.mask_batch} batch rows and "
            f"{block_mask.mask_heads} heads, which does not fit B={bsz}, Hq={q_heads}"
        )
    bq, bk = block_mask.block_size
    if not (_is_tile(bq) and _is_tile(bk)):
        raise ValueError(
            f"block_mask has block_size={block_mask.block_size}; the Pallas kernel needs "
            "powers of two >= 16 (Triton tiles): build the block mask with such a "
            "block_size"
        )


def attend(
    q: Any,
    k: Any,
    v: Any,
    block_mask: BlockMask,
    scale: float,
    scores: ScoreConfig | None = None,
    operands: Operands | None = None,
    *,
    interpret: bool | None = None,
    backward_tile: int | None = None,
    num_warps: int | None = None,
    kv_splits: int | None = None,
    tuning: Tuning | None = None,
    group_splits: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Attention under ``block_mask`` with the fused Pallas kernels, and its lse: the
    backend's entry point, called as the XLA backend's ``attend`` is (4-D inputs, the
    block mask, the scale, the score changes and their arrays), plus its own tuning.

    Args:
        q: Queries ``(B, Lq, Hq, d)``.
        k: Keys ``(B, Lk, Hkv, d)``, ``Hq`` a multiple of ``Hkv``.
        v: Values ``(B, Lk, Hkv, dv)``.
        block_mask: The mask, with block sizes that are powers of two ``>= 16``.
        scale: Factor for the scores ``q @ k^T``.
        interpret: Run the kernels in Pallas interpret mode; ``None``: unless the call
            is lowered for a GPU (a program traced for a platform known only when it is
            lowered holds both).
        scores: The score changes (soft-cap, ``score_mod`` program, which axes the bias
            varies along) and the dropout rate, as built by ``masked_attention_via_map``.
        operands: Their arrays: a rank-4 ``bias`` broadcastable to ``(B, Hq, Lq, Lk)``
            (gets a gradient), the arrays ``score_mod`` closes over and, with dropout,
            the ``(B, Hq)`` seeds from which every pass regenerates its tiles' keep
            decisions (``_dropout``).
        backward_tile: The inner side of the backward kernels' tiles (keys per slice in
            dQ, queries per slice in dK/dV), a power of two ``>= 16``; ``None``: the
            tuning's.
        num_warps: Warps per Triton program of every kernel; ``None``: the tuning's.
        kv_splits: Forward programs per query tile, each over an equal share of its
            key lists, merged by log-sum-exp (split-K); ``None``: 1 when interpreted,
            enough to reach about ``_TARGET_PROGRAMS`` programs when compiled (decoding
            and other calls with few, long rows).
        tuning: Each kernel's tiles, warps and stages; ``None``: the table of
            ``_tuning`` for the head dimension and dtype when compiled (two stages at
            most with a ``score_mod``), whole blocks when interpreted.
        group_splits: dK/dV programs per key tile, each over an equal share of the
            query heads of a key/value head (a divisor of ``Hq / Hkv``); ``None``: 1
            when interpreted, enough to reach about ``_TARGET_PROGRAMS`` programs when
            compiled.

    Returns:
        ``(out, lse)``: the output ``(B, Lq, Hq, dv)`` in ``q``'s dtype and the natural
        log of each row's softmax denominator, ``(B, Hq, Lq)`` float32, ``-inf`` for
        rows without a visible key (whose output is 0). Both are differentiable.

    Raises:
        ValueError: Shapes that do not fit each other or the block mask, block sizes
            that are not powers of two ``>= 16``.
        PallasUnsupportedError: A ``mask_fn`` or ``score_mod`` the kernel cannot
            evaluate on tiles (a ``ValueError``).
    """
    options = (backward_tile, num_warps, kv_splits, tuning, group_splits)
    run = partial(_attend, q, k, v, block_mask, scale, scores, operands, options)
    if interpret is not None:
        return run(bool(interpret))
    # Compiled where the call is lowered for a GPU, interpreted elsewhere.
    platform = known_platform()
    if platform is not None:
        return run(platform not in GPUS)
    return on_platforms({**dict.fromkeys(GPUS, partial(run, False)), DEFAULT: partial(run, True)})


def _attend(
    q: Any,
    k: Any,
    v: Any,
    block_mask: BlockMask,
    scale: float,
    scores: ScoreConfig | None,
    operands: Operands | None,
    options: tuple[int | None, int | None, int | None, Tuning | None, int | None],
    interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """``attend`` interpreted or compiled, as ``interpret`` says (``options``: its
    ``backward_tile``, ``num_warps``, ``kv_splits``, ``tuning``, ``group_splits``)."""
    backward_tile, num_warps, kv_splits, tuning, group_splits = options
    _check_block_mask(block_mask, q, k, v)
    scores = scores or ScoreConfig()
    operands = operands or Operands(None, ())
    problem = call_problem(
        block_mask,
        scores,
        operands,
        head_dim=max(q.shape[-1], v.shape[-1]),
        dtype=q.dtype,
        interpret=interpret,
    )
    if problem is not None:
        raise PallasUnsupportedError(problem)
    _, q_len, q_heads, _ = q.shape
    _, k_len, kv_heads, _ = v.shape
    consts, dtypes = kernel_consts(block_mask.mask_consts)
    score_consts, score_dtypes = kernel_consts(operands.score_consts)
    bias = operands.bias
    if bias is not None:
        bias = jnp.asarray(bias)
        full = (q.shape[0], q_heads, q_len, k_len)
        if bias.ndim != 4 or any(n not in (1, m) for n, m in zip(bias.shape, full, strict=True)):
            raise ValueError(
                f"bias must be rank 4 and broadcastable to (B, Hq, Lq, Lk) = {full}, got "
                f"shape {bias.shape}"
            )
        scores = replace(scores, bias=bias_axes(bias.shape))
    bq, bk = block_mask.block_size
    if tuning is None:
        width = _tile_width(max(q.shape[-1], v.shape[-1]))
        tuning = whole_blocks(bq, bk) if interpret else compiled_tuning(width, q.dtype)
        if scores.score is not None:
            # score_mod's reads of its arrays are tile-shaped gathers, which Triton
            # pipelines like the keys: a third stage took the forward to 192 KiB of
            # shared memory on sm_90 and 160 on sm_80 in the compile report.
            tuning = Tuning(*(replace(t, stages=min(t.stages, 2)) for t in tuning.kernels))
            # The gathers in flight also hold registers: with 128-row forward tiles the
            # forward spilled (60 B at d=128 in the compile report); 64 rows spill none.
            forward = replace(tuning.forward, rows=min(tuning.forward.rows, 64))
            tuning = replace(tuning, forward=forward)
    if backward_tile is not None:
        if not _is_tile(backward_tile):
            raise ValueError(f"backward_tile must be a power of two >= 16, got {backward_tile}")
        tuning = replace(
            tuning,
            dq=replace(tuning.dq, cols=backward_tile),
            dkdv=replace(tuning.dkdv, cols=backward_tile),
        )
    if num_warps is not None:
        tuning = Tuning(*(replace(t, warps=num_warps) for t in tuning.kernels))
    config = TileConfig(
        **block_fields(block_mask, q_len=q_len, k_len=k_len, scale=scale),
        q_heads=q_heads,
        kv_heads=kv_heads,
        const_dtypes=tuple(dtypes),
        interpret=interpret,
        tuning=tuning,
        scores=scores,
        score_dtypes=tuple(score_dtypes),
        score_grads=(
            () if scores.score is None else traced_score_arrays(scores.score, operands.score_consts)
        ),
    )
    bsz = q.shape[0]
    if kv_splits is None:
        programs = bsz * q_heads * config.row_tiles("forward")
        kv_splits = 1
        if not interpret and programs < _TARGET_PROGRAMS:
            wanted = -(-_TARGET_PROGRAMS // programs)
            kv_splits = max(1, min(wanted, config.n_k_blocks // _MIN_SPLIT_BLOCKS))
    elif isinstance(kv_splits, bool) or not isinstance(kv_splits, int) or kv_splits < 1:
        raise ValueError(f"kv_splits must be a positive int, got {kv_splits!r}")
    groups = q_heads // kv_heads
    if group_splits is None:
        group_splits = 1
        programs = bsz * kv_heads * config.row_tiles("dkdv")
        if not interpret:
            # The fewest shares of the group that bring the dK/dV grid to the target.
            shares = [n for n in range(1, groups + 1) if groups % n == 0]
            group_splits = next((n for n in shares if programs * n >= _TARGET_PROGRAMS), groups)
    elif (
        isinstance(group_splits, bool)
        or not isinstance(group_splits, int)
        or group_splits < 1
        or groups % group_splits
    ):
        raise ValueError(
            f"group_splits must be a positive divisor of Hq / Hkv = {groups}, got {group_splits!r}"
        )
    config = replace(config, kv_splits=kv_splits, group_splits=group_splits)
    offset = jnp.asarray(block_mask.q_offset, jnp.int32).reshape(-1)
    kv_lists = (*(jnp.asarray(x, jnp.int32) for x in block_mask.schedule("kv")), offset)
    q_lists = (*(jnp.asarray(x, jnp.int32) for x in block_mask.schedule("q")), offset)
    all_consts = (*consts, *score_consts)
    seeds = operands.seeds if scores.dropout_rate else None
    if scores.dropout_rate and seeds is None:
        raise ValueError("dropout needs its (B, Hq) seeds in operands.seeds")
    return _attend_padded(config, (q, k, v), bias, (kv_lists, q_lists), all_consts, seeds)


@partial(jax.jit, static_argnums=(0,))
def _attend_padded(
    config: TileConfig,
    qkv: tuple,
    bias: Array | None,
    lists: tuple,
    consts: tuple,
    seeds: Array | None,
) -> tuple[Array, Array]:
    """Kernel layout and padding around the kernels (``lists``: the block mask's lists,
    query-major then key-major; ``seeds``: dropout's): one compiled program per
    configuration and shapes, reused by eager calls."""
    q, k, v = qkv
    q_len, d, dv = q.shape[1], q.shape[-1], v.shape[-1]
    q_pad = config.n_q_blocks * config.q_block - q_len
    k_pad = config.n_k_blocks * config.k_block - config.k_len
    dp, dvp = _tile_width(d), _tile_width(dv)
    # Zero padding: padded keys are masked in the (never full) last key block, padded
    # query rows are dropped, and zero feature columns change no score.
    qk = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, q_pad), (0, dp - d)))
    kk = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, k_pad), (0, dp - d)))
    vk = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, k_pad), (0, dvp - dv)))
    if bias is not None:
        pads = ((0, 0), (0, 0), (0, q_pad if bias.shape[2] > 1 else 0))
        bias = jnp.pad(bias, (*pads, (0, k_pad if bias.shape[3] > 1 else 0)))
    out, lse = _kernel_attention(config, qk, kk, vk, bias, seeds, *lists, consts)
    out = out[:, :, :q_len, :dv].transpose(0, 2, 1, 3)
    lse = lse[:, :, :q_len]
    return out, lse
