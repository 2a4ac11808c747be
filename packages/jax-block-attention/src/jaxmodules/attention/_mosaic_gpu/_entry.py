"""Mosaic GPU backend, the entry point: block sizes, the kernel layout and padding
around the kernels, and the custom VJP that runs the dQ and dK/dV kernels."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from .._block_mask import BlockMask
from .._config import block_fields
from .._scores import ScoreConfig, backward_statistics, zero_cotangent
from ._blocks import walk_tables, with_seeds

if TYPE_CHECKING:
    from ._kernels import KernelConfig

# The kernels import jax's Mosaic GPU modules when first used: a jax without them
# (older versions) still imports this package, and the plug-in refuses every call.
LOG2E = 1.4426950408889634

_WIDTH = 64  # head dimensions pad to a multiple of 64 (one 128-byte swizzle of 16-bit)
Q_BLOCK = 128  # two consumer warpgroups of 64 rows
K_BLOCK = 128


def block_sizes(**_: Any) -> tuple[int, int]:
    """The kernels' ``(query block, key block)``: ``(128, 128)`` for every call (the
    kernels pad the lengths)."""
    return Q_BLOCK, K_BLOCK


def fits(block_size: tuple[int, int]) -> bool:
    """Whether the kernels tile blocks of this size as they are."""
    return tuple(block_size) == (Q_BLOCK, K_BLOCK)


def _pad_to(n: int, m: int) -> int:
    return -(-max(n, 1) // m) * m


def attend(
    q: Any,
    k: Any,
    v: Any,
    block_mask: BlockMask,
    scale: float,
    scores: ScoreConfig | None = None,
    seeds: Any = None,
    *,
    interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """``(out, lse)`` of 4-D ``q (B, Lq, Hq, d)``, ``k``/``v (B, Lk, Hkv, d|dv)`` under
    ``block_mask`` (blocks of ``block_sizes``): output in ``q``'s dtype, lse
    ``(B, Hq, Lq)`` float32, ``-inf`` on rows without a visible key. Differentiable.
    ``scores``: the soft cap and a ``score_mod`` that closes over no arrays (the
    plug-in refuses bias and closed-over arrays) and the dropout rate, whose ``(B, Hq)``
    uint32 ``seeds`` ride in the tables' headers (``_blocks.with_seeds``)."""
    q_len, q_heads = q.shape[1], q.shape[2]
    k_len, kv_heads = k.shape[1], k.shape[2]
    width = _pad_to(max(q.shape[-1], v.shape[-1]), _WIDTH)
    from ._kernels import KernelConfig

    config = KernelConfig(
        **block_fields(block_mask, q_len=q_len, k_len=k_len, scale=scale),
        q_heads=q_heads,
        kv_heads=kv_heads,
        head_dim=width,
        key_dim=q.shape[-1],
        value_dim=v.shape[-1],
        interpret=interpret,
        scores=scores or ScoreConfig(),
        per_head_tables=bool(scores and scores.dropout_rate),
    )
    tables = walk_tables(block_mask)
    if config.per_head_tables:
        if seeds is None:
            raise ValueError("dropout needs its (B, Hq) seeds")
        tables = tuple(with_seeds(t, seeds) for t in tables)
    return _attend(config, q, k, v, tables)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(config: KernelConfig, q: Any, k: Any, v: Any, tables: Any) -> tuple[Any, Any]:
    out, lse, _ = _forward(config, q, k, v, tables)
    return out, lse


def _padded(config: KernelConfig, q: Any, k: Any, v: Any) -> tuple[Any, Any, Any]:
    """Lengths padded to whole blocks, head dimensions to one width (zero columns
    change no score; padded keys are masked in the never-full last key block)."""
    lq = _pad_to(config.q_len, config.q_block) - config.q_len
    lk = _pad_to(config.k_len, config.k_block) - config.k_len
    w = config.head_dim

    def pad(x: Any, n: int) -> Any:
        return jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, w - x.shape[-1])))

    return pad(q, lq), pad(k, lk), pad(v, lk)


def _forward(config: KernelConfig, q: Any, k: Any, v: Any, tables: Any) -> tuple[Any, Any, Any]:
    qp, kp, vp = _padded(config, q, k, v)
    from ._kernels import forward

    out, lse = forward(config, qp, kp, vp, tables[0])
    out = out[:, : config.q_len, :, : config.value_dim]
    lse = lse[:, :, : config.q_len]
    return out, lse, (qp, kp, vp)


def _attend_fwd(config: KernelConfig, q: Any, k: Any, v: Any, tables: Any) -> tuple:
    out, lse, padded = _forward(config, q, k, v, tables)
    return (out, lse), (padded, out, lse, tables)


def _attend_bwd(config: KernelConfig, res: tuple, cts: tuple) -> tuple:
    (qp, kp, vp), out, lse, tables = res
    d_out, d_lse = cts
    do = jnp.pad(
        d_out, ((0, 0), (0, qp.shape[1] - out.shape[1]), (0, 0), (0, qp.shape[-1] - out.shape[-1]))
    )
    # backward_statistics: +inf on rows without a visible key (their p vanishes); an lse
    # cotangent enters as a shift of delta (d lse / d s = p).
    lse_b, g = backward_statistics(lse, d_lse)
    delta = -g + jnp.einsum("blhd,blhd->bhl", d_out.astype(jnp.float32), out.astype(jnp.float32))
    pad_q = ((0, 0), (0, 0), (0, qp.shape[1] - lse.shape[-1]))
    lse2 = jnp.pad(lse_b * LOG2E, pad_q, constant_values=jnp.inf)
    delta = jnp.pad(delta, pad_q)
    do = do.astype(qp.dtype)
    from ._kernels import dkdv, dq

    dq_p = dq(config, qp, kp, vp, do, lse2, delta, tables[0])
    dk_p, dv_p = dkdv(config, qp, kp, vp, do, lse2, delta, tables[1])
    b, lk, _, w = dk_p.shape

    def per_kv_head(x: Any, width: int) -> Any:
        x = x.astype(jnp.float32).reshape(b, lk, config.kv_heads, config.groups, w).sum(3)
        return x[:, : config.k_len, :, :width].astype(qp.dtype)

    d_q = dq_p[:, : config.q_len, :, : config.key_dim]
    zeros = jax.tree.map(zero_cotangent, tables)
    return d_q, per_kv_head(dk_p, config.key_dim), per_kv_head(dv_p, config.value_dim), zeros


_attend.defvjp(_attend_fwd, _attend_bwd)
