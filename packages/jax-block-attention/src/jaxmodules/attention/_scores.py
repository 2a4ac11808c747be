"""What every backend shares around its kernels: the per-tile score pipeline, the arrays
it reads, and the softmax statistics conventions.

For each visible (query, key) pair, in the order the contract fixes::

    s0 = scale * q.k          (float32)
    s1 = s0 + bias[b, h, q, k]
    s2 = cap * tanh(s1 / cap)                    when logits_soft_cap is set
    s3 = score_mod(s2, b, h, q, k)               when score_mod is given

Each backend evaluates ``score_mod`` on a tile its own way (the XLA block loop on index
arrays, the Pallas kernels on index vectors reading kernel refs) and hands it to
``tile_scores`` / ``tile_score_gradients`` as a function of the tile's ``s2``. The
backward pass recomputes ``s1`` and ``s2`` from the tile and maps the gradient of ``s3``
back to the gradient of ``s1`` (which is also the gradient of ``bias``) and to the
values ``score_mod`` read from its floating arrays.

The log-sum-exp of a row with no visible key is ``-inf`` wherever it leaves a backend;
the backward passes use ``+inf`` instead (``backward_statistics``), so that ``exp(s - lse)``
vanishes on those rows. Attention sinks change only each row's softmax denominator:
they are applied once, after any backend, from the lse (``with_sinks``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._elementwise import ElementwiseProgram

Array = jax.Array
_F32 = jnp.float32

# score_mod on one tile, as a function of the tile's s2 and, for gradients, of the
# values it reads from its differentiable arrays (``None``: read them as they are).
ScoreMod = Callable[..., Any]


@dataclass(frozen=True)
class ScoreConfig:
    """Static description of the score changes of one call (hashable).

    Attributes:
        soft_cap: ``logits_soft_cap`` or ``None``.
        score: The traced ``score_mod`` or ``None``.
        bias: ``None`` without a bias; else which of (batch, head, query, key) it varies
            along.
        dropout_rate: Attention dropout on the normalised weights (0: none), its seeds
            in ``Operands.seeds``; it leaves the scores and the softmax statistics as
            they are (see ``_dropout``).
    """

    soft_cap: float | None = None
    score: ElementwiseProgram | None = None
    bias: tuple[bool, bool, bool, bool] | None = None
    dropout_rate: float = 0.0

    @property
    def changes_scores(self) -> bool:
        return self.soft_cap is not None or self.score is not None or self.bias is not None


@dataclass(frozen=True)
class Operands:
    """The arrays of the score pipeline: ``bias`` (or ``None``) and the arrays
    ``score_mod`` closes over. Each backend lays them out for its kernels. Also
    dropout's ``(B, Hq)`` uint32 seeds (``None`` without dropout), which every backend
    reads as they are."""

    bias: Array | None
    score_consts: tuple
    seeds: Array | None = None


jax.tree_util.register_dataclass(
    Operands, data_fields=["bias", "score_consts", "seeds"], meta_fields=[]
)


def bias_axes(shape: tuple[int, ...]) -> tuple[bool, bool, bool, bool]:
    """Which of (batch, head, query, key) a rank-4 bias of ``shape`` varies along."""
    b, h, q, k = (n > 1 for n in shape)
    return b, h, q, k


def capped_scores(soft_cap: float | None, s1: Array) -> Array:
    """``soft_cap * tanh(s1 / soft_cap)``, or ``s1`` without a cap."""
    if soft_cap is None:
        return s1
    cap = _F32(soft_cap)
    return cap * jnp.tanh(s1 / cap)


def tile_scores(
    scores: ScoreConfig, s0: Array, bias: Array | None, score_mod: ScoreMod | None
) -> Array:
    """The final float32 scores of a tile from its scaled products ``s0``: plus the bias
    tile, soft-capped, then ``score_mod(s2)`` (the backend's evaluation on this tile)."""
    s1 = s0 if bias is None else s0 + bias.astype(_F32)
    s2 = capped_scores(scores.soft_cap, s1)
    return s2 if score_mod is None else score_mod(s2)


def tile_score_gradients(
    scores: ScoreConfig,
    s0: Array,
    bias: Array | None,
    d_scores: Array,
    score_mod: ScoreMod | None,
    values: Sequence[Array] = (),
) -> tuple[Array, list[Array]]:
    """The gradient ``d_scores`` of a tile's final scores mapped back to ``s1 = s0 +
    bias`` (the gradient of the products and of the bias), and the gradients of
    ``values``, what ``score_mod`` read from its differentiable arrays (it is called as
    ``score_mod(s2, values)``). ``score_mod`` is element-wise in the score: without
    ``values`` its derivative is one forward-mode pass on the tile, with them one
    reverse pass that takes them as inputs."""
    if scores.soft_cap is None and score_mod is None:
        return d_scores, []
    s1 = s0 if bias is None else s0 + bias.astype(_F32)
    s2 = capped_scores(scores.soft_cap, s1)
    d_values: list[Array] = []
    if score_mod is not None and values:
        _, pullback = jax.vjp(score_mod, s2, list(values))
        d_scores, d_values = pullback(d_scores)
    elif score_mod is not None:
        _, slope = jax.jvp(score_mod, (s2,), (jnp.ones_like(s2),))
        d_scores = d_scores * slope
    if scores.soft_cap is not None:
        d_scores = d_scores * (1.0 - jnp.square(s2 / _F32(scores.soft_cap)))
    return d_scores, list(d_values)


def backward_statistics(lse: Array, d_lse: Array) -> tuple[Array, Array]:
    """The lse and its float32 cotangent as the backward passes use them: on rows without
    a visible key (lse ``-inf``) the lse becomes ``+inf``, so that ``exp(s - lse)`` is 0
    there rather than NaN, and the cotangent 0 (such rows have no gradient)."""
    empty = lse == -jnp.inf
    return jnp.where(empty, jnp.inf, lse), jnp.where(empty, 0.0, d_lse).astype(_F32)


def zero_cotangent(x: Any) -> Any:
    """A zero cotangent for ``x``: zeros for floating arrays, ``float0`` for the rest."""
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(jnp.shape(x), dtype=jax.dtypes.float0)


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
