"""XLA backend, the entry point: the kernel layout and padding around the block loop, and
one compiled program per static configuration.

Layout handed to the loop: queries ``(B, Hk, Lq_pad * G, d)`` (rows ordered query
position major, head within the group minor), keys ``(B, Hk, Lk_pad, d)``, values
``(B, Hk, Lk_pad, dv)``; ``Hk`` is ``Hkv`` (a group's ``G`` query heads share each key
block's matmul) or, when the mask depends on the head, ``Hq`` with ``G = 1`` (key/value
heads repeated per query head). A bias is ``(Bb, Hb, Lq_b, G_b, Lk_b)`` with size-1 axes
where it broadcasts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._block_mask import BlockMask
from .._cache import LRUCache
from .._config import block_fields
from .._elementwise import has_tracers
from .._scores import Operands, ScoreConfig
from ._loop import KernelConfig, block_attention

# Compiled programs, one per static configuration; bounded.
_PROGRAMS = LRUCache[Callable[..., Any]](64)


def _any_listed(count: Any) -> bool:
    """Whether any row lists a block; ``True`` when only the device knows."""
    if has_tracers([count]):
        return True
    return bool(np.asarray(count).any())


def call_problem(
    block_mask: BlockMask, scores: ScoreConfig, operands: Operands, **shape: Any
) -> str | None:
    """Why the block loop cannot compute a call: never (``None``); every backend answers
    this question before the dispatcher calls its ``attend`` (``shape``: the head
    dimension and dtype, which the block loop takes whatever they are)."""
    return None


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_mask: BlockMask,
    scale: float,
    scores: ScoreConfig | None = None,
    operands: Operands | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Attention of 4-D inputs under ``block_mask`` with the block-loop backend: the
    output and the per-row log-sum-exp ``(B, Hq, Lq)``."""
    scores = scores or ScoreConfig()
    operands = operands or Operands(None, ())
    bsz, q_len, q_heads, _ = q.shape
    _, k_len, kv_heads, _ = k.shape
    mask_heads = block_mask.mask_heads
    per_head = mask_heads > 1
    config = KernelConfig(
        **block_fields(block_mask, q_len=q_len, k_len=k_len, scale=scale),
        batch=bsz,
        kv_heads=q_heads if per_head else kv_heads,
        groups=1 if per_head else q_heads // kv_heads,
        any_full=block_mask.walk != "lists" or _any_listed(block_mask.full_kv_num_blocks),
        any_partial=block_mask.walk != "lists" or _any_listed(block_mask.kv_num_blocks),
        scores=scores,
    )
    schedule = (block_mask.schedule("kv"), block_mask.q_offset)
    program = _PROGRAMS.get(config, lambda: jax.jit(lambda *a: _attend(config, *a)))
    return program(q, k, v, schedule, block_mask.mask_consts, operands)


def _kernel_bias(config: KernelConfig, bias: jax.Array, q_pad: int, k_pad: int) -> jax.Array:
    """A rank-4 bias ``(Bb, Hb, Lqb, Lkb)`` in kernel layout ``(Bb, Hb', Lqb, Gb, Lkb)``,
    padded to whole blocks along the axes it does not broadcast over."""
    bb, hb, lqb, lkb = bias.shape
    heads, groups = config.kv_heads, config.groups
    if hb > 1 and groups > 1:
        bias = bias.reshape(bb, heads, groups, lqb, lkb).transpose(0, 1, 3, 2, 4)
    else:
        bias = bias[:, :, :, None, :]
    pads = [(0, 0)] * 5
    if lqb > 1:
        pads[2] = (0, q_pad)
    if lkb > 1:
        pads[4] = (0, k_pad)
    return jnp.pad(bias, pads)


def _attend(
    config: KernelConfig,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    schedule: tuple,
    consts: tuple,
    operands: Operands,
) -> tuple[jax.Array, jax.Array]:
    """Kernel layout and padding around ``block_attention``."""
    bsz, q_len, q_heads, d = q.shape
    kv_heads = k.shape[2]
    heads, groups, dv = config.kv_heads, config.groups, v.shape[-1]
    q_pad = config.n_q_blocks * config.q_block - q_len
    k_pad = config.n_k_blocks * config.k_block - config.k_len
    if heads != kv_heads:
        # The mask depends on the query head: each query head gets its own lists, so
        # key/value heads are repeated per query head (and their gradients summed).
        k = jnp.repeat(k, heads // kv_heads, axis=2)
        v = jnp.repeat(v, heads // kv_heads, axis=2)
    # (B, Lq, Hk * G, d) -> (B, Hk, Lq * G, d): the rows of one query block are
    # contiguous and the G query heads that share a key/value head share its matmul.
    qk = q.reshape(bsz, q_len, heads, groups, d).transpose(0, 2, 1, 3, 4)
    qk = jnp.pad(qk, ((0, 0), (0, 0), (0, q_pad), (0, 0), (0, 0)))
    qk = qk.reshape(bsz, heads, (q_len + q_pad) * groups, d)
    kk = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, k_pad), (0, 0)))
    vk = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, k_pad), (0, 0)))
    bias = None if operands.bias is None else _kernel_bias(config, operands.bias, q_pad, k_pad)
    kernel_operands = Operands(bias, operands.score_consts, operands.seeds)
    out, lse = block_attention(config, qk, kk, vk, schedule, consts, kernel_operands)
    out = out.reshape(bsz, heads, q_len + q_pad, groups, dv)[:, :, :q_len]
    out = out.transpose(0, 2, 1, 3, 4).reshape(bsz, q_len, q_heads, dv)
    lse = lse.reshape(bsz, heads, q_len + q_pad, groups)[:, :, :q_len]
    lse = lse.transpose(0, 1, 3, 2).reshape(bsz, q_heads, q_len)
    return out, lse
