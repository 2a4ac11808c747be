"""``BlockMask`` and ``create_block_mask``: which (query block, key block) pairs to compute.

A block pair is *empty* (skipped), *full* (every pair visible: computed without any
mask) or *partial* (computed with the element-wise mask). ``is_causal``, ``window_size``
and ``q_offset`` make every query position see one contiguous band of keys,
``lo <= k - q <= hi``, so their block classes follow from each block's corner
positions: O(blocks) arithmetic, no per-element work. A ``mask_fn`` is evaluated, in
chunks of bounded memory, only on the block pairs that the band leaves non-empty.

The classes are stored as per-row index lists, the layout of PyTorch FlexAttention's
``BlockMask`` and of splash attention's ``MaskInfo``, which a fused kernel reads through
scalar prefetch or integer inputs: for each (batch, head, query block) the number of
partial key blocks and their indices, and the same for full key blocks; transposed, for
each key block its partial and full query blocks (what a key-major backward pass reads).
Lists are sorted; entries past a row's count repeat its last index (a kernel that
prefetches by index then reloads nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._band import EMPTY, FULL, PARTIAL, band_limits, block_grid, in_band, structural_classes
from ._cache import LRUCache
from ._elementwise import ElementwiseProgram, has_tracers

Array = Any  # jax.Array or np.ndarray

# Mask elements evaluated per step when a mask_fn is classified, whatever the length.
_MASK_CHUNK_ELEMENTS = 1 << 21
# Built block masks kept for reuse: only those with no closed-over arrays, small ones.
_BUILT = LRUCache["BlockMask"](16)
_BUILT_MAX_BYTES = 4 << 20  # at most 64 MiB of index arrays in all
_BUILDERS = LRUCache[Any](32)


# ---------------------------------------------------------------------------- building


@dataclass(frozen=True)
class _BuildSpec:
    """Everything static about one block mask; hashable, the key of compiled builders."""

    batch: int  # batch rows the lists are kept for: 1 or B
    heads: int  # heads the lists are kept for: 1 or H
    offsets: int  # number of q_offset values: 1 or B
    q_len: int
    k_len: int
    q_block: int
    k_block: int
    lo: int | None
    hi: int | None
    program: ElementwiseProgram | None
    static_offset: tuple[int, ...] | None  # the offsets when known at trace time

    @property
    def grid(self) -> tuple[int, int]:
        return block_grid(self.q_len, self.k_len, self.q_block, self.k_block)


def _structure(spec: _BuildSpec, xp: Any, offset: Array) -> Array:
    """The band's block classes for ``spec``, with NumPy or on the device."""
    return structural_classes(
        xp, spec.q_len, spec.k_len, spec.q_block, spec.k_block, spec.lo, spec.hi, offset
    )


def _mask_classes(spec: _BuildSpec, offset: Array, consts: tuple) -> Array:
    """``(batch, heads, n_q, n_k)`` classes with ``mask_fn``, evaluated over the block
    pairs the band leaves non-empty (all pairs when the offset is traced), in chunks."""
    dense = jnp.zeros((spec.batch, spec.heads, *spec.grid), jnp.int8)
    if spec.static_offset is not None:
        struct = _structure(spec, np, np.asarray(spec.static_offset))
        # Pairs the band covers whole need no band test per element.
        inside = (struct == FULL).all(axis=0)
        edge = (struct != EMPTY).any(axis=0) & ~inside
        groups = [(np.nonzero(inside), False), (np.nonzero(edge), True)]
    else:
        n_q, n_k = spec.grid
        groups = [(np.divmod(np.arange(n_q * n_k), n_k), True)]
    for (rows, cols), banded in groups:
        if rows.size:
            classes = _classify_pairs(spec, offset, consts, rows, cols, banded)
            dense = dense.at[:, :, rows, cols].set(classes)
    return dense


def _classify_pairs(
    spec: _BuildSpec,
    offset: Array,
    consts: tuple,
    rows: np.ndarray,
    cols: np.ndarray,
    banded: bool,
) -> Array:
    """``(batch, heads, len(rows))`` classes of the block pairs ``(rows, cols)``."""
    program = spec.program
    assert program is not None
    bq, bk = spec.q_block, spec.k_block
    n_pairs = rows.size
    per_pair = spec.batch * spec.heads * bq * bk
    chunk = int(max(1, min(n_pairs, _MASK_CHUNK_ELEMENTS // per_pair)))
    n_chunks = -(-n_pairs // chunk)
    pad = n_chunks * chunk - n_pairs
    # Padding repeats the last pair; its result is dropped.
    rows_p = np.concatenate([rows, np.repeat(rows[-1:], pad)]).astype(np.int32)
    cols_p = np.concatenate([cols, np.repeat(cols[-1:], pad)]).astype(np.int32)
    b_idx = jnp.arange(spec.batch, dtype=jnp.int32).reshape(-1, 1, 1, 1, 1)
    h_idx = jnp.arange(spec.heads, dtype=jnp.int32).reshape(1, -1, 1, 1, 1)
    off = jnp.asarray(offset, jnp.int32).reshape(-1, 1, 1, 1, 1)

    def classify(pair: tuple[Array, Array]) -> Array:
        i, j = pair  # (chunk,) block indices
        q_row = jnp.minimum(i[:, None] * bq + jnp.arange(bq, dtype=jnp.int32), spec.q_len - 1)
        k_pos = j[:, None] * bk + jnp.arange(bk, dtype=jnp.int32)
        q_pos = q_row[None, None, :, :, None] + off  # (offsets, 1, chunk, bq, 1)
        k_pos = k_pos[None, None, :, None, :]  # (1, 1, chunk, 1, bk)
        k_safe = jnp.minimum(k_pos, spec.k_len - 1)
        visible = program.evaluate(consts, b_idx, h_idx, q_pos, k_safe)
        if banded:
            visible = visible & in_band(q_pos, k_pos, spec.lo, spec.hi, spec.k_len)
        visible = jnp.broadcast_to(visible, (spec.batch, spec.heads, chunk, bq, bk))
        # Padded query rows repeat a real row and padded keys are invisible, so any / all
        # over the block decide its class (EMPTY, PARTIAL, FULL = 0, 1, 2 = any + all).
        # int8 max / min vectorize far better on XLA:CPU than boolean reductions.
        as_int = visible.astype(jnp.int8)
        return as_int.max(axis=(3, 4)) + as_int.min(axis=(3, 4))

    pairs = (rows_p.reshape(n_chunks, chunk), cols_p.reshape(n_chunks, chunk))
    classes = lax.map(classify, (jnp.asarray(pairs[0]), jnp.asarray(pairs[1])))
    classes = jnp.moveaxis(classes, 0, 2).reshape(spec.batch, spec.heads, -1)
    return classes[:, :, :n_pairs].astype(jnp.int8)


def _lists(xp: Any, classes: Array, width: int) -> tuple[Array, Array, Array, Array]:
    """Per row of ``classes (..., n)``: partial count and indices, full count and indices
    (``width`` entries each, sorted, padded with the row's last index); NumPy or jnp."""
    n = classes.shape[-1]
    rank = xp.where(classes == PARTIAL, 0, xp.where(classes == FULL, 1, 2)).astype(xp.int8)
    order: Any
    if xp is np:
        order = np.argsort(rank, axis=-1, kind="stable").astype(np.int32)
    else:
        order = jnp.argsort(rank, axis=-1, stable=True).astype(jnp.int32)
    n_partial = (classes == PARTIAL).sum(axis=-1, dtype=xp.int32)
    n_full = (classes == FULL).sum(axis=-1, dtype=xp.int32)
    t = xp.arange(width, dtype=xp.int32)
    at_partial = xp.maximum(xp.minimum(t, n_partial[..., None] - 1), 0)
    at_full = xp.clip(n_partial[..., None] + xp.minimum(t, n_full[..., None] - 1), 0, n - 1)
    partial = xp.take_along_axis(order, at_partial, axis=-1)
    full = xp.take_along_axis(order, at_full, axis=-1)
    return n_partial, partial, n_full, full


def _list_arrays(xp: Any, classes: Array) -> dict[str, Array]:
    """All eight list arrays of ``classes (Bm, Hm, n_q, n_k)``."""
    kv = _lists(xp, classes, classes.shape[-1])
    qs = _lists(xp, xp.swapaxes(classes, -1, -2), classes.shape[-2])
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
    arrays = dict(zip(names, kv, strict=True))
    arrays.update(zip((n.replace("kv", "q") for n in names), qs, strict=True))
    return arrays


def _build(spec: _BuildSpec, offset: Array, consts: tuple) -> dict[str, Array]:
    """The index arrays of a block mask (traceable; widths are the static bounds)."""
    if spec.program is not None:
        classes = _mask_classes(spec, offset, consts)
    else:
        if spec.static_offset is not None:
            struct = jnp.asarray(_structure(spec, np, np.asarray(spec.static_offset)))
        else:
            struct = _structure(spec, jnp, offset)
        classes = jnp.broadcast_to(struct[:, None], (spec.batch, spec.heads, *spec.grid))
    return _list_arrays(jnp, classes)


def _trimmed(arrays: dict[str, Array]) -> dict[str, np.ndarray]:
    """Host copies with each list cut to the longest row (known once built)."""
    host = {name: np.asarray(a) for name, a in arrays.items()}
    for count, indices in (
        ("kv_num_blocks", "kv_indices"),
        ("full_kv_num_blocks", "full_kv_indices"),
        ("q_num_blocks", "q_indices"),
        ("full_q_num_blocks", "full_q_indices"),
    ):
        width = max(1, int(host[count].max(initial=0)))
        host[indices] = np.ascontiguousarray(host[indices][..., :width])
    return host


# --------------------------------------------------------------------------- BlockMask


_LEAVES = (
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
    "q_offset",
)


@jax.tree_util.register_pytree_node_class
class BlockMask:
    """Which blocks of the attention matrix to compute, as per-row index lists.

    Made by [`create_block_mask`][jaxmodules.attention.create_block_mask]; pass it to
    ``masked_attention_via_map(..., block_mask=...)``. A pytree: the index arrays (and
    the arrays ``mask_fn`` closes over) are its leaves, the sizes are static. So it can
    be built inside ``jax.jit`` from traced segment ids, returned from a jitted
    function, stored in a train state and reused across layers, steps and calls.

    The leading axes ``(Bm, Hm)`` of every array are ``(1, 1)`` unless the mask depends
    on the batch row (``Bm = B``) or on the head (``Hm = H``).

    Attributes:
        kv_num_blocks: ``(Bm, Hm, n_q)`` int32: per query block, how many partial key
            blocks (those that need the element-wise mask).
        kv_indices: ``(Bm, Hm, n_q, W)`` int32: their key-block indices, ascending.
        full_kv_num_blocks: ``(Bm, Hm, n_q)`` int32: how many full key blocks.
        full_kv_indices: ``(Bm, Hm, n_q, W_full)`` int32: their indices.
        q_num_blocks: ``(Bm, Hm, n_k)`` int32: per key block, how many partial query
            blocks (the transposed lists, for a key-major backward pass).
        q_indices: ``(Bm, Hm, n_k, W_q)`` int32.
        full_q_num_blocks: ``(Bm, Hm, n_k)`` int32.
        full_q_indices: ``(Bm, Hm, n_k, W_q_full)`` int32.
        q_offset: ``(Bm,)`` int32: position of query row 0 (key ``j`` sits at ``j``).
        shape: ``(B, H, q_len, k_len)`` as requested.
        block_size: ``(query_block, key_block)``.
    """

    kv_num_blocks: Array
    kv_indices: Array
    full_kv_num_blocks: Array
    full_kv_indices: Array
    q_num_blocks: Array
    q_indices: Array
    full_q_num_blocks: Array
    full_q_indices: Array
    q_offset: Array

    def __init__(
        self,
        arrays: dict[str, Array],
        mask_consts: tuple,
        *,
        shape: tuple[int, int, int, int],
        block_size: tuple[int, int],
        is_causal: bool,
        window: tuple[int | None, int | None],
        program: ElementwiseProgram | None,
    ) -> None:
        for name in _LEAVES:
            setattr(self, name, arrays[name])
        self.mask_consts = tuple(mask_consts)
        self.shape = shape
        self.block_size = block_size
        self.is_causal = is_causal
        self.window = window
        self.program = program

    # pytree protocol
    def _static(self) -> tuple:
        return (self.shape, self.block_size, self.is_causal, self.window, self.program)

    def tree_flatten(self) -> tuple[tuple, tuple]:
        children = (tuple(getattr(self, n) for n in _LEAVES), self.mask_consts)
        return children, self._static()

    @classmethod
    def tree_unflatten(cls, static: tuple, children: tuple) -> BlockMask:
        arrays, consts = children
        shape, block_size, is_causal, window, program = static
        return cls(
            dict(zip(_LEAVES, arrays, strict=True)),
            consts,
            shape=shape,
            block_size=block_size,
            is_causal=is_causal,
            window=window,
            program=program,
        )

    # sizes
    @property
    def num_blocks(self) -> tuple[int, int]:
        """``(n_q, n_k)``: query and key blocks."""
        return block_grid(self.shape[2], self.shape[3], *self.block_size)

    @property
    def mask_batch(self) -> int:
        return int(self.kv_num_blocks.shape[0])

    @property
    def mask_heads(self) -> int:
        return int(self.kv_num_blocks.shape[1])

    def band(self) -> tuple[int | None, int | None]:
        return band_limits(self.is_causal, self.window)

    # inspection
    def sparsity(self) -> Any:
        """The fraction of block pairs skipped (a float; a scalar array when traced)."""
        n_q, n_k = self.num_blocks
        total = self.mask_batch * self.mask_heads * n_q * n_k
        if has_tracers([self.kv_num_blocks, self.full_kv_num_blocks]):
            traced = jnp.sum(self.kv_num_blocks) + jnp.sum(self.full_kv_num_blocks)
            return 1.0 - traced / total
        listed = int(np.sum(self.kv_num_blocks)) + int(np.sum(self.full_kv_num_blocks))
        return 1.0 - listed / total

    def block_classes(self) -> Array:
        """``(Bm, Hm, n_q, n_k)`` int8: 0 empty, 1 partial, 2 full, read from the lists."""
        n_q, n_k = self.num_blocks
        leaves = [self.kv_indices, self.full_kv_indices]
        xp = jnp if has_tracers(leaves) else np
        classes = xp.zeros((self.mask_batch, self.mask_heads, n_q, n_k), xp.int8)
        for count, indices, value in (
            (self.kv_num_blocks, self.kv_indices, PARTIAL),
            (self.full_kv_num_blocks, self.full_kv_indices, FULL),
        ):
            indices = xp.asarray(indices)
            listed = xp.arange(indices.shape[-1]) < xp.asarray(count)[..., None]
            hits = (indices[..., None] == xp.arange(n_k)) & listed[..., None]
            classes = xp.where(hits.any(axis=-2), xp.int8(value), classes)
        return classes

    def to_dense(self) -> jax.Array:
        """The boolean mask ``(B, H, q_len, k_len)`` that attention with this block mask
        computes (``True`` = visible): for inspection and tests, it is quadratic."""
        batch, heads, q_len, k_len = self.shape
        bq, bk = self.block_size
        classes = self.block_classes()
        q = jnp.arange(q_len, dtype=jnp.int32)
        k = jnp.arange(k_len, dtype=jnp.int32)
        per_element = classes[:, :, q // bq][:, :, :, k // bk]
        q_pos = q[None, None, :, None] + jnp.asarray(self.q_offset).reshape(-1, 1, 1, 1)
        visible = in_band(q_pos, k[None, None, None, :], *self.band(), k_len)
        if self.program is not None:
            b_idx = jnp.arange(self.mask_batch, dtype=jnp.int32).reshape(-1, 1, 1, 1)
            h_idx = jnp.arange(self.mask_heads, dtype=jnp.int32).reshape(1, -1, 1, 1)
            visible = visible & self.program.evaluate(
                self.mask_consts, b_idx, h_idx, q_pos, k[None, None, None, :]
            )
        dense = (per_element == FULL) | ((per_element == PARTIAL) & visible)
        return jnp.broadcast_to(dense, (batch, heads, q_len, k_len))

    def __repr__(self) -> str:
        batch, heads, q_len, k_len = self.shape
        left, right = self.window
        parts = [
            f"B={batch}",
            f"H={heads}",
            f"q_len={q_len}",
            f"k_len={k_len}",
            f"block_size={self.block_size}",
        ]
        if self.is_causal:
            parts.append("is_causal=True")
        if (left, right) != (None, None):
            parts.append(f"window_size={(left, right)}")
        if self.program is not None:
            parts.append(f"mask_fn={self.program.name}")
        leaves = [self.kv_num_blocks, self.full_kv_num_blocks, self.q_offset]
        if has_tracers(leaves):
            return f"BlockMask({', '.join(parts)}, traced)"
        offsets = np.asarray(self.q_offset)
        if offsets.any():
            shown = int(offsets[0]) if offsets.size == 1 else offsets.tolist()
            parts.append(f"q_offset={shown}")
        n_q, n_k = self.num_blocks
        n_partial = int(np.sum(self.kv_num_blocks))
        n_full = int(np.sum(self.full_kv_num_blocks))
        lines = [
            f"BlockMask({', '.join(parts)})",
            f"  {n_q} x {n_k} blocks per (b, h) over {self.mask_batch} x {self.mask_heads}: "
            f"{n_full} full, {n_partial} partial, sparsity {self.sparsity():.3f}",
        ]
        lines += [f"  {row}" for row in _picture(np.asarray(self.block_classes()[0, 0]))]
        return "\n".join(lines)


def _picture(classes: np.ndarray, size: int = 24) -> list[str]:
    """Rows of characters for the block classes of one (b, h): ``█`` full, ``░``
    partial, ``·`` empty; large grids are sampled down to ``size`` per side."""
    n_q, n_k = classes.shape
    rows = np.linspace(0, n_q - 1, min(n_q, size)).round().astype(int)
    cols = np.linspace(0, n_k - 1, min(n_k, size)).round().astype(int)
    glyphs = np.array(["·", "░", "█"])
    lines = ["".join(glyphs[classes[i, cols]]) for i in rows]
    if (n_q, n_k) != (len(rows), len(cols)):
        lines.append(f"(sampled {len(rows)} x {len(cols)} of {n_q} x {n_k})")
    return lines


# ------------------------------------------------------------------------ construction


def make_block_mask(
    program: ElementwiseProgram | None,
    consts: tuple,
    shape: tuple[int, int, int, int],
    block_size: tuple[int, int],
    is_causal: bool,
    window: tuple[int | None, int | None],
    q_offset: Any,
) -> BlockMask:
    """A block mask of ``shape = (B, H, Lq, Lk)`` from checked arguments: built now when
    everything is known, on the device inside the surrounding trace otherwise."""
    batch, heads, q_len, k_len = shape
    offset = (
        jnp.asarray(q_offset, jnp.int32).reshape(-1)
        if has_tracers([q_offset])
        else (np.asarray(q_offset, np.int32).reshape(-1))
    )
    per_batch = offset.shape[0] > 1
    mask_batch = batch if (per_batch or (program is not None and program.uses_batch)) else 1
    mask_heads = heads if (program is not None and program.uses_head) else 1
    static = not has_tracers([*consts, q_offset])
    lo, hi = band_limits(is_causal, window)
    spec = _BuildSpec(
        batch=mask_batch,
        heads=mask_heads,
        offsets=int(offset.shape[0]),
        q_len=q_len,
        k_len=k_len,
        q_block=block_size[0],
        k_block=block_size[1],
        lo=lo,
        hi=hi,
        program=program,
        static_offset=tuple(int(o) for o in offset) if static else None,
    )
    options: dict[str, Any] = {
        "shape": (batch, heads, q_len, k_len),
        "block_size": block_size,
        "is_causal": is_causal,
        "window": window,
        "program": program,
    }
    offset_leaf = (
        jnp.broadcast_to(offset, (mask_batch,))
        if not static
        else np.broadcast_to(offset, (mask_batch,)).copy()
    )
    if not static:
        arrays = _build(spec, offset, consts)
        return BlockMask({**arrays, "q_offset": offset_leaf}, consts, **options)
    cacheable = not consts
    if cacheable:
        cached = _BUILT.lookup((spec, options["shape"]))
        if cached is not None:
            return cached
    if program is None:
        # Known band, no mask_fn: O(blocks) NumPy, nothing to compile.
        struct = _structure(spec, np, offset)
        host = _trimmed(_list_arrays(np, struct[:, None]))
    else:
        # A compiled executable runs now even when called inside another trace.
        consts = tuple(np.asarray(c) for c in consts)
        key = (spec, tuple((c.shape, c.dtype) for c in consts))
        builder = _BUILDERS.get(
            key, lambda: jax.jit(partial(_build, spec)).lower(offset, consts).compile()
        )
        host = _trimmed(builder(offset, consts))
    block_mask = BlockMask({**host, "q_offset": offset_leaf}, consts, **options)
    if cacheable and sum(a.nbytes for a in host.values()) <= _BUILT_MAX_BYTES:
        _BUILT.put((spec, options["shape"]), block_mask)
    return block_mask
