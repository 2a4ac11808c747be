"""The static description of one attention call that the kernels are traced from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """Shapes, block sizes, mask flags and the block schedule of one call.

    Everything here is a Python value fixed at trace time, so a ``Plan`` is hashable and
    can be a static argument of ``jax.jit`` or a non-differentiable argument of
    ``jax.custom_vjp``.

    The inputs reach the kernels in the layout ``(B, Hkv, rows, d)`` where the rows of
    query block ``i`` are ``q_block * groups`` consecutive rows: query position major,
    query head within the key/value group minor.

    Attributes:
        batch: Batch size ``B``.
        kv_heads: Number of key/value heads ``Hkv``.
        groups: Query heads per key/value head (``Hq // Hkv``).
        q_len: True query length ``Lq`` (before padding to a block multiple).
        k_len: True key length ``Lk`` (before padding to a block multiple).
        q_block: Query positions per block.
        k_block: Key positions per block.
        scale: Factor applied to the scores ``Q @ K^T``.
        is_causal: Whether ``k <= q`` is required.
        window: ``(left, right)`` window bounds; ``None`` on a side means unbounded.
        full: Per query block, the key blocks in which every pair is visible (no mask).
        partial: Per query block, the key blocks that need the element-wise mask.
        mask_on_device: Whether ``mask_fn`` depends on traced values, so each partial
            block is first checked on device and skipped there when it is empty.
    """

    batch: int
    kv_heads: int
    groups: int
    q_len: int
    k_len: int
    q_block: int
    k_block: int
    scale: float
    is_causal: bool
    window: tuple[int | None, int | None]
    full: tuple[tuple[int, ...], ...]
    partial: tuple[tuple[int, ...], ...]
    mask_on_device: bool

    @property
    def n_q_blocks(self) -> int:
        return -(-self.q_len // self.q_block)

    @property
    def n_k_blocks(self) -> int:
        return -(-self.k_len // self.k_block)

    @property
    def rows_per_block(self) -> int:
        return self.q_block * self.groups

    @property
    def query_heads(self) -> int:
        return self.kv_heads * self.groups
