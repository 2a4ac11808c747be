"""The per-tile score pipeline every backend shares: scale, bias, soft-cap, ``score_mod``.

For each visible (query, key) pair, in the order the contract fixes::

    s0 = scale * q.k          (float32)
    s1 = s0 + bias[b, h, q, k]
    s2 = cap * tanh(s1 / cap)                    when logits_soft_cap is set
    s3 = score_mod(s2, b, h, q, k)               when score_mod is given

The backward pass recomputes ``s1`` and ``s2`` from the tile and maps the gradient of
``s3`` back to the gradient of ``s1`` (which is also the gradient of ``bias``) and to the
floating arrays ``score_mod`` closes over. Attention sinks enter only the softmax
denominator and live with the online softmax of each backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from ._elementwise import ElementwiseProgram

Array = jax.Array
_F32 = jnp.float32


@dataclass(frozen=True)
class ScoreConfig:
    """Static description of the score changes of one call (hashable).

    Attributes:
        soft_cap: ``logits_soft_cap`` or ``None``.
        score: The traced ``score_mod`` or ``None``.
        bias: ``None`` without a bias; else which of (batch, head, query, key) it varies
            along.
        sinks: Whether per-head sink logits join every softmax denominator.
    """

    soft_cap: float | None = None
    score: ElementwiseProgram | None = None
    bias: tuple[bool, bool, bool, bool] | None = None
    sinks: bool = False

    @property
    def changes_scores(self) -> bool:
        return self.soft_cap is not None or self.score is not None or self.bias is not None


def bias_axes(shape: tuple[int, ...]) -> tuple[bool, bool, bool, bool]:
    """Which of (batch, head, query, key) a rank-4 bias of ``shape`` varies along."""
    b, h, q, k = (n > 1 for n in shape)
    return b, h, q, k


@dataclass(frozen=True)
class Operands:
    """The arrays of the score pipeline: ``bias`` and ``sinks`` (or ``None``) and the
    arrays ``score_mod`` closes over. Each backend lays them out for its kernels."""

    bias: Array | None
    sinks: Array | None
    score_consts: tuple


jax.tree_util.register_dataclass(
    Operands, data_fields=["bias", "sinks", "score_consts"], meta_fields=[]
)


@dataclass(frozen=True)
class TileIndex:
    """Index arrays of one tile in the ``(batch, head, row, key)`` layout of the scores,
    for ``score_mod``: each broadcasts against the ``(bs, hs, rows, bk)`` tile."""

    b: Array
    h: Array
    q: Array
    k: Array


def capped_scores(soft_cap: float | None, s1: Array) -> Array:
    """``soft_cap * tanh(s1 / soft_cap)``, or ``s1`` without a cap."""
    if soft_cap is None:
        return s1
    cap = _F32(soft_cap)
    return cap * jnp.tanh(s1 / cap)


def _modified(
    config: ScoreConfig, s2: Array, consts: Sequence[Array], index: TileIndex | None
) -> Array:
    if config.score is None:
        return s2
    assert index is not None
    out = config.score.evaluate(consts, s2, index.b, index.h, index.q, index.k)
    return jnp.broadcast_to(out, s2.shape).astype(_F32)


def tile_scores(
    config: ScoreConfig,
    s0: Array,
    bias: Array | None,
    consts: Sequence[Array],
    index: TileIndex | None,
) -> Array:
    """The final float32 scores of a tile from its scaled products ``s0``."""
    s1 = s0 if bias is None else s0 + bias.astype(_F32)
    return _modified(config, capped_scores(config.soft_cap, s1), consts, index)


def tile_score_gradients(
    config: ScoreConfig,
    s0: Array,
    bias: Array | None,
    consts: Sequence[Array],
    index: TileIndex | None,
    d_scores: Array,
) -> tuple[Array, tuple[Array, ...]]:
    """Gradient of the tile's final scores mapped back: to ``s1 = s0 + bias`` (so to the
    products and to ``bias``) and to the floating arrays ``score_mod`` closes over (in
    the order of ``config.score.differentiable``)."""
    s1 = s0 if bias is None else s0 + bias.astype(_F32)
    s2 = capped_scores(config.soft_cap, s1)
    d_consts: tuple[Array, ...] = ()
    d_s2 = d_scores
    if config.score is not None:
        assert index is not None
        positions = config.score.differentiable
        floats = [consts[i] for i in positions]

        def modify(s: Array, floats: list[Array]) -> Array:
            full = list(consts)
            for i, value in zip(positions, floats, strict=True):
                full[i] = value
            return _modified(config, s, full, index)

        _, pullback = jax.vjp(modify, s2, floats)
        d_s2, d_floats = pullback(d_scores)
        d_consts = tuple(d_floats)
    if config.soft_cap is None:
        return d_s2, d_consts
    cap = _F32(config.soft_cap)
    return d_s2 * (1.0 - jnp.square(s2 / cap)), d_consts


def sink_logits(sinks: Array | None, shape: tuple[int, ...]) -> Array | None:
    """Per-row sink logits broadcast to ``shape`` (the tile's row statistics)."""
    if sinks is None:
        return None
    return jnp.broadcast_to(sinks.astype(_F32), shape)


def zeros_like_floats(consts: Sequence[Any], positions: Sequence[int]) -> tuple[Array, ...]:
    return tuple(jnp.zeros(jnp.shape(consts[i]), _F32) for i in positions)


def merge_by_lse(outs: Array, lses: Array) -> tuple[Array, Array]:
    """Partial softmax results over disjoint key sets, merged through their
    log-sum-exp: ``outs (S, ..., dv)`` and ``lses (S, ...)`` along the leading axis.
    Each part weighs ``exp(lse_part - lse)``; a part that saw no key (``lse = -inf``)
    weighs 0. Returns the float32 output and the merged lse (``-inf`` if no part saw a
    key)."""
    top = jax.lax.stop_gradient(lses.max(axis=0))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(lses - top)  # exp(-inf) = 0
    total = weights.sum(axis=0)
    safe = jnp.where(total > 0, total, 1.0)
    out = (weights[..., None] * outs.astype(_F32)).sum(axis=0) / safe[..., None]
    return out, jnp.where(total > 0, top + jnp.log(safe), -jnp.inf)


def with_sinks(out: Array, lse: Array, sinks: Array) -> tuple[Array, Array]:
    """Output ``(B, Lq, Hq, dv)`` and lse ``(B, Hq, Lq)`` of rows whose softmax
    denominator also holds ``exp(sinks[h])`` (a key with value 0), from those without
    it: the denominator grows from ``exp(lse)`` to ``exp(lse) + exp(sink)``, so the
    output shrinks by their ratio. Differentiable, ``sinks`` included."""
    sink = jnp.asarray(sinks, _F32)[None, :, None]
    total = jnp.logaddexp(lse, sink)
    factor = jnp.exp(lse - total).transpose(0, 2, 1)[..., None]  # (B, Lq, Hq, 1)
    return (out.astype(_F32) * factor).astype(out.dtype), total
