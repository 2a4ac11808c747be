"""The Pallas backend: one fused Pallas (Triton) kernel per pass over a block mask.

Its modules, in the order a call goes through them:

- ``_entry``: ``attend`` (the entry point: checks, tuning defaults, the kernel layout
  and padding) and ``block_sizes`` (its default block sizes);
- ``_eligibility``: ``call_problem``, why a call cannot run on the kernels;
- ``_calls``: one ``pallas_call`` per pass and the custom VJP that ties them together;
- ``_kernels``: the forward, dQ and dK/dV kernel bodies;
- ``_tile_math``: ``TileConfig`` and the per-tile arithmetic the kernels share;
- ``_tuning``: the kernels' tiles, warps and stages per head dimension and dtype;
- ``_tile_program``: the evaluator that runs a traced ``mask_fn`` / ``score_mod`` on a
  tile's index vectors, reading closed-over arrays from kernel refs.

Each pass is one ``pallas_call``. The forward kernel and the dQ kernel run a grid over
``(query tile, query head, batch row)``, query tiles on the fastest axis (programs that
run together share keys and values in L2; under a causal band the longest rows start
first). A query tile is a slice of a block of the
[`BlockMask`][jaxmodules.attention.BlockMask]; every program reads its block's row of the
lists (plain integer array inputs, read by index) and runs two loops: over its full key
blocks, with no element-wise mask, then over its partial key blocks, masked by the band
(``is_causal`` / ``window_size`` with ``q_offset``), key padding and the ``mask_fn``
program evaluated on the tile. Each loop is flat over (listed block, key tile within
it), so Triton pipelines it, and loads the next block's index a step ahead. The dK/dV
kernel runs a grid over ``(key tile, key/value head, batch row)`` and walks the
transposed lists (query blocks per key block) for each query head of its group, so every
output tile is written by one program: no atomics (with GQA and too few programs, the
group's query heads are shared among several programs whose float32 partial sums are
added afterwards). Tiles, warps and pipeline stages per kernel, head dimension and dtype
come from the table in ``_tuning``. Scores are kept in base 2 inside the kernels
(``exp2``; ``log2(e)`` folded into the scale when nothing else changes the scores); the
lse leaves in natural log.

Layout inside the kernels: queries ``(B, Hq, Lq_pad, d_pad)``, keys ``(B, Hkv, Lk_pad,
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
kernel. Only a bias that is itself quadratic has a quadratic gradient.
Traced floating arrays that ``score_mod`` closes over (learnable slopes, a relative
position table) get their gradients from the dQ kernel too: each tile's score gradient is
pulled back through the program to the values it read, and each program adds them into
its own copy of the flattened array's gradient (a sum for reads at one index per tile,
entry by entry for an index that varies across the tile); the copies are summed after.
Arrays of more than ``_MAX_ARRAY_GRADIENT`` entries, or reads that vary over more than
``_MAX_READ_ENTRIES`` entries within a tile, are refused.

The tile math (positions, visibility, the online-softmax step and the gradient step)
lives in small functions of arrays, apart from the refs and the grid.

A ``mask_fn`` that closes over arrays (segment ids, lengths) gets them as whole-array
kernel inputs: its program is re-evaluated on the tile's index vectors, and every
scalar read ``ids[b, q]`` of a closed-over array becomes a load at a vector of indices.
Programs that use a closed-over array any other way cannot be lowered; they raise
``PallasUnsupportedError``.
"""

from ._eligibility import block_mask_problem, call_problem
from ._entry import attend, block_sizes
from ._tile_math import TileConfig
from ._tile_program import PallasUnsupportedError, evaluate_on_tile, kernel_consts

__all__ = [
    "PallasUnsupportedError",
    "TileConfig",
    "attend",
    "block_mask_problem",
    "block_sizes",
    "call_problem",
    "evaluate_on_tile",
    "kernel_consts",
]
