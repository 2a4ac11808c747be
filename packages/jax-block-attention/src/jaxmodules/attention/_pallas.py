"""The fused-kernel backend: one Pallas (Triton-style) kernel per pass over a block mask.

Each pass is one ``pallas_call``. The forward kernel and the dQ kernel run a grid over
``(batch row, query head, query block)``; every program reads its row of the
[`BlockMask`][jaxmodules.attention.BlockMask] lists (plain integer array inputs, read by
index) and runs two loops: over its full key blocks, with no element-wise mask, then
over its partial key blocks, masked by the band (``is_causal`` / ``window_size`` with
``q_offset``), key padding and the ``mask_fn`` program evaluated on the tile. The dK/dV
kernel runs a grid over ``(batch row, key/value head, key block)`` and walks the
transposed lists (query blocks per key block) for each query head of its group, so every
output block is written by one program: no atomics.

Layout inside this module: queries ``(B, Hq, Lq_pad, d_pad)``, keys ``(B, Hkv, Lk_pad,
d_pad)``, values ``(B, Hkv, Lk_pad, dv_pad)``, lengths padded to block multiples and head
dimensions to powers of two (Triton's tiles). Query head ``h`` reads key/value head
``h // G``. Scores, softmax statistics and accumulators are float32.

Scores follow the pipeline of ``_scores``: ``scale * q.k``, plus a bias tile (read from
a bias input, one row or column where the bias broadcasts), soft-cap, then ``score_mod``
evaluated on the tile's index vectors like a ``mask_fn``; the backward kernels map the
score gradient back through them (``score_mod``'s derivative by one forward-mode pass).
The bias gradient is written where one program owns it, so no atomics are needed, in
float32 per batch row and head (broadcast axes are summed afterwards): a bias that
varies along queries and keys gets its tiles from the dQ kernel, which visits each tile
of a head once; one that is constant along keys gets row sums from the dQ kernel, and
one that varies only along keys (a key-padding bias) gets column sums from the dK/dV
kernel. Only a bias that is itself quadratic has a quadratic gradient. Sinks change only
each row's denominator: they are applied after the kernels from the lse in plain JAX,
which also gives their gradient.
Traced floating arrays that ``score_mod`` closes over (learnable slopes, a relative
position table) get their gradients from the dQ kernel too: each tile's score gradient is
pulled back through the program to the values it read, and each program adds them into
its own copy of the flattened array's gradient (a sum for reads at one index per tile,
entry by entry for an index that varies across the tile); the copies are summed after.
Arrays of more than ``_MAX_ARRAY_GRADIENT`` entries, or reads that vary over more than
``_MAX_READ_ENTRIES`` entries within a tile, are refused.

The tile math (positions, visibility, the score pipeline, the online-softmax step and the
gradient step) lives in small functions of arrays, apart from the refs and the grid, so
that a Mosaic GPU kernel can reuse it.

A ``mask_fn`` that closes over arrays (segment ids, lengths) gets them as whole-array
kernel inputs: its program is re-evaluated on the tile's index vectors, and every
scalar read ``ids[b, q]`` of a closed-over array becomes a load at a vector of indices.
Programs that use a closed-over array any other way cannot be lowered; they raise
``PallasUnsupportedError``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.extend.core import Literal

from ._band import in_band
from ._block_mask import BlockMask
from ._cache import LRUCache
from ._config import BlockConfig, block_fields
from ._scores import ScoreConfig, bias_axes, capped_scores, merge_by_lse, with_sinks
from ._xla import Operands

Array = Any  # jax.Array, or a Pallas ref inside a kernel
# The block mask's traced mask_fn (its jaxpr, whose constvars are the closed-over arrays).
Program = Any
_F32 = jnp.float32
_MIN_TILE = 16  # Triton's smallest matmul tile side
# Keys (dQ) or queries (dK/dV) per backward tile when compiled for a GPU: 128 x 32 tiles,
# as in Triton's fused-attention backward and jax's own Pallas GPU attention. Not yet
# tuned on this kernel.
_COMPILED_BACKWARD_TILE = 32
# Gradients of traced arrays that score_mod closes over: each dQ program keeps the whole
# flattened gradient (at most this many entries) and walks an index that varies across a
# tile entry by entry (at most this many).
_MAX_ARRAY_GRADIENT = 1024
_MAX_READ_ENTRIES = 256
# Split-K when compiled: split the key lists of a forward with fewer programs than this
# (about two per SM of a 132-SM H100/H200) into at most as many shares as bring it
# there, each of at least _MIN_SPLIT_BLOCKS key blocks. Not yet tuned on a GPU.
_TARGET_PROGRAMS = 256
_MIN_SPLIT_BLOCKS = 4


class PallasUnsupportedError(ValueError):
    """A call the Pallas kernel cannot compute (the block-loop backend can)."""


def _triton_params(num_warps: int, num_stages: int) -> Any:
    """Triton compiler parameters; their class was renamed across jax versions."""
    from jax.experimental.pallas import triton as pl_triton

    params = getattr(pl_triton, "CompilerParams", None) or getattr(
        pl_triton, "TritonCompilerParams", None
    )
    if params is None:  # pragma: no cover - only on jax versions without Pallas Triton
        raise PallasUnsupportedError(
            f"this jax ({jax.__version__}) has no Triton compiler parameters for Pallas"
        )
    return params(num_warps=num_warps, num_stages=num_stages)


def _is_tile(n: int) -> bool:
    return n >= _MIN_TILE and n & (n - 1) == 0


def _array_grad_width(shape: tuple[int, ...]) -> int:
    """Entries of a flattened array's gradient in a kernel: a power of two ``>= 16``."""
    return _tile_width(int(np.prod(shape, dtype=np.int64)))


def _tile_width(n: int) -> int:
    """The smallest power of two ``>= max(n, 16)``: a head dimension padded for Triton."""
    return max(_MIN_TILE, 1 << (n - 1).bit_length())


# ------------------------------------------------------------- mask_fn programs in tiles


@dataclass
class _View:
    """A closed-over array seen through the scalar indices read so far.

    ``axes`` has one entry per axis of the original array: ``None`` for an axis still
    whole, or the (vector) index read on it; ``squeezed`` marks the indexed axes the
    program no longer sees (``dynamic_slice`` of size 1 keeps them, ``squeeze`` drops
    them).
    """

    ref: Array
    dtype: Any
    shape: tuple[int, ...]  # original shape of the closed-over array
    axes: list[Any]
    squeezed: list[bool]
    const: int = 0  # which of the program's closed-over arrays


# Loads a fully indexed ``_View``: ``_read``, or one that also records or replaces the
# values read (for gradients with respect to closed-over arrays).
Reader = Callable[[_View], Any]


def _unsupported(what: str) -> PallasUnsupportedError:
    return PallasUnsupportedError(
        "the Pallas kernel cannot evaluate this mask_fn on a tile: " + what + ". Inside "
        "the kernel, a mask_fn may use element-wise jnp operations on its indices and read "
        "closed-over arrays only by scalar indexing (ids[b, q], lengths[b]); use "
        'implementation="xla" for other mask functions'
    )


def _literal_value(atom: Any) -> Any:
    aval = atom.aval
    return jnp.asarray(np.asarray(atom.val, dtype=aval.dtype))


def _broadcast_all(values: Sequence[Any]) -> list[Any]:
    shape = np.broadcast_shapes(*(jnp.shape(v) for v in values))
    return [v if jnp.shape(v) == shape else jnp.broadcast_to(v, shape) for v in values]


def _read(view: _View) -> Any:
    """Load a fully indexed closed-over array at its (broadcast) index vectors."""
    if any(a is None for a in view.axes) or not all(view.squeezed):
        raise _unsupported(
            f"a closed-over array of shape {view.shape} is used whole or partly indexed "
            "(only scalar reads such as ids[b, q] are supported)"
        )
    # A 0-d array travels as shape (1,).
    value = view.ref[tuple(_broadcast_all(view.axes))] if view.shape else view.ref[0]
    if value.dtype != view.dtype:
        value = value.astype(view.dtype) if view.dtype != jnp.bool_ else value != 0
    return value


_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _inner_jaxpr(eqn: Any) -> Any:
    for name in _CALL_PARAMS:
        inner = eqn.params.get(name)
        if inner is not None:
            return inner
    return None


def _holds_jaxpr(param: Any) -> bool:
    if isinstance(param, (tuple, list)):
        return any(_holds_jaxpr(p) for p in param)
    return hasattr(param, "eqns") or hasattr(param, "jaxpr")


def _eval_tile_jaxpr(
    jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], reader: Reader = _read
) -> list[Any]:
    """Evaluate a scalar jaxpr on broadcastable index arrays (every intermediate becomes
    an array of the tile's broadcast shape); closed-over arrays are ``_View`` values,
    loaded by ``reader`` once fully indexed."""
    env: dict[Any, Any] = {}

    def read(atom: Any) -> Any:
        return _literal_value(atom) if isinstance(atom, Literal) else env[atom]

    def value(atom: Any) -> Any:
        x = read(atom)
        return reader(x) if isinstance(x, _View) else x

    for var, c in zip(jaxpr.constvars, consts, strict=True):
        env[var] = c
    for var, a in zip(jaxpr.invars, args, strict=True):
        env[var] = a
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        inputs = [read(v) for v in eqn.invars]
        inner = _inner_jaxpr(eqn)
        if inner is not None:
            closed_consts = list(getattr(inner, "consts", ()))
            body = getattr(inner, "jaxpr", inner)
            outs = _eval_tile_jaxpr(body, closed_consts, inputs, reader)
        elif name in ("dynamic_slice", "squeeze") and isinstance(inputs[0], _View):
            outs = [_view_op(name, eqn, inputs, reader)]
        else:
            # A closed-over array read down to a scalar per element is loaded here.
            inputs = [reader(x) if isinstance(x, _View) else x for x in inputs]
            scalar = all(v.aval.shape == () for v in (*eqn.invars, *eqn.outvars))
            if not scalar:
                raise _unsupported(
                    f"{name!r} works on arrays of shapes "
                    f"{[tuple(v.aval.shape) for v in eqn.invars]} (only scalar, element-wise "
                    "operations are supported)"
                )
            if any(_holds_jaxpr(p) for p in eqn.params.values()):
                raise _unsupported(f"control flow ({name!r}); use jnp.where instead")
            if name in ("squeeze", "reshape", "broadcast_in_dim", "expand_dims", "copy"):
                outs = inputs[:1]  # shape () to shape (): nothing to do on a tile
            else:
                result = eqn.primitive.bind(*_broadcast_all(inputs), **eqn.params)
                outs = list(result) if eqn.primitive.multiple_results else [result]
        for var, out in zip(eqn.outvars, outs, strict=True):
            env[var] = out
    return [value(v) for v in jaxpr.outvars]


def _view_op(name: str, eqn: Any, inputs: list[Any], reader: Reader) -> _View:
    """Scalar indexing of a closed-over array: ``dynamic_slice`` of size 1 per indexed
    axis (whole axes kept), then ``squeeze`` of the indexed axes."""
    view: _View = inputs[0]
    live = [n for n, s in enumerate(view.squeezed) if not s]  # axes the program sees
    if name == "dynamic_slice":
        starts = inputs[1:]
        sizes = eqn.params["slice_sizes"]
        axes = list(view.axes)
        for pos, size, start in zip(live, sizes, starts, strict=True):
            dim = view.shape[pos]
            if size == dim and dim != 1 and axes[pos] is None:
                continue  # the whole axis is kept
            if size != 1 or axes[pos] is not None:
                raise _unsupported(
                    f"a slice of size {size} of an axis of length {dim} of a closed-over "
                    "array (only single elements may be read)"
                )
            if isinstance(start, _View):
                start = reader(start)
            # dynamic_slice clamps its start into the array, so the kernel does too.
            axes[pos] = jnp.clip(jnp.asarray(start, jnp.int32), 0, dim - 1)
        return replace(view, axes=axes, squeezed=list(view.squeezed))
    if name == "squeeze":
        axes, squeezed = list(view.axes), list(view.squeezed)
        for d in eqn.params["dimensions"]:
            pos = live[d]
            if axes[pos] is None and view.shape[pos] != 1:
                raise _unsupported("a squeeze of a whole axis of a closed-over array")
            if axes[pos] is None:
                axes[pos] = jnp.int32(0)  # an axis of length 1 has one element to read
            squeezed[pos] = True
        return replace(view, axes=axes, squeezed=squeezed)
    raise _unsupported(f"{name!r} applied to a closed-over array")


def _const_views(program: Program, const_refs: Sequence[Any], dtypes: Sequence[Any]) -> list:
    views = []
    for n, (var, ref, dtype) in enumerate(
        zip(program.jaxpr.constvars, const_refs, dtypes, strict=True)
    ):
        shape = tuple(var.aval.shape)
        views.append(_View(ref, dtype, shape, [None] * len(shape), [False] * len(shape), n))
    return views


def evaluate_on_tile(
    program: Program,
    const_refs: Sequence[Any],
    const_dtypes: Sequence[Any],
    *inputs: Any,
    reader: Reader = _read,
) -> Any:
    """A traced element-wise program (``mask_fn(b, h, q, k)``) on broadcastable input
    arrays, reading its closed-over arrays from ``const_refs`` (Pallas refs in a kernel,
    or arrays: both are indexed alike) laid out by ``kernel_consts``, through
    ``reader``. The result has the inputs' broadcast shape."""
    views = _const_views(program, const_refs, const_dtypes)
    (out,) = _eval_tile_jaxpr(program.jaxpr, views, list(inputs), reader)
    return jnp.broadcast_to(out, np.broadcast_shapes(*(jnp.shape(x) for x in inputs)))


@dataclass(frozen=True)
class ArrayRead:
    """One load of a closed-over floating array on a tile: which array, the index
    arrays per axis (scalars or broadcastable tiles) and the value loaded."""

    const: int
    index: tuple[Any, ...]
    value: Any


def recording_reader(arrays: Sequence[int], reads: list[ArrayRead]) -> Reader:
    """A reader that appends each load of the closed-over ``arrays`` to ``reads``."""

    def reader(view: _View) -> Any:
        value = _read(view)
        if view.const in arrays:
            reads.append(ArrayRead(view.const, tuple(view.axes), value))
        return value

    return reader


def replaying_reader(arrays: Sequence[int], values: Sequence[Any]) -> Reader:
    """A reader that returns ``values``, in order, for the loads of the closed-over
    ``arrays`` (as recorded by ``recording_reader`` on the same program and tile), so
    that a function of them can be differentiated."""
    pending = iter(values)

    def reader(view: _View) -> Any:
        return next(pending) if view.const in arrays else _read(view)

    return reader


def kernel_consts(consts: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """The closed-over arrays as kernel inputs (booleans as int32, 0-d as shape
    ``(1,)``) and their original dtypes."""
    arrays, dtypes = [], []
    for c in consts:
        c = jnp.asarray(c)
        dtypes.append(c.dtype)
        if c.dtype == jnp.bool_:
            c = c.astype(jnp.int32)
        arrays.append(c.reshape(1) if c.ndim == 0 else c)
    return arrays, dtypes


def _tile_problem(
    program: Program,
    consts: Sequence[Any],
    *,
    with_score: bool,
    reads: list[ArrayRead] | None = None,
    recorded: Sequence[int] = (),
) -> str | None:
    """Why the kernel cannot evaluate ``program`` (a ``mask_fn``, or a ``score_mod``
    when ``with_score``) on a tile's index vectors, or ``None`` when it can: a trial
    trace on the smallest tile, which appends its loads of the closed-over arrays
    ``recorded`` to ``reads``."""
    arrays, dtypes = kernel_consts(consts)
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
    reader = _read if reads is None else recording_reader(recorded, reads)

    def trial(cs: list[Any]) -> Any:
        q = jnp.zeros((_MIN_TILE, 1), jnp.int32)
        k = jnp.zeros((1, _MIN_TILE), jnp.int32)
        score = [jnp.zeros((_MIN_TILE, _MIN_TILE), _F32)] if with_score else []
        index = (jnp.int32(0), jnp.int32(0), q, k)
        return evaluate_on_tile(program, cs, dtypes, *score, *index, reader=reader)

    try:
        jax.eval_shape(trial, shapes)
    except PallasUnsupportedError as err:
        problem = str(err)
    except (TypeError, ValueError, NotImplementedError) as err:
        problem = str(_unsupported(f"evaluating it on index vectors failed ({err})"))
    else:
        return None
    return problem.replace("mask_fn", "score_mod") if with_score else problem


def mask_program_problem(program: Program | None, consts: Sequence[Any]) -> str | None:
    """Why the kernel cannot evaluate ``program`` on tiles, or ``None`` when it can."""
    return None if program is None else _tile_problem(program, consts, with_score=False)


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


def _score_mod_on_tile(
    config: TileConfig,
    score_refs: Sequence[Any],
    s2: Array,
    b: Array,
    h: Array,
    q_pos: Array,
    k_pos: Array,
    reader: Reader = _read,
) -> Array:
    program = config.scores.score
    k_safe = jnp.minimum(k_pos, config.k_len - 1)
    index = [jnp.asarray(x, jnp.int32) for x in (b, h, q_pos, k_safe)]
    out = evaluate_on_tile(program, score_refs, config.score_dtypes, s2, *index, reader=reader)
    return jnp.broadcast_to(out, s2.shape).astype(_F32)


def tile_scores(
    config: TileConfig,
    s0: Array,
    bias: Array | None,
    score_refs: Sequence[Any],
    b: Array,
    h: Array,
    q_pos: Array,
    k_pos: Array,
    reader: Reader = _read,
) -> Array:
    """The final float32 scores of a tile (``s0 = scale * q.k``): plus the bias tile,
    soft-capped, through ``score_mod`` on the tile's index vectors (the pipeline of
    ``_scores``, with ``score_mod``'s closed-over arrays read from kernel refs through
    ``reader``)."""
    s1 = s0 if bias is None else s0 + bias.astype(_F32)
    s2 = capped_scores(config.scores.soft_cap, s1)
    if config.scores.score is None:
        return s2
    return _score_mod_on_tile(config, score_refs, s2, b, h, q_pos, k_pos, reader)


def tile_score_gradients(
    config: TileConfig,
    s0: Array,
    bias: Array | None,
    score_refs: Sequence[Any],
    b: Array,
    h: Array,
    q_pos: Array,
    k_pos: Array,
    d_scores: Array,
    reads: Sequence[ArrayRead] = (),
) -> tuple[Array, list[Array]]:
    """The gradient of a tile's final scores mapped back to ``s1 = s0 + bias`` (the
    gradient of the products and of the bias), and the gradients of the values
    ``score_mod`` read from its differentiable arrays (``reads``, recorded when the
    tile's scores were computed). ``score_mod`` is element-wise: without reads its
    derivative in the score is one forward-mode pass on the tile, with reads one reverse
    pass that takes their values as inputs."""
    cap = config.scores.soft_cap
    if cap is None and config.scores.score is None:
        return d_scores, []
    s1 = s0 if bias is None else s0 + bias.astype(_F32)
    s2 = capped_scores(cap, s1)
    d_values: list[Array] = []
    if reads:

        def scores_of(s: Array, values: list[Array]) -> Array:
            reader = replaying_reader(config.score_grads, values)
            return _score_mod_on_tile(config, score_refs, s, b, h, q_pos, k_pos, reader)

        _, pullback = jax.vjp(scores_of, s2, [read.value for read in reads])
        d_scores, d_values = pullback(d_scores)
    elif config.scores.score is not None:
        _, slope = jax.jvp(
            lambda s: _score_mod_on_tile(config, score_refs, s, b, h, q_pos, k_pos),
            (s2,),
            (jnp.ones_like(s2),),
        )
        d_scores = d_scores * slope
    if cap is not None:
        d_scores = d_scores * (1.0 - jnp.square(s2 / _F32(cap)))
    return d_scores, d_values


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
    carry: tuple[Array, Array, Array], s: Array, v_blk: Array
) -> tuple[Array, Array, Array]:
    """One online-softmax update with scores ``s (bq, bk)`` (``-inf`` = masked)."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(axis=1))
    # A row that has seen no visible key keeps m = -inf; shift by 0 so exp() gives 0.
    m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_shift[:, None])
    alpha = jnp.exp(m - m_shift)
    l = alpha * l + p.sum(axis=1)
    acc = alpha[:, None] * acc + _matmul(p.astype(v_blk.dtype), v_blk)
    return m_new, l, acc


def softmax_finish(m: Array, l: Array, acc: Array) -> tuple[Array, Array]:
    """Output rows and log-sum-exp; rows without a visible key give 0 and ``-inf``."""
    empty = l == 0.0
    safe = jnp.where(empty, 1.0, l)
    out = acc / safe[:, None]
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(safe))
    return out, lse


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


# ------------------------------------------------------------------------ kernels


def _mask_index(config: TileConfig, b: Array, h: Array) -> tuple[Array, Array]:
    """The (Bm, Hm) row of the block-mask lists for batch row ``b``, query head ``h``."""
    mb = b if config.mask_batch > 1 else 0
    mh = h if config.mask_heads > 1 else 0
    return mb, mh


def _split_refs(config: TileConfig, refs: Sequence[Any]) -> tuple:
    """The refs of a kernel: block-mask lists, mask_fn arrays, score_mod arrays, the
    bias (or ``None``), then the pass's own inputs and outputs."""
    n_mask, n_score = len(config.const_dtypes), len(config.score_dtypes)
    lists = refs[:5]
    mask_refs = refs[5 : 5 + n_mask]
    score_refs = refs[5 + n_mask : 5 + n_mask + n_score]
    rest = refs[5 + n_mask + n_score :]
    bias_ref = None
    if config.scores.bias is not None:
        bias_ref, rest = rest[0], rest[1:]
    return lists, mask_refs, score_refs, bias_ref, rest


def _bias_tile(
    config: TileConfig, bias_ref: Any, head: Any, rows: tuple[Any, int], cols: tuple[Any, int]
) -> Array:
    """The bias over query rows and key columns given as ``(start, size)``: a ``(rows |
    1, cols | 1)`` tile, one row or column where the bias broadcasts along them."""
    assert config.scores.bias is not None
    _, _, along_q, along_k = config.scores.bias
    row_slice = pl.ds(*rows) if along_q else pl.ds(0, 1)
    col_slice = pl.ds(*cols) if along_k else pl.ds(0, 1)
    if head is None:
        return bias_ref[row_slice, col_slice]
    return bias_ref[head, row_slice, col_slice]


def _forward_kernel(config: TileConfig, *refs: Any) -> None:
    lists, mask_refs, score_refs, bias_ref, rest = _split_refs(config, refs)
    count_ref, index_ref, full_count_ref, full_index_ref, offset_ref = lists
    q_ref, k_ref, v_ref, o_ref, lse_ref = rest
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    mb, mh = _mask_index(config, b, h)
    bq, bk = config.q_block, config.k_block
    q_blk = q_ref[...]
    q_pos = query_positions(config, i * bq, bq, offset_ref[mb])[:, None]

    def step(carry: tuple, j: Array, masked: bool) -> tuple:
        k_blk = k_ref[pl.ds(j * bk, bk), :]
        v_blk = v_ref[pl.ds(j * bk, bk), :]
        k_pos = key_positions(j * bk, bk)[None, :]
        s0 = _matmul_t(q_blk, k_blk) * _F32(config.scale)
        bias = None
        if bias_ref is not None:
            bias = _bias_tile(config, bias_ref, None, (i * bq, bq), (j * bk, bk))
        s = tile_scores(config, s0, bias, score_refs, b, h, q_pos, k_pos)
        if masked:
            s = jnp.where(tile_visible(config, mask_refs, b, h, q_pos, k_pos), s, -jnp.inf)
        return softmax_step(carry, s, v_blk)

    carry = (
        jnp.full((config.q_block,), -jnp.inf, _F32),
        jnp.zeros((config.q_block,), _F32),
        jnp.zeros((config.q_block, v_ref.shape[-1]), _F32),
    )
    full_range = _split_share(config, full_count_ref[mb, mh, i])
    carry = lax.fori_loop(
        *full_range, lambda t, c: step(c, full_index_ref[mb, mh, i, t], False), carry
    )
    partial_range = _split_share(config, count_ref[mb, mh, i])
    carry = lax.fori_loop(
        *partial_range, lambda t, c: step(c, index_ref[mb, mh, i, t], True), carry
    )
    out, lse = softmax_finish(*carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _split_share(config: TileConfig, count: Array) -> tuple[Array, Array]:
    """The entries ``[start, stop)`` of a list of ``count`` blocks that this forward
    program walks: all of them, or its equal share when the lists are split."""
    if config.kv_splits == 1:
        return jnp.int32(0), count
    share = lax.div(count + (config.kv_splits - 1), jnp.int32(config.kv_splits))
    start = jnp.minimum(pl.program_id(3) * share, count)
    return start, jnp.minimum(start + share, count)


def _dq_kernel(config: TileConfig, *refs: Any) -> None:
    lists, mask_refs, score_refs, bias_ref, rest = _split_refs(config, refs)
    count_ref, index_ref, full_count_ref, full_index_ref, offset_ref = lists
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *extra = rest
    # After dQ: the bias gradient (tiles or row sums), then one flattened gradient per
    # differentiable score_mod array, this program's share.
    dbias_ref: Any = extra.pop(0) if config.bias_gradient in ("tiles", "rows") else None
    array_refs = extra
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    mb, mh = _mask_index(config, b, h)
    bq, bk, sk = config.q_block, config.k_block, config.dq_key_tile
    q_blk, do_blk = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_pos = query_positions(config, i * bq, bq, offset_ref[mb])[:, None]
    scale = _F32(config.scale)

    write_tiles = config.bias_gradient == "tiles"
    sum_rows = config.bias_gradient == "rows"
    if write_tiles:
        # This program owns rows i of dbias[b, h]: zero them, then write each listed
        # tile once (no atomics).
        def zero(t: Array, c: Array) -> Array:
            dbias_ref[:, pl.ds(t * bk, bk)] = jnp.zeros((bq, bk), _F32)
            return c

        lax.fori_loop(0, config.n_k_blocks, zero, 0)

    def tile(carry: dict, start: Array, masked: bool) -> dict:
        # Keys start .. start + sk of a listed key block.
        k_blk = k_ref[pl.ds(start, sk), :]
        v_blk = v_ref[pl.ds(start, sk), :]
        k_pos = key_positions(start, sk)[None, :]
        visible = None
        if masked:
            visible = tile_visible(config, mask_refs, b, h, q_pos, k_pos)
        s0 = _matmul_t(q_blk, k_blk) * scale
        bias = None
        if bias_ref is not None:
            bias = _bias_tile(config, bias_ref, None, (i * bq, bq), (start, sk))
        reads: list[ArrayRead] = []
        reader = recording_reader(config.score_grads, reads) if config.score_grads else _read
        s = tile_scores(config, s0, bias, score_refs, b, h, q_pos, k_pos, reader)
        _, ds = tile_gradient(s, lse, delta, _matmul_t(do_blk, v_blk), visible)
        if reads and visible is not None:
            ds = jnp.where(visible, ds, 0.0)  # the reads' gradients sum over the tile
        ds, d_values = tile_score_gradients(
            config, s0, bias, score_refs, b, h, q_pos, k_pos, ds, reads
        )
        carry = dict(carry)
        arrays = list(carry["arrays"])
        for read, d_value in zip(reads, d_values, strict=True):
            slot = config.score_grads.index(read.const)
            shape = config.score_array_shape(read.const)
            arrays[slot] = add_read_gradient(arrays[slot], read, shape, d_value)
        carry["arrays"] = arrays
        if visible is not None and config.scores.changes_scores:
            ds = jnp.where(visible, ds, 0.0)
        if write_tiles:
            dbias_ref[:, pl.ds(start, sk)] = ds
        if sum_rows:
            carry["rows"] = carry["rows"] + ds.sum(axis=1)
        carry["dq"] = carry["dq"] + _matmul(ds.astype(k_blk.dtype), k_blk) * scale
        return carry

    def step(carry: dict, j: Array, masked: bool) -> dict:
        return over_slices(j * bk, bk, sk, partial(tile, masked=masked), carry)

    carry: dict[str, Any] = {"dq": jnp.zeros((bq, q_ref.shape[-1]), _F32)}
    if sum_rows:
        carry["rows"] = jnp.zeros((bq,), _F32)
    carry["arrays"] = [jnp.zeros(ref.shape, _F32) for ref in array_refs]
    carry = lax.fori_loop(
        0,
        full_count_ref[mb, mh, i],
        lambda t, c: step(c, full_index_ref[mb, mh, i, t], False),
        carry,
    )
    carry = lax.fori_loop(
        0, count_ref[mb, mh, i], lambda t, c: step(c, index_ref[mb, mh, i, t], True), carry
    )
    dq_ref[...] = carry["dq"].astype(dq_ref.dtype)
    if sum_rows:
        dbias_ref[...] = carry["rows"]
    for ref, grad in zip(array_refs, carry["arrays"], strict=True):
        ref[...] = grad


def _dkdv_kernel(config: TileConfig, *refs: Any) -> None:
    lists, mask_refs, score_refs, bias_ref, rest = _split_refs(config, refs)
    count_ref, index_ref, full_count_ref, full_index_ref, offset_ref = lists
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *dbias = rest
    # Column sums of the score gradient per query head of the group: the gradient of a
    # bias that varies only along keys.
    dbias_ref: Any = dbias[0] if dbias else None
    b, hk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk, sq = config.q_block, config.k_block, config.dkdv_query_tile
    k_blk, v_blk = k_ref[...], v_ref[...]
    k_pos = key_positions(j * bk, bk)[:, None]
    scale = _F32(config.scale)
    bias_heads = config.scores.bias is not None and config.scores.bias[1]

    def one_head(g: Array, carry: tuple) -> tuple:
        # The query heads of this key/value head's group, one after another, so dK and
        # dV of the group are summed here rather than written per query head.
        h = hk * config.groups + g
        mb, mh = _mask_index(config, b, h)
        offset = offset_ref[mb]

        def tile(carry: dict, start: Array, masked: bool) -> dict:
            # Queries start .. start + sq of a listed query block.
            rows = pl.ds(start, sq)
            q_blk = q_ref[h, rows, :]
            do_blk = do_ref[h, rows, :]
            q_pos = query_positions(config, start, sq, offset)[None, :]
            visible_t = None
            if masked:
                visible_t = tile_visible(config, mask_refs, b, h, q_pos, k_pos)
            # The tile transposed, (bk, bq): keys are this program's rows.
            s0_t = _matmul_t(k_blk, q_blk) * scale
            bias_t = None
            if bias_ref is not None:
                head = h if bias_heads else 0
                bias_t = _bias_tile(config, bias_ref, head, (start, sq), (j * bk, bk)).T
            s_t = tile_scores(config, s0_t, bias_t, score_refs, b, h, q_pos, k_pos)
            lse_t, delta_t = lse_ref[h, rows][None, :], delta_ref[h, rows][None, :]
            p_t, ds_t = tile_gradient(s_t, lse_t, delta_t, _matmul_t(v_blk, do_blk), visible_t)
            ds_t, _ = tile_score_gradients(
                config, s0_t, bias_t, score_refs, b, h, q_pos, k_pos, ds_t
            )
            if visible_t is not None and config.scores.changes_scores:
                ds_t = jnp.where(visible_t, ds_t, 0.0)
            carry = dict(carry)
            carry["dv"] = carry["dv"] + _matmul(p_t.astype(do_blk.dtype), do_blk)
            carry["dk"] = carry["dk"] + _matmul(ds_t.astype(q_blk.dtype), q_blk) * scale
            if dbias_ref is not None:
                carry["columns"] = carry["columns"] + ds_t.sum(axis=1)
            return carry

        def step(carry: dict, i: Array, masked: bool) -> dict:
            return over_slices(i * bq, bq, sq, partial(tile, masked=masked), carry)

        head_carry = {"dk": carry[0], "dv": carry[1]}
        if dbias_ref is not None:
            head_carry["columns"] = jnp.zeros((bk,), _F32)
        head_carry = lax.fori_loop(
            0,
            full_count_ref[mb, mh, j],
            lambda t, c: step(c, full_index_ref[mb, mh, j, t], False),
            head_carry,
        )
        head_carry = lax.fori_loop(
            0,
            count_ref[mb, mh, j],
            lambda t, c: step(c, index_ref[mb, mh, j, t], True),
            head_carry,
        )
        if dbias_ref is not None:
            dbias_ref[pl.ds(g, 1), :] = head_carry["columns"][None, :]
        return head_carry["dk"], head_carry["dv"]

    carry = (
        jnp.zeros((config.k_block, k_ref.shape[-1]), _F32),
        jnp.zeros((config.k_block, v_ref.shape[-1]), _F32),
    )
    dk, dv = lax.fori_loop(0, config.groups, one_head, carry)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------- pallas_calls


def _whole(x: Any) -> Any:
    """A BlockSpec that hands every program the whole array."""
    ndim = len(x.shape)
    return pl.BlockSpec(tuple(x.shape), lambda *_: (0,) * ndim)


def _call(
    config: TileConfig,
    kernel: Callable[..., None],
    grid: tuple[int, ...],
    lists: Sequence[Any],
    consts: Sequence[Any],
    inputs: Sequence[tuple[Any, Any]],
    outputs: Sequence[tuple[jax.ShapeDtypeStruct, Any]],
    name: str,
) -> Any:
    """One ``pallas_call``: the block-mask lists and closed-over arrays go whole to every
    program, ahead of the blocked ``inputs``; ``outputs`` pairs shapes with specs."""
    in_specs = [_whole(x) for x in (*lists, *consts)] + [spec for _, spec in inputs]
    return pl.pallas_call(
        partial(kernel, config),
        grid=grid,
        in_specs=in_specs,
        out_specs=[spec for _, spec in outputs],
        out_shape=[shape for shape, _ in outputs],
        interpret=config.interpret,
        compiler_params=_triton_params(config.num_warps, config.num_stages),
        name=name,
    )(*lists, *consts, *(x for x, _ in inputs))


def _bias_specs(config: TileConfig, bias: Any) -> tuple[Any, Any]:
    """The bias's BlockSpecs: one ``(b, h)`` slab per program of the query-major passes,
    one batch row (all its heads) per program of the key-major pass."""
    assert config.scores.bias is not None
    along_b, along_h, _, _ = config.scores.bias
    _, heads, lq, lk = bias.shape

    def row(b: Any) -> Any:
        return b if along_b else 0

    def head(h: Any) -> Any:
        return h if along_h else 0

    query_major = pl.BlockSpec((None, None, lq, lk), lambda b, h, *_: (row(b), head(h), 0, 0))
    key_major = pl.BlockSpec((None, heads, lq, lk), lambda b, h, j: (row(b), 0, 0, 0))
    return query_major, key_major


def _forward(
    config: TileConfig,
    q: Array,
    k: Array,
    v: Array,
    bias: Array | None,
    kv_lists: tuple,
    consts: tuple,
) -> tuple[Array, Array]:
    bsz, _, lq, d = q.shape
    dv = v.shape[-1]
    bq, g, splits = config.q_block, config.groups, config.kv_splits
    # The grid is (batch row, query head, query block[, split]).
    q_spec = pl.BlockSpec((None, None, bq, d), lambda b, h, i, *_: (b, h, i, 0))
    k_spec = pl.BlockSpec((None, None, k.shape[2], d), lambda b, h, *_: (b, h // g, 0, 0))
    v_spec = pl.BlockSpec((None, None, v.shape[2], dv), lambda b, h, *_: (b, h // g, 0, 0))
    bias_input = [] if bias is None else [(bias, _bias_specs(config, bias)[0])]
    grid: tuple[int, ...] = (bsz, config.q_heads, config.n_q_blocks)
    if splits == 1:
        outputs = [
            (
                jax.ShapeDtypeStruct((bsz, config.q_heads, lq, dv), q.dtype),
                pl.BlockSpec((None, None, bq, dv), lambda b, h, i: (b, h, i, 0)),
            ),
            (
                jax.ShapeDtypeStruct((bsz, config.q_heads, lq), _F32),
                pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
            ),
        ]
    else:
        grid += (splits,)
        # Float32 partial results per split, merged below.
        outputs = [
            (
                jax.ShapeDtypeStruct((splits, bsz, config.q_heads, lq, dv), _F32),
                pl.BlockSpec((None, None, None, bq, dv), lambda b, h, i, s: (s, b, h, i, 0)),
            ),
            (
                jax.ShapeDtypeStruct((splits, bsz, config.q_heads, lq), _F32),
                pl.BlockSpec((None, None, None, bq), lambda b, h, i, s: (s, b, h, i)),
            ),
        ]
    out, lse = _call(
        config,
        _forward_kernel,
        grid,
        kv_lists,
        consts,
        [*bias_input, (q, q_spec), (k, k_spec), (v, v_spec)],
        outputs,
        "block_attention_forward",
    )
    if splits > 1:
        out, lse = merge_by_lse(out, lse)
        out = out.astype(q.dtype)
    return out, lse


def _backward(
    config: TileConfig,
    q: Array,
    k: Array,
    v: Array,
    bias: Array | None,
    out: Array,
    lse: Array,
    d_out: Array,
    d_lse: Array,
    kv_lists: tuple,
    q_lists: tuple,
    consts: tuple,
) -> tuple[Array, Array, Array, Array | None, list[Array]]:
    """dQ, dK, dV, the bias gradient and the gradients of the differentiable
    ``score_mod`` arrays (flattened, float32, padded: see ``_array_cotangents``)."""
    bsz, _, lq, d = q.shape
    lk, dv = v.shape[2], v.shape[-1]
    bq, bk, g = config.q_block, config.k_block, config.groups
    # d lse / d s = p, so an lse cotangent only shifts each row's delta.
    delta = jnp.einsum("bhqd,bhqd->bhq", d_out.astype(_F32), out.astype(_F32)) - d_lse
    # +inf on rows without a visible key makes exp(s - lse) vanish there.
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)

    def row_spec(width: int | None) -> Any:
        if width is None:
            return pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
        return pl.BlockSpec((None, None, bq, width), lambda b, h, i: (b, h, i, 0))

    kv_whole = pl.BlockSpec((None, None, lk, d), lambda b, h, i: (b, h // g, 0, 0))
    v_whole = pl.BlockSpec((None, None, lk, dv), lambda b, h, i: (b, h // g, 0, 0))
    bias_specs = None if bias is None else _bias_specs(config, bias)
    dq_outputs = [(jax.ShapeDtypeStruct(q.shape, q.dtype), row_spec(d))]
    # dbias of every (b, h) in float32 (broadcast axes are summed afterwards): tiles or
    # row sums from the dQ kernel, column sums from the dK/dV kernel.
    if config.bias_gradient == "tiles":
        dq_outputs.append((jax.ShapeDtypeStruct((bsz, config.q_heads, lq, lk), _F32), row_spec(lk)))
    elif config.bias_gradient == "rows":
        dq_outputs.append((jax.ShapeDtypeStruct((bsz, config.q_heads, lq), _F32), row_spec(None)))
    # Each program's share of the score_mod arrays' gradients, summed afterwards.
    for n in config.score_grads:
        width = _array_grad_width(config.score_array_shape(n))
        dq_outputs.append(
            (
                jax.ShapeDtypeStruct((bsz, config.q_heads, config.n_q_blocks, width), _F32),
                pl.BlockSpec((None, None, None, width), lambda b, h, i: (b, h, i, 0)),
            )
        )
    dq, *dq_extra = _call(
        config,
        _dq_kernel,
        (bsz, config.q_heads, config.n_q_blocks),
        kv_lists,
        consts,
        [
            *([] if bias_specs is None else [(bias, bias_specs[0])]),
            (q, row_spec(d)),
            (k, kv_whole),
            (v, v_whole),
            (d_out, row_spec(dv)),
            (lse, row_spec(None)),
            (delta, row_spec(None)),
        ],
        dq_outputs,
        "block_attention_dq",
    )
    dbias = dq_extra[: len(dq_extra) - len(config.score_grads)]
    d_arrays = [x.sum(axis=(0, 1, 2)) for x in dq_extra[len(dbias) :]]

    def per_batch(width: int | None) -> Any:
        if width is None:
            return pl.BlockSpec((None, config.q_heads, lq), lambda b, h, j: (b, 0, 0))
        return pl.BlockSpec((None, config.q_heads, lq, width), lambda b, h, j: (b, 0, 0, 0))

    def key_spec(width: int) -> Any:
        return pl.BlockSpec((None, None, bk, width), lambda b, h, j: (b, h, j, 0))

    dkdv_outputs = [
        (jax.ShapeDtypeStruct(k.shape, k.dtype), key_spec(d)),
        (jax.ShapeDtypeStruct(v.shape, v.dtype), key_spec(dv)),
    ]
    if config.bias_gradient == "columns":
        dkdv_outputs.append(
            (
                jax.ShapeDtypeStruct((bsz, config.q_heads, lk), _F32),
                pl.BlockSpec((None, g, bk), lambda b, h, j: (b, h, j)),
            )
        )
    dk, dv_, *dbias_columns = _call(
        config,
        _dkdv_kernel,
        (bsz, config.kv_heads, config.n_k_blocks),
        q_lists,
        consts,
        [
            *([] if bias_specs is None else [(bias, bias_specs[1])]),
            (q, per_batch(d)),
            (k, key_spec(d)),
            (v, key_spec(dv)),
            (d_out, per_batch(dv)),
            (lse, per_batch(None)),
            (delta, per_batch(None)),
        ],
        dkdv_outputs,
        "block_attention_dkdv",
    )
    d_bias = None
    if bias is not None:
        d_bias = _bias_cotangent(config, bias, dbias, dbias_columns)
    return dq, dk, dv_, d_bias, d_arrays


def _bias_cotangent(config: TileConfig, bias: Array, tiles_or_rows: list, columns: list) -> Array:
    """The kernels' float32 bias gradient, per batch row and head, summed over the axes
    along which ``bias`` broadcasts and cut to its (padded) shape and dtype."""
    if config.bias_gradient == "columns":
        grad = columns[0][:, :, None, :]
    elif config.bias_gradient == "rows":
        grad = tiles_or_rows[0][:, :, :, None]
    else:
        grad = tiles_or_rows[0]
    broadcast = tuple(n for n in range(4) if bias.shape[n] == 1 and grad.shape[n] > 1)
    if broadcast:
        grad = grad.sum(axis=broadcast, keepdims=True)
    grad = grad[: bias.shape[0], : bias.shape[1], : bias.shape[2], : bias.shape[3]]
    return grad.astype(bias.dtype)


def _zero_cotangent(x: Any) -> Any:
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(jnp.shape(x), dtype=jax.dtypes.float0)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_attention(
    config: TileConfig,
    q: Array,
    k: Array,
    v: Array,
    bias: Array | None,
    kv_lists: tuple,
    q_lists: tuple,
    consts: tuple,
) -> tuple[Array, Array]:
    """Attention over padded kernel-layout inputs: output (``q``'s dtype) and lse."""
    return _forward(config, q, k, v, bias, kv_lists, consts)


def _kernel_attention_fwd(config, q, k, v, bias, kv_lists, q_lists, consts):
    out, lse = _forward(config, q, k, v, bias, kv_lists, consts)
    return (out, lse), (q, k, v, bias, out, lse, kv_lists, q_lists, consts)


def _kernel_attention_bwd(config, residuals, cotangents):
    q, k, v, bias, out, lse, kv_lists, q_lists, consts = residuals
    d_out, d_lse = cotangents
    dq, dk, dv, d_bias, d_arrays = _backward(
        config, q, k, v, bias, out, lse, d_out, d_lse, kv_lists, q_lists, consts
    )
    zeros = jax.tree_util.tree_map(_zero_cotangent, (kv_lists, q_lists))
    return (dq, dk, dv, d_bias, *zeros, _array_cotangents(config, consts, d_arrays))


def _array_cotangents(config: TileConfig, consts: tuple, d_arrays: list[Array]) -> tuple:
    """Cotangents of the kernel's closed-over arrays (``mask_fn``'s, then
    ``score_mod``'s): the summed gradients for the differentiable score_mod arrays, cut
    from their padding to the kernel layout; zeros for the rest."""
    cotangents = [_zero_cotangent(c) for c in consts]
    first = len(config.const_dtypes)
    for n, grad in zip(config.score_grads, d_arrays, strict=True):
        const = consts[first + n]
        size = int(np.prod(jnp.shape(const), dtype=np.int64))
        cotangents[first + n] = grad[:size].reshape(jnp.shape(const)).astype(const.dtype)
    return tuple(cotangents)


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)


# ------------------------------------------------------------------------ entry points


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


def _list_name(side: str, name: str) -> str:
    """``kv_num_blocks``, ``full_q_indices``, ...: the block mask's list attributes."""
    return name.format(side) if "{}" in name else f"{side}_{name}"


def _default_interpret(interpret: bool | None) -> bool:
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)


def pallas_attend_with_lse(
    q: Any,
    k: Any,
    v: Any,
    block_mask: BlockMask,
    scale: float,
    *,
    interpret: bool | None = None,
    scores: ScoreConfig | None = None,
    operands: Operands | None = None,
    backward_tile: int | None = None,
    num_warps: int | None = None,
    kv_splits: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Attention under ``block_mask`` with the fused Pallas kernel, and its lse.

    Args:
        q: Queries ``(B, Lq, Hq, d)``.
        k: Keys ``(B, Lk, Hkv, d)``, ``Hq`` a multiple of ``Hkv``.
        v: Values ``(B, Lk, Hkv, dv)``.
        block_mask: The mask, with block sizes that are powers of two ``>= 16``.
        scale: Factor for the scores ``q @ k^T``.
        interpret: Run the kernels in Pallas interpret mode; ``None``: when the default
            backend is not a GPU.
        scores: The score changes (soft-cap, ``score_mod`` program, which axes the bias
            varies along, whether sinks are given), as built by
            ``masked_attention_via_map``.
        operands: Their arrays: a rank-4 ``bias`` broadcastable to ``(B, Hq, Lq, Lk)``
            (gets a gradient), ``sinks`` ``(Hq,)`` (gets a gradient) and the arrays
            ``score_mod`` closes over.
        backward_tile: The inner side of the backward kernels' tiles (keys per slice in
            dQ, queries per slice in dK/dV), a power of two ``>= 16``; ``None``:
            ``_COMPILED_BACKWARD_TILE`` when compiled, whole blocks when interpreted.
        num_warps: Warps per Triton program; ``None``: 4 for head dimensions up to 64,
            else 8.
        kv_splits: Forward programs per query block, each over an equal share of its
            key lists, merged by log-sum-exp (split-K); ``None``: 1 when interpreted,
            enough to reach about ``_TARGET_PROGRAMS`` programs when compiled (decoding
            and other calls with few, long rows).

    Returns:
        ``(out, lse)``: the output ``(B, Lq, Hq, dv)`` in ``q``'s dtype and the natural
        log of each row's softmax denominator (sink included), ``(B, Hq, Lq)`` float32,
        ``-inf`` for rows without a visible key and no sink (whose output is 0). Both
        are differentiable.

    Raises:
        ValueError: Shapes that do not fit each other or the block mask, block sizes
            that are not powers of two ``>= 16``.
        PallasUnsupportedError: A ``mask_fn`` or ``score_mod`` the kernel cannot
            evaluate on tiles (a ``ValueError``).
    """
    _check_block_mask(block_mask, q, k, v)
    scores = scores or ScoreConfig()
    operands = operands or Operands(None, None, ())
    problem = pallas_call_problem(block_mask, scores, operands)
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
    interpret = _default_interpret(interpret)
    if backward_tile is None:
        backward_tile = None if interpret else _COMPILED_BACKWARD_TILE
    elif not _is_tile(backward_tile):
        raise ValueError(f"backward_tile must be a power of two >= 16, got {backward_tile}")
    n_q_blocks = -(-q_len // block_mask.block_size[0])
    n_k_blocks = -(-k_len // block_mask.block_size[1])
    if kv_splits is None:
        programs = q.shape[0] * q_heads * n_q_blocks
        kv_splits = 1
        if not interpret and programs < _TARGET_PROGRAMS:
            wanted = -(-_TARGET_PROGRAMS // programs)
            kv_splits = max(1, min(wanted, n_k_blocks // _MIN_SPLIT_BLOCKS))
    elif isinstance(kv_splits, bool) or not isinstance(kv_splits, int) or kv_splits < 1:
        raise ValueError(f"kv_splits must be a positive int, got {kv_splits!r}")
    config = TileConfig(
        **block_fields(block_mask, q_len=q_len, k_len=k_len, scale=scale),
        q_heads=q_heads,
        kv_heads=kv_heads,
        const_dtypes=tuple(dtypes),
        interpret=interpret,
        num_warps=num_warps or (4 if _tile_width(q.shape[-1]) <= 64 else 8),
        backward_tile=backward_tile,
        kv_splits=kv_splits,
        scores=replace(scores, sinks=False),
        score_dtypes=tuple(score_dtypes),
        score_grads=(
            () if scores.score is None else traced_score_arrays(scores.score, operands.score_consts)
        ),
    )
    offset = jnp.asarray(block_mask.q_offset, jnp.int32).reshape(-1)
    names = ("num_blocks", "indices", "full_{}_num_blocks", "full_{}_indices")
    kv_lists = (
        *(jnp.asarray(getattr(block_mask, _list_name("kv", n)), jnp.int32) for n in names),
        offset,
    )
    q_lists = (
        *(jnp.asarray(getattr(block_mask, _list_name("q", n)), jnp.int32) for n in names),
        offset,
    )
    all_consts = (*consts, *score_consts)
    return _attend_padded(config, q, k, v, bias, operands.sinks, kv_lists, q_lists, all_consts)


@partial(jax.jit, static_argnums=(0,))
def _attend_padded(
    config: TileConfig,
    q: Array,
    k: Array,
    v: Array,
    bias: Array | None,
    sinks: Array | None,
    kv_lists: tuple,
    q_lists: tuple,
    consts: tuple,
) -> tuple[Array, Array]:
    """Kernel layout and padding around the kernels, sinks after them: one compiled
    program per configuration and shapes, reused by eager calls."""
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
    out, lse = _kernel_attention(config, qk, kk, vk, bias, kv_lists, q_lists, consts)
    out = out[:, :, :q_len, :dv].transpose(0, 2, 1, 3)
    lse = lse[:, :, :q_len]
    if sinks is not None:
        out, lse = with_sinks(out, lse, sinks)
    return out, lse


def pallas_attend(
    q: Any,
    k: Any,
    v: Any,
    block_mask: BlockMask,
    scale: float,
    *,
    interpret: bool | None = None,
    scores: ScoreConfig | None = None,
    operands: Operands | None = None,
    backward_tile: int | None = None,
    num_warps: int | None = None,
    kv_splits: int | None = None,
) -> jax.Array:
    """Attention under ``block_mask`` with the fused Pallas kernel (the contract of the
    block-loop backend's ``attend``): output ``(B, Lq, Hq, dv)`` in ``q``'s dtype.

    See ``pallas_attend_with_lse`` for the arguments and errors.
    """
    out, _ = pallas_attend_with_lse(
        q,
        k,
        v,
        block_mask,
        scale,
        interpret=interpret,
        scores=scores,
        operands=operands,
        backward_tile=backward_tile,
        num_warps=num_warps,
        kv_splits=kv_splits,
    )
    return out


def pallas_problem(block_mask: BlockMask) -> str | None:
    """Why ``block_mask`` cannot run on the Pallas kernel, or ``None`` when it can (for
    a dispatcher that falls back to the block loop)."""
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
                f"score_mod closes over a traced array of shape {shape}; the Pallas kernel "
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


# Answers of pallas_call_problem, by everything they depend on (no arrays): the dispatcher
# and the kernel entry ask the same question, and eager calls ask it again each time.
_PROBLEMS = LRUCache[str | None](64)


def _avals(consts: Sequence[Any]) -> tuple:
    return tuple((tuple(jnp.shape(c)), str(jnp.result_type(c))) for c in consts)


def pallas_call_problem(
    block_mask: BlockMask, scores: ScoreConfig, operands: Operands
) -> str | None:
    """Why a call (its block mask and score changes) cannot run on the Pallas kernel, or
    ``None`` when it can."""
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
        problem = pallas_problem(block_mask)
        if problem is None and scores.score is not None:
            problem = score_program_problem(scores.score, score_consts)
        return problem

    return _PROBLEMS.get(key, answer)


__all__ = [
    "PallasUnsupportedError",
    "TileConfig",
    "pallas_attend",
    "pallas_attend_with_lse",
    "pallas_call_problem",
    "pallas_problem",
]
