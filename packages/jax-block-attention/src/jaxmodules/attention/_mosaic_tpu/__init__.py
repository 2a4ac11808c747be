"""The Mosaic TPU backend: fused Pallas kernels for the TPU over a block mask (forward,
dQ, dK/dV), compiled by Mosaic on a TPU and run in TPU interpret mode elsewhere.

Its modules, in the order a call goes through them:

- ``_plugin``: the backend as the registry sees it (refusal, run, block sizes);
- ``_entry``: ``attend`` (checks, kernel layout, padding), ``block_sizes``, ``fits``,
  ``call_problem``;
- ``_lists``: the one reader of the block mask's lists (what the kernels prefetch);
- ``_reads``: the closed-over arrays of ``mask_fn``/``score_mod``, read before the
  kernels per query row or key column and handed to them as tiles;
- ``_calls``: one ``pallas_call`` per pass and the custom VJP;
- ``_kernels``: the kernel bodies;
- ``_tile``: per-tile math over the shared score pipeline, dropout hash and
  tile-program evaluator;
- ``_rules``: which primitives the Mosaic TPU lowering takes.

Design (after splash attention's scalar-prefetched block lists, and FlashAttention-2's
online softmax and recomputation from the lse): each pass is one ``pallas_call`` whose
grid ends in an axis over one row of the block lists. The lists (per query block the
non-empty key blocks, full ones first, and a full flag; per key block the non-empty
query blocks) are scalar-prefetched into SMEM, and the key (or query) BlockSpecs'
index maps read the block index from them, so only listed blocks are copied into VMEM;
steps past a row's count repeat its last block (no new copy) and skip the body. Full
blocks skip the element-wise mask; partial ones evaluate band, key padding and the
``mask_fn`` program on the tile. GQA reads key/value head ``h // G`` through the index
maps (no copy); the dK/dV grid is ``(B, Hkv, key block, query head of the group,
listed query block)`` so a key block's gradients are summed over its group in VMEM
scratch. Statistics, accumulators and the lse are float32; inputs bf16 or f32.
"""

from ._entry import attend, block_sizes, call_problem, fits

__all__ = ["attend", "block_sizes", "call_problem", "fits"]
