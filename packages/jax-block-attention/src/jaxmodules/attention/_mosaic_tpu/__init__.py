"""The Mosaic TPU backend: fused Pallas kernels for the TPU over a block mask (forward,
dQ, dK/dV), compiled by Mosaic on a TPU and run in TPU interpret mode elsewhere.

Its modules, in the order a call goes through them:

- ``_plugin``: the backend as the registry sees it (refusal, run, block sizes);
- ``_entry``: ``attend`` (checks, kernel layout, padding), ``block_sizes``, ``fits``,
  ``call_problem``;
- ``_lists``: the one reader of the block mask's schedule (what the kernels prefetch,
  and which block each grid step visits);
- ``_reads``: the closed-over arrays of ``mask_fn``/``score_mod``, read before the
  kernels per query row or key column and handed to them as tiles;
- ``_calls``: one ``pallas_call`` per pass and the custom VJP;
- ``_kernels``: the kernel bodies;
- ``_tile``: per-tile math over the shared score pipeline, dropout hash and
  tile-program evaluator;
- ``_rules``: which primitives the Mosaic TPU lowering takes.

Design (after splash attention's scalar-prefetched block schedule, and
FlashAttention-2's online softmax and recomputation from the lse): each pass is one
``pallas_call`` whose grid ends in an axis over the blocks of one row (per query block
its key blocks; per key block, for dK/dV, its query blocks). The row's blocks come from
the block mask's two layers: the band's range ``(first, last, full_first, full_last)``
computed by scalar arithmetic from the prefetched ``q_offset``, four stored numbers per
row for what a ``mask_fn`` adds (documents), and lists only for rows with holes; all
scalar-prefetched into SMEM in O(blocks). The key (or query) BlockSpecs' index maps
compute the block of each step from them, so only non-empty blocks are copied into
VMEM; the axis is as long as the widest row, and steps past a row's end repeat its last
block (no new copy) and skip the body. Full blocks skip the element-wise mask; partial
ones evaluate band, key padding and the ``mask_fn`` program on the tile. The lse and
the backward's ``delta`` travel lane-dense, ``(B, H, 1, Lq)`` (as splash attention's
backward reads them). GQA reads key/value head ``h // G`` through the index maps (no
copy); the dK/dV grid is ``(B, Hkv, key block, query head of the group, step)`` so a
key block's gradients are summed over its group in VMEM scratch. Statistics,
accumulators and the lse are float32; inputs bf16 or f32.
"""

from ._entry import attend, block_sizes, call_problem, fits

__all__ = ["attend", "block_sizes", "call_problem", "fits"]
