"""``BlockMask`` and ``create_block_mask``: which (query block, key block) pairs to compute.

A block pair is *empty* (skipped), *full* (every pair visible: computed without any
mask) or *partial* (computed with the element-wise mask). The plan has two layers:

1. The band. ``is_causal``, ``window_size`` and ``q_offset`` make every query position
   see one contiguous band of keys, ``lo <= k - q <= hi``; so each query block sees one
   contiguous range of key blocks, ``[first, last)``, of which ``[full_first,
   full_last)`` are full and the rest partial, and each key block one range of query
   blocks. Those ranges are arithmetic on the block index and the offset
   (``_band.kv_range`` / ``q_range``), computed wherever they are needed, in a
   kernel too: no arrays beyond ``q_offset``.
2. What the band does not describe (a ``mask_fn``: documents, prefixes, any mask),
   evaluated once in chunks of bounded memory over the band's non-empty pairs
   (``_block_build``) and stored as the same four numbers per query block
   (``kv_ranges``, ``(Bm, Hm, n_q, 4)`` int32) and per key block (``q_ranges``,
   ``(Bm, Hm, n_k, 4)``), already intersected with the band. Documents need nothing
   more. Only a mask whose rows have holes (empty blocks inside a row's span) keeps
   per-row lists too, the layout of PyTorch FlexAttention's ``BlockMask`` and splash
   attention's ``MaskInfo``: counts and sorted indices of partial and full blocks per
   row, padded with the row's last index; a traced mask keeps them only while the grid
   is small (``_block_build.TRACED_LIST_PAIRS``).

A backend walks ``walk`` = ``"band"``, ``"ranges"`` or ``"lists"``, reading
``schedule(side)``: nothing, the ranges, or the four list arrays of that side.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._band import FULL, PARTIAL, band_limits, block_grid, in_band
from ._block_build import (
    LIST_NAMES,
    TRACED_LIST_PAIRS,
    BuildSpec,
    build,
    classes_from_ranges,
    list_arrays,
    ranges_exact,
    trimmed,
)
from ._cache import LRUCache
from ._elementwise import ElementwiseProgram, has_tracers

Array = Any  # jax.Array or np.ndarray

# Built block masks kept for reuse: only those with no closed-over arrays, small ones.
_BUILT = LRUCache["BlockMask"](16)
_BUILT_MAX_BYTES = 4 << 20  # at most 64 MiB of index arrays in all
_BUILDERS = LRUCache[Any](32)


# --------------------------------------------------------------------------- BlockMask


_LEAVES = ("q_offset", "kv_ranges", "q_ranges", *LIST_NAMES)


def _nbytes(x: Any) -> int:
    return 0 if x is None else int(np.prod(np.shape(x), dtype=np.int64)) * x.dtype.itemsize


@jax.tree_util.register_pytree_node_class
class BlockMask:
    """Which blocks of the attention matrix to compute: a band, and what a ``mask_fn``
    adds to it as per-block ranges (lists only for rows with holes).

    Made by [`create_block_mask`][jaxmodules.attention.create_block_mask]; pass it to
    ``masked_attention_via_map(..., block_mask=...)``. A pytree: the index arrays (and
    the arrays ``mask_fn`` closes over) are its leaves, the sizes are static. So it can
    be built inside ``jax.jit`` from traced segment ids, returned from a jitted
    function, stored in a train state and reused across layers, steps and calls.

    The leading axes ``(Bm, Hm)`` of every array are ``(1, 1)`` unless the mask depends
    on the batch row (``Bm = B``) or on the head (``Hm = H``).

    Attributes:
        q_offset: ``(Bm,)`` int32: position of query row 0 (key ``j`` sits at ``j``).
        kv_ranges: ``(Bm, Hm, n_q, 4)`` int32 or ``None`` (a band alone): per query
            block ``(first, last, full_first, full_last)``: key blocks ``[first,
            last)`` are computed, ``[full_first, full_last)`` of them without a mask.
        q_ranges: ``(Bm, Hm, n_k, 4)`` int32 or ``None``: the same per key block.
        kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices: per query
            block, the partial and full key blocks as counts ``(Bm, Hm, n_q)`` and
            sorted indices ``(Bm, Hm, n_q, W)`` (PyTorch's names); stored only for
            masks whose rows have holes, derived on request otherwise.
        q_num_blocks, q_indices, full_q_num_blocks, full_q_indices: the transposed
            lists, per key block.
        shape: ``(B, H, q_len, k_len)`` as requested.
        block_size: ``(query_block, key_block)``.
    """

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
        mask_batch: int,
        mask_heads: int,
    ) -> None:
        self._arrays = {name: arrays.get(name) for name in _LEAVES}
        self.mask_consts = tuple(mask_consts)
        self.shape = shape
        self.block_size = block_size
        self.is_causal = is_causal
        self.window = window
        self.program = program
        self.mask_batch = mask_batch
        self.mask_heads = mask_heads

    # pytree protocol
    def _static(self) -> tuple:
        return (
            self.shape,
            self.block_size,
            self.is_causal,
            self.window,
            self.program,
            self.mask_batch,
            self.mask_heads,
        )

    def tree_flatten(self) -> tuple[tuple, tuple]:
        children = (tuple(self._arrays[n] for n in _LEAVES), self.mask_consts)
        return children, self._static()

    @classmethod
    def tree_unflatten(cls, static: tuple, children: tuple) -> BlockMask:
        arrays, consts = children
        shape, block_size, is_causal, window, program, mask_batch, mask_heads = static
        return cls(
            dict(zip(_LEAVES, arrays, strict=True)),
            consts,
            shape=shape,
            block_size=block_size,
            is_causal=is_causal,
            window=window,
            program=program,
            mask_batch=mask_batch,
            mask_heads=mask_heads,
        )

    # the plan
    @property
    def q_offset(self) -> Array:
        return self._arrays["q_offset"]

    @property
    def kv_ranges(self) -> Array | None:
        return self._arrays["kv_ranges"]

    @property
    def q_ranges(self) -> Array | None:
        return self._arrays["q_ranges"]

    @property
    def walk(self) -> str:
        """How a backend walks this mask: ``"band"`` (ranges by arithmetic from
        ``q_offset``), ``"ranges"`` (``kv_ranges`` / ``q_ranges``) or ``"lists"``."""
        if self._arrays["kv_num_blocks"] is not None:
            return "lists"
        return "ranges" if self.kv_ranges is not None else "band"

    def schedule(self, side: str) -> tuple[Array, ...]:
        """The arrays a backend walks for ``side`` (``"kv"``: per query block, ``"q"``:
        per key block): none for the band, ``(ranges,)``, or the four list arrays
        ``(partial count, partial indices, full count, full indices)``."""
        walk = self.walk
        if walk == "band":
            return ()
        if walk == "ranges":
            return (self.kv_ranges if side == "kv" else self.q_ranges,)
        names = LIST_NAMES[:4] if side == "kv" else LIST_NAMES[4:]
        return tuple(self._arrays[n] for n in names)

    def ranges(self, side: str = "kv") -> Array:
        """``(Bm, Hm, n, 4)`` int32 ranges ``(first, last, full_first, full_last)`` per
        query block (``side="kv"``) or key block (``"q"``): stored, or the band's."""
        stored = self.kv_ranges if side == "kv" else self.q_ranges
        if stored is not None:
            return stored
        xp = jnp if has_tracers([self.q_offset]) else np
        band = self._spec().band(xp, self.q_offset, side)
        return xp.broadcast_to(band[:, None], (band.shape[0], self.mask_heads, *band.shape[1:]))

    def _spec(self) -> BuildSpec:
        lo, hi = self.band()
        return BuildSpec(
            self.mask_batch, self.mask_heads, int(np.shape(self.q_offset)[0]),
            *self.shape[2:], *self.block_size, lo, hi, self.program, None,
        )  # fmt: skip

    @property
    def nbytes(self) -> int:
        """Bytes of the plan's index arrays (``q_offset``, ranges, lists): O(blocks) for
        bands and documents, what the device holds and a kernel reads."""
        return sum(_nbytes(x) for x in self._arrays.values())

    def _list(self, name: str) -> Array:
        stored = self._arrays[name]
        if stored is not None:
            return stored
        leaves = [a for a in self._arrays.values() if a is not None]
        on_device = has_tracers(leaves) or any(isinstance(a, jax.Array) for a in leaves)
        xp = jnp if on_device else np
        lists = list_arrays(xp, xp.asarray(self.block_classes()))
        if xp is np:
            lists = trimmed(lists)
        return lists[name]

    kv_num_blocks = property(lambda self: self._list("kv_num_blocks"))
    kv_indices = property(lambda self: self._list("kv_indices"))
    full_kv_num_blocks = property(lambda self: self._list("full_kv_num_blocks"))
    full_kv_indices = property(lambda self: self._list("full_kv_indices"))
    q_num_blocks = property(lambda self: self._list("q_num_blocks"))
    q_indices = property(lambda self: self._list("q_indices"))
    full_q_num_blocks = property(lambda self: self._list("full_q_num_blocks"))
    full_q_indices = property(lambda self: self._list("full_q_indices"))

    # sizes
    @property
    def num_blocks(self) -> tuple[int, int]:
        """``(n_q, n_k)``: query and key blocks."""
        return block_grid(self.shape[2], self.shape[3], *self.block_size)

    def band(self) -> tuple[int | None, int | None]:
        return band_limits(self.is_causal, self.window)

    # inspection
    def _counts(self) -> tuple[Any, Any]:
        """Block pairs computed ``(partial, full)`` over all ``(Bm, Hm)``."""
        if self.walk == "lists":
            counts = [self._arrays["kv_num_blocks"], self._arrays["full_kv_num_blocks"]]
            xp = jnp if has_tracers(counts) else np
            return xp.sum(counts[0]), xp.sum(counts[1])
        ranges = self.ranges("kv")
        xp = jnp if has_tracers([ranges]) else np
        full = xp.sum(ranges[..., 3] - ranges[..., 2])
        return xp.sum(ranges[..., 1] - ranges[..., 0]) - full, full

    def sparsity(self) -> Any:
        """The fraction of block pairs skipped (a float; a scalar array when traced)."""
        n_q, n_k = self.num_blocks
        total = self.mask_batch * self.mask_heads * n_q * n_k
        partial_, full = self._counts()
        if has_tracers([partial_, full]):
            return 1.0 - (partial_ + full) / total
        return 1.0 - (int(partial_) + int(full)) / total

    def block_classes(self) -> Array:
        """``(Bm, Hm, n_q, n_k)`` int8: 0 empty, 1 partial, 2 full (quadratic: for
        inspection and tests)."""
        n_q, n_k = self.num_blocks
        if self.walk != "lists":
            ranges = self.ranges("kv")
            xp = jnp if has_tracers([ranges]) else np
            return classes_from_ranges(xp, xp.asarray(ranges), n_k)
        counts = [self._arrays[n] for n in LIST_NAMES[:4]]
        xp = jnp if has_tracers(counts) else np
        classes = xp.zeros((self.mask_batch, self.mask_heads, n_q, n_k), xp.int8)
        for count, indices, value in (
            (counts[0], counts[1], PARTIAL),
            (counts[2], counts[3], FULL),
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
        if has_tracers([a for a in self._arrays.values() if a is not None]):
            return f"BlockMask({', '.join(parts)}, traced)"
        offsets = np.asarray(self.q_offset)
        if offsets.any():
            shown = int(offsets[0]) if offsets.size == 1 else offsets.tolist()
            parts.append(f"q_offset={shown}")
        n_q, n_k = self.num_blocks
        n_partial, n_full = (int(c) for c in self._counts())
        lines = [
            f"BlockMask({', '.join(parts)})",
            f"  {n_q} x {n_k} blocks per (b, h) over {self.mask_batch} x {self.mask_heads}: "
            f"{n_full} full, {n_partial} partial, sparsity {self.sparsity():.3f}; "
            f"plan: {self.walk}, {_size_text(self.nbytes)}",
        ]
        lines += [f"  {row}" for row in self._picture()]
        return "\n".join(lines)

    def _picture(self, size: int = 24) -> list[str]:
        """Rows of characters for the block classes of the first (b, h): ``█`` full,
        ``░`` partial, ``·`` empty; large grids are sampled down to ``size`` per side."""
        n_q, n_k = self.num_blocks
        rows = np.linspace(0, n_q - 1, min(n_q, size)).round().astype(int)
        cols = np.linspace(0, n_k - 1, min(n_k, size)).round().astype(int)
        if self.walk == "lists":
            classes = np.asarray(self.block_classes()[0, 0])[rows][:, cols]
        else:
            ranges = np.asarray(self.ranges("kv")[0, 0])[rows]
            classes = classes_from_ranges(np, ranges, n_k)[:, cols]
        glyphs = np.array(["·", "░", "█"])
        lines = ["".join(glyphs[row]) for row in classes]
        if (n_q, n_k) != (len(rows), len(cols)):
            lines.append(f"(sampled {len(rows)} x {len(cols)} of {n_q} x {n_k})")
        return lines


def _size_text(nbytes: int) -> str:
    if nbytes < 1 << 10:
        return f"{nbytes} bytes"
    if nbytes < 1 << 20:
        return f"{nbytes / (1 << 10):.1f} KiB"
    return f"{nbytes / (1 << 20):.1f} MiB"


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
    """A block mask of ``shape = (B, H, Lq, Lk)`` from checked arguments: the band alone
    costs nothing; a ``mask_fn`` layer is built now when everything is known, on the
    device inside the surrounding trace otherwise."""
    batch, heads, q_len, k_len = shape
    traced_offset = has_tracers([q_offset])
    offset = (
        jnp.asarray(q_offset, jnp.int32).reshape(-1)
        if traced_offset
        else np.asarray(q_offset, np.int32).reshape(-1)
    )
    per_batch = offset.shape[0] > 1
    mask_batch = batch if (per_batch or (program is not None and program.uses_batch)) else 1
    mask_heads = heads if (program is not None and program.uses_head) else 1
    static = not has_tracers([*consts, q_offset])
    lo, hi = band_limits(is_causal, window)
    n_q, n_k = block_grid(q_len, k_len, *block_size)
    spec = BuildSpec(
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
        static_offset=None if traced_offset else tuple(int(o) for o in offset),
        keep_lists=not static and n_q * n_k <= TRACED_LIST_PAIRS,
    )
    options: dict[str, Any] = {
        "shape": (batch, heads, q_len, k_len),
        "block_size": block_size,
        "is_causal": is_causal,
        "window": window,
        "program": program,
        "mask_batch": mask_batch,
        "mask_heads": mask_heads,
    }
    offset_leaf = (
        jnp.broadcast_to(offset, (mask_batch,))
        if traced_offset
        else np.broadcast_to(offset, (mask_batch,)).copy()
    )
    if program is None and not traced_offset:
        # The band alone: nothing to build, its ranges are arithmetic (kept in the cache
        # all the same, so that equal masks are one object).
        key = (spec, options["shape"])
        return _BUILT.get(key, lambda: BlockMask({"q_offset": offset_leaf}, (), **options))
    if program is None:
        return BlockMask({"q_offset": offset_leaf}, consts, **options)
    if not static:
        arrays = build(spec, offset, consts)
        arrays.pop("classes")
        return BlockMask({**arrays, "q_offset": offset_leaf}, consts, **options)
    cacheable = not consts
    if cacheable:
        cached = _BUILT.lookup((spec, options["shape"]))
        if cached is not None:
            return cached
    # A compiled executable runs now even when called inside another trace.
    consts = tuple(np.asarray(c) for c in consts)
    key = (spec, tuple((c.shape, c.dtype) for c in consts))
    builder = _BUILDERS.get(
        key, lambda: jax.jit(partial(build, spec)).lower(offset, consts).compile()
    )
    built = {name: np.asarray(a) for name, a in builder(offset, consts).items()}
    classes = built.pop("classes")
    if not ranges_exact(classes, built["kv_ranges"]):
        # Rows with holes: lists as well, so that the empty blocks stay skipped.
        built.update(trimmed(list_arrays(np, classes)))
    block_mask = BlockMask({**built, "q_offset": offset_leaf}, consts, **options)
    if cacheable and block_mask.nbytes <= _BUILT_MAX_BYTES:
        _BUILT.put((spec, options["shape"]), block_mask)
    return block_mask
