"""Pallas backend, the tile math: positions, visibility, the score pipeline, the online
softmax step and the gradient step, as functions of arrays apart from refs and grids."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from .._band import in_band
from .._config import BlockConfig
from .._dropout import keep_tile, threshold
from .._hidden import add_values_through, any_non_finite, hide_in_sign
from .._scores import ScoreMod
from ._tile_program import _MIN_TILE, ArrayRead, evaluate_on_tile, reader_for
from ._tuning import Tuning

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
    # Each kernel's tiles (cut from the blocks: see ``_tuning``), warps and stages.
    tuning: Tuning
    # Forward programs per query tile, each walking an equal share of the block's key
    # lists; their partial results are merged through their log-sum-exp (split-K, for
    # few long rows: decoding).
    kv_splits: int = 1
    # dK/dV programs per key tile, each summing the gradients of an equal share of the
    # group's query heads (float32 partial sums, added afterwards): GQA with few
    # key/value heads leaves too few programs to fill a GPU otherwise. FlashAttention-2
    # goes all the way (dK/dV per query head, summed over the group afterwards); shares
    # keep that extra memory to what the grid needs.
    group_splits: int = 1
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

    def tiles(self, kernel: str) -> tuple[int, int]:
        """``(rows, cols)`` of a kernel (``"forward"``, ``"dq"`` or ``"dkdv"``), each at
        most its block."""
        t = getattr(self.tuning, kernel)
        if kernel == "dkdv":
            return min(t.rows, self.k_block), min(t.cols, self.q_block)
        return min(t.rows, self.q_block), min(t.cols, self.k_block)

    def row_tiles(self, kernel: str) -> int:
        """Programs along the output rows of a kernel (row tiles of all blocks)."""
        rows = self.tiles(kernel)[0]
        if kernel == "dkdv":
            return self.n_k_blocks * (self.k_block // rows)
        return self.n_q_blocks * (self.q_block // rows)

    def row_tile(self, kernel: str, position: Any) -> Any:
        """The row tile that the program at grid ``position`` owns: heavy rows first."""
        if self.heavy_last(kernel):
            return self.row_tiles(kernel) - 1 - position
        return position

    def heavy_last(self, kernel: str) -> bool:
        """Whether the kernel's later row tiles walk more blocks (a band bounded above:
        causal, for queries; bounded only below, for keys): then the grid runs them
        first, so that the longest programs do not start in the last wave (the
        longest-processing-time-first order of FlashAttention-3's causal scheduler; a
        compile report cannot show it)."""
        if kernel == "dkdv":
            return self.lo is not None and self.hi is None
        return self.hi is not None


def query_positions(config: TileConfig, start: Array, width: int, offset: Array) -> Array:
    """``(width,)`` positions of the query rows from row ``start``; padded rows repeat
    the last real row so that a ``mask_fn`` may index arrays of length ``Lq`` (their
    results are dropped)."""
    rows = start + jnp.arange(width, dtype=jnp.int32)
    return jnp.minimum(rows, config.q_len - 1) + offset


def key_positions(start: Array, width: int) -> Array:
    """``(width,)`` positions of the keys from ``start`` (padding included, ``>= Lk``)."""
    return start + jnp.arange(width, dtype=jnp.int32)


def walk_tiles(
    block_at: Callable[[Array], Array],
    entries: tuple[Array, Array],
    last: int,
    block: int,
    tile: int,
    body: Callable,
    carry: Any,
) -> Any:
    """``body(carry, first)`` for every tile of ``tile`` positions (its first position)
    of the listed blocks ``block_at(t)``, ``t`` in ``entries = (start, stop)``.

    One flat loop over (entry, tile within the block), so that it is the innermost loop,
    the one Triton software-pipelines (a loop per block inside a loop over blocks would
    drain the pipeline at every block). The next entry's block index is loaded one step
    ahead and carried, so the address of the next tile never waits on a load issued in
    the same step (as in the Triton template of PyTorch's FlexAttention, which reads
    the next sparse block index ahead). ``last`` is the lists' largest entry index.
    """
    per_block = block // tile
    shift = per_block.bit_length() - 1  # per_block is a power of two
    start, stop = entries

    def step(t: Array, c: tuple) -> tuple:
        j, inner = c
        following = block_at(jnp.minimum(lax.shift_right_logical(t + 1, shift), last))
        first = j * block + lax.bitwise_and(t, per_block - 1) * tile
        return following, body(inner, first)

    first_block = block_at(jnp.minimum(start, last))
    _, carry = lax.fori_loop(start * per_block, stop * per_block, step, (first_block, carry))
    return carry


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


# Entries of a read's gradient walked in straight-line code rather than a loop.
_UNROLLED_ENTRIES = 16


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

    if count <= _UNROLLED_ENTRIES:
        # Unrolled, so that the kernel's loop over key tiles stays the innermost loop,
        # the one Triton pipelines.
        for n in range(count):
            acc = entry(jnp.int32(n), acc)
        return acc
    return lax.fori_loop(0, count, entry, acc)


# Whether the kernel being traced will be compiled (Triton) or interpreted (on the host);
# set by the pallas_call around the kernel's trace.
_COMPILED = contextvars.ContextVar("compiled_kernel", default=False)


@contextlib.contextmanager
def compiled_dots(compiled: bool) -> Iterator[None]:
    """Dots traced meanwhile are for a compiled (``True``) or interpreted kernel."""
    token = _COMPILED.set(compiled)
    try:
        yield
    finally:
        _COMPILED.reset(token)


def _precision(a: Array, b: Array) -> Any:
    """float32 operands keep float32 accuracy. Triton's default rounds them to TF32 (a
    10-bit mantissa, errors near 1e-3); compiled, three TF32 products per dot (Triton's
    ``tf32x3``) recover float32 accuracy on the tensor cores, where full float32
    products (``ieee``) would turn each dot into tens of thousands of scalar FMAs.
    Interpreted, the host multiplies in float32 (CPUs have no TF32 algorithms). 16-bit
    operands keep the default: their own products, float32 accumulation."""
    if _F32 not in (a.dtype, b.dtype):
        return None
    if _COMPILED.get():
        return lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    return lax.Precision.HIGHEST


def _matmul_t(a: Array, b: Array) -> Array:
    """``a @ b.T`` in float32."""
    dims = (((1,), (1,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=_precision(a, b), preferred_element_type=_F32)


def _matmul(a: Array, b: Array) -> Array:
    dims = (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=_precision(a, b), preferred_element_type=_F32)


def _count(a: Array, b: Array) -> Array:
    """``a @ b`` of float16 small-integer codes, summed in float16: exact below 2048,
    in half the registers of a float32 tile (``_hidden.add_values_through``)."""
    dims = (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float16)


# Scores inside the kernels are in base 2 (``log2(e)`` times the score), so that the
# softmax exponentials are ``exp2`` (one ``ex2`` instruction on a GPU, where ``exp``
# costs a multiplication more); without a score pipeline the factor is folded into the
# scale, so a score costs one multiplication (fused with the max subtraction). As in
# FlashAttention-2 and jax's own Pallas GPU attention. The lse leaves in natural log.
LOG2E = float(np.log2(np.e))
LN2 = float(np.log(2.0))


def softmax_step(
    carry: tuple[Array, Array, Array],
    s: Array,
    v_blk: Array,
    keep: Array | None = None,
    visible: Array | None = None,
) -> tuple[Array, Array, Array]:
    """One online-softmax update with base-2 scores ``s (bq, bk)`` (``-inf`` =
    masked); ``m`` is the base-2 running maximum. With dropout's ``keep``, the
    denominator still counts every weight (dropout acts on the normalised weights) and
    the values see only the kept ones. A partial tile passes its ``visible`` mask, so
    that a NaN or inf of a hidden key's value stays out of the rows (``_hidden``)."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(axis=1))
    # A row that has seen no visible key keeps m = -inf; shift by 0 so exp2() gives 0.
    m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp2(s - m_shift[:, None])
    alpha = jnp.exp2(m - m_shift)
    l = alpha * l + p.sum(axis=1)
    if keep is not None:
        p = jnp.where(keep, p, 0.0)
    acc = alpha[:, None] * acc
    if visible is None:
        return m_new, l, acc + _matmul(p.astype(v_blk.dtype), v_blk)
    # The mask travels in p's sign (hidden pairs -0.0), so that no mask tile stays live
    # into the careful branch, which adds into acc with one float32 tile beside it at a
    # time (both kept the registers from spilling). Fresh branch functions: lax.cond
    # caches the jaxpr of a function it has seen, and _matmul's precision depends on
    # how the kernel is being traced.
    p = hide_in_sign(p, visible).astype(v_blk.dtype)
    acc = lax.cond(
        any_non_finite(v_blk),
        lambda acc, p, v: add_values_through(acc, p, None, v, _matmul, _count),
        lambda acc, p, v: acc + _matmul(p, v),
        acc,
        p,
        v_blk,
    )
    return m_new, l, acc


def softmax_finish(m: Array, l: Array, acc: Array, out_scale: float = 1.0) -> tuple[Array, Array]:
    """Output rows (times ``out_scale``) and natural-log log-sum-exp from the base-2
    running maximum ``m``; rows without a visible key give 0 and ``-inf``."""
    empty = l == 0.0
    safe = jnp.where(empty, 1.0, l)
    out = acc / safe[:, None]
    if out_scale != 1.0:
        out = out * _F32(out_scale)
    lse = jnp.where(empty, -jnp.inf, (m + jnp.log2(safe)) * _F32(LN2))
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
    """Probabilities ``p = exp2(s - lse)`` (base-2 scores and lse) and the score
    gradient ``p * (dp - delta)`` of one tile, in either orientation (``lse`` and
    ``delta`` broadcast along the keys); ``lse`` is ``+inf`` on rows without a visible
    key, whose ``p`` is then 0."""
    p = jnp.exp2(s - lse)
    if visible is not None:
        p = jnp.where(visible, p, 0.0)
    return p, p * (dp - delta)
