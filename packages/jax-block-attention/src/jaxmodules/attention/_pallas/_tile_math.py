"""Pallas backend, the tile math: positions, visibility, the score pipeline, the online
softmax step and the gradient step, as functions of arrays apart from refs and grids."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from .._band import in_band
from .._config import BlockConfig
from .._dropout import keep_tile, threshold
from .._scores import ScoreMod
from ._tile_program import _MIN_TILE, ArrayRead, evaluate_on_tile, reader_for

Array = Any  # jax.Array, or a Pallas ref inside a kernel
_F32 = jnp.float32


def _is_tile(n: int) -> bool:
    return n >= _MIN_TILE and n & (n - 1) == 0


def _array_grad_width(shape: tuple[int, ...]) -> int:
    """Entries of a flattened array's gradient in a kernel: a power of two ``>= 16``."""
    return _tile_width(int(np.prod(shape, dtype=np.int64)))


def _tile_width(n: int) -> int:
    """The smallest power of two ``>= max(n, 16)``: a head dimension padded for Triton."""
    return max(_MIN_TILE, 1 << (n - 1).bit_length())


# ------------------------------------------------------------------------ tile math


@dataclass(frozen=True, kw_only=True)
class TileConfig(BlockConfig):
    """Everything static about one call of the kernels: the shared ``BlockConfig``, the
    heads, how the closed-over arrays travel, and the Triton tuning."""

    q_heads: int
    kv_heads: int
    const_dtypes: tuple[Any, ...]
    interpret: bool
    num_warps: int = 4
    num_stages: int = 2
    # The inner side of the backward tiles: the dQ kernel walks each listed key block in
    # slices of this many keys, the dK/dV kernel each listed query block in slices of
    # this many queries (None: whole blocks). Smaller tiles hold fewer float32 values
    # per thread on a GPU.
    backward_tile: int | None = None
    # Forward programs per query block, each walking an equal share of the block's key
    # lists; their partial results are merged through their log-sum-exp (split-K, for
    # few long rows: decoding).
    kv_splits: int = 1
    # The score_mod program's closed-over arrays' dtypes, and which of them get
    # gradients (traced floating ones), by position.
    score_dtypes: tuple[Any, ...] = ()
    score_grads: tuple[int, ...] = ()

    @property
    def groups(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def bias_gradient(self) -> str | None:
        """How the kernels write the bias gradient: ``"tiles"`` (dQ kernel, a bias that
        varies along queries and keys), ``"rows"`` (dQ kernel, row sums: constant along
        keys) or ``"columns"`` (dK/dV kernel, column sums: varies only along keys)."""
        if self.scores.bias is None:
            return None
        _, _, along_q, along_k = self.scores.bias
        if not along_k:
            return "rows"
        return "tiles" if along_q else "columns"

    def score_array_shape(self, n: int) -> tuple[int, ...]:
        """The shape of ``score_mod``'s closed-over array ``n``, as the program sees it."""
        assert self.scores.score is not None
        return tuple(self.scores.score.jaxpr.constvars[n].aval.shape)

    @property
    def dq_key_tile(self) -> int:
        return min(self.k_block, self.backward_tile or self.k_block)

    @property
    def dkdv_query_tile(self) -> int:
        return min(self.q_block, self.backward_tile or self.q_block)


def query_positions(config: TileConfig, start: Array, width: int, offset: Array) -> Array:
    """``(width,)`` positions of the query rows from row ``start``; padded rows repeat
    the last real row so that a ``mask_fn`` may index arrays of length ``Lq`` (their
    results are dropped)."""
    rows = start + jnp.arange(width, dtype=jnp.int32)
    return jnp.minimum(rows, config.q_len - 1) + offset


def key_positions(start: Array, width: int) -> Array:
    """``(width,)`` positions of the keys from ``start`` (padding included, ``>= Lk``)."""
    return start + jnp.arange(width, dtype=jnp.int32)


def over_slices(start: Array, width: int, size: int, body: Callable, carry: Any) -> Any:
    """``body(carry, first)`` over the slices of ``size`` rows that make up the ``width``
    rows from ``start`` (one call when they are one slice)."""
    if size >= width:
        return body(carry, start)
    return lax.fori_loop(0, width // size, lambda n, c: body(c, start + n * size), carry)


def tile_visible(
    config: TileConfig, const_refs: Sequence[Any], b: Array, h: Array, q_pos: Array, k_pos: Array
) -> Array:
    """The element-wise mask of a partial tile: band, key padding and ``mask_fn``, on
    broadcastable position arrays (``(bq, 1)`` and ``(1, bk)``, or transposed)."""
    visible = in_band(q_pos, k_pos, config.lo, config.hi, config.k_len)
    if config.program is not None:
        # As in the block loop and the block-mask build: a mask kept for one head is
        # evaluated at head 0 (where the program ignores heads, any head gives the same).
        h = h if config.mask_heads > 1 else 0
        k_safe = jnp.minimum(k_pos, config.k_len - 1)
        index = [jnp.asarray(x, jnp.int32) for x in (b, h, q_pos, k_safe)]
        custom = evaluate_on_tile(config.program, const_refs, config.const_dtypes, *index)
        visible = visible & custom
    return visible


def tile_score_mod(
    config: TileConfig,
    score_refs: Sequence[Any],
    b: Array,
    h: Array,
    q_pos: Array,
    k_pos: Array,
    reads: list[ArrayRead] | None = None,
) -> ScoreMod | None:
    """``score_mod`` on a tile's index vectors, its arrays read from kernel refs, as the
    shared score pipeline takes it: ``f(s2)``, or ``f(s2, values)`` with ``values``
    replacing the loads of its differentiable arrays (``config.score_grads``). The
    first ``f(s2)`` appends those loads to ``reads`` when given; ``None`` without a
    ``score_mod``."""
    program = config.scores.score
    if program is None:
        return None
    k_safe = jnp.minimum(k_pos, config.k_len - 1)
    index = [jnp.asarray(x, jnp.int32) for x in (b, h, q_pos, k_safe)]
    pending = [reads]  # only the first plain evaluation records its loads

    def score_mod(s2: Array, values: Sequence[Array] | None = None) -> Array:
        reader = reader_for(config.score_grads, pending[0] if values is None else None, values)
        if values is None:
            pending[0] = None
        dtypes = config.score_dtypes
        out = evaluate_on_tile(program, score_refs, dtypes, s2, *index, reader=reader)
        return jnp.broadcast_to(out, s2.shape).astype(_F32)

    return score_mod


def _sum_all(x: Array) -> Array:
    """Sum of every element, one axis at a time (as Triton reduces)."""
    while jnp.ndim(x):
        x = x.sum(axis=-1)
    return x


def _row_major_strides(shape: tuple[int, ...]) -> list[int]:
    return [int(np.prod(shape[n + 1 :], dtype=np.int64)) for n in range(len(shape))]


def walked_entries(read: ArrayRead, shape: tuple[int, ...]) -> int:
    """How many entries ``add_read_gradient`` walks for a read of an array of ``shape``:
    the product of the axes whose index varies across the tile (1 for none)."""
    dims = [dim for index, dim in zip(read.index, shape, strict=True) if jnp.size(index) > 1]
    return int(np.prod(dims, dtype=np.int64))


def add_read_gradient(acc: Array, read: ArrayRead, shape: tuple[int, ...], grad: Array) -> Array:
    """Add the gradient ``grad`` of one tile's read of an array of ``shape`` into
    ``acc``, that array's flattened float32 gradient (padded to a power of two). Axes
    read at one index for the whole tile add one sum; axes whose index varies across the
    tile are walked entry by entry (``score_program_problem`` bounds how many), summing the tile's
    gradient where the index equals it. No scatter, no atomics."""
    strides = _row_major_strides(shape)
    positions = jnp.arange(acc.shape[0], dtype=jnp.int32)
    base = jnp.int32(0)
    varying = []
    for index, stride, dim in zip(read.index, strides, shape, strict=True):
        if jnp.size(index) == 1:
            base = base + jnp.reshape(index, ()).astype(jnp.int32) * stride
        else:
            varying.append((index, stride, dim))
    if not varying:
        return acc + jnp.where(positions == base, _sum_all(grad), 0.0)
    offsets = sum(index * stride for index, stride, _ in varying)
    grad = jnp.broadcast_to(grad, jnp.shape(offsets))
    count = walked_entries(read, shape)

    def entry(n: Array, acc: Array) -> Array:
        # Non-negative, so lax's truncating division is floor division (jnp's % and //
        # add sign fixes that Triton's lowering does not take).
        offset, rest = jnp.int32(0), jnp.asarray(n, jnp.int32)
        for _, stride, dim in reversed(varying):
            size = jnp.int32(dim)
            offset = offset + lax.rem(rest, size) * jnp.int32(stride)
            rest = lax.div(rest, size)
        total = _sum_all(jnp.where(offsets == offset, grad, 0.0))
        return acc + jnp.where(positions == base + offset, total, 0.0)

    return lax.fori_loop(0, count, entry, acc)


def _matmul_t(a: Array, b: Array) -> Array:
    """``a @ b.T`` in float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def _matmul(a: Array, b: Array) -> Array:
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=_F32)


def softmax_step(
    carry: tuple[Array, Array, Array], s: Array, v_blk: Array, keep: Array | None = None
) -> tuple[Array, Array, Array]:
    """One online-softmax update with scores ``s (bq, bk)`` (``-inf`` = masked). With
    dropout's ``keep``, the denominator still counts every weight (dropout acts on the
    normalised weights) and the values see only the kept ones."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(axis=1))
    # A row that has seen no visible key keeps m = -inf; shift by 0 so exp() gives 0.
    m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_shift[:, None])
    alpha = jnp.exp(m - m_shift)
    l = alpha * l + p.sum(axis=1)
    if keep is not None:
        p = jnp.where(keep, p, 0.0)
    acc = alpha[:, None] * acc + _matmul(p.astype(v_blk.dtype), v_blk)
    return m_new, l, acc


def softmax_finish(m: Array, l: Array, acc: Array, out_scale: float = 1.0) -> tuple[Array, Array]:
    """Output rows (times ``out_scale``) and log-sum-exp; rows without a visible key
    give 0 and ``-inf``."""
    empty = l == 0.0
    safe = jnp.where(empty, 1.0, l)
    out = acc / safe[:, None]
    if out_scale != 1.0:
        out = out * _F32(out_scale)
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(safe))
    return out, lse


def tile_keep(
    config: TileConfig, seeds_ref: Any, b: Array, h: Array, q_pos: Array, k_pos: Array
) -> Array | None:
    """Dropout's keep decisions on a tile, in either orientation (broadcastable query
    and key positions), from the seed of ``(b, h)``; ``None`` without dropout."""
    if seeds_ref is None:
        return None
    return keep_tile(seeds_ref[b, h], q_pos, k_pos, threshold(config.scores.dropout_rate))


def dropout_scale(config: TileConfig) -> float:
    """The factor on kept weights, ``1 / (1 - rate)`` (1 without dropout)."""
    return 1.0 / (1.0 - config.scores.dropout_rate)


def kept(config: TileConfig, keep: Array | None, x: Array) -> Array:
    """``x`` on a tile where dropout keeps the weights, scaled by ``1 / (1 - rate)``, and
    0 where it drops them (``x`` itself without dropout)."""
    if keep is None:
        return x
    return jnp.where(keep, x * _F32(dropout_scale(config)), 0.0)


def tile_gradient(
    s: Array, lse: Array, delta: Array, dp: Array, visible: Array | None
) -> tuple[Array, Array]:
    """Probabilities ``p = exp(s - lse)`` and the score gradient ``p * (dp - delta)`` of
    one tile, in either orientation (``lse`` and ``delta`` broadcast along the keys);
    ``lse`` is ``+inf`` on rows without a visible key, whose ``p`` is then 0."""
    p = jnp.exp(s - lse)
    if visible is not None:
        p = jnp.where(visible, p, 0.0)
    return p, p * (dp - delta)
