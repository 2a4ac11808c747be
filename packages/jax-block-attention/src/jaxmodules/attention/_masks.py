"""Which (query block, key block) pairs are empty, partial or full, decided at trace time.

``is_causal`` and ``window_size`` give, for every query position ``q``, one contiguous
range of visible keys ``[lo(q), hi(q)]``; both ends grow with ``q``, so a block's class
follows from a few NumPy comparisons. A ``mask_fn`` is evaluated on the block grid when
its result does not depend on traced values; otherwise every block that the structural
masks leave non-empty is kept and checked on device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


def visible_key_range(
    q_len: int, k_len: int, is_causal: bool, window: tuple[int | None, int | None]
) -> tuple[np.ndarray, np.ndarray]:
    """Per query position, the first and last visible key (``lo > hi`` when none)."""
    q = np.arange(q_len, dtype=np.int64)
    lo = np.zeros(q_len, np.int64)
    hi = np.full(q_len, k_len - 1, np.int64)
    left, right = window
    if left is not None:
        lo = np.maximum(lo, q - left)
    if right is not None:
        hi = np.minimum(hi, q + right)
    if is_causal:
        hi = np.minimum(hi, q)
    return lo, hi


def structural_classes(
    q_len: int,
    k_len: int,
    q_block: int,
    k_block: int,
    is_causal: bool,
    window: tuple[int | None, int | None],
) -> np.ndarray:
    """``(n_q_blocks, n_k_blocks)`` array of EMPTY / PARTIAL / FULL for the masks that
    are known from the arguments alone (causal, window, key padding)."""
    lo, hi = visible_key_range(q_len, k_len, is_causal, window)
    n_q, n_k = -(-q_len // q_block), -(-k_len // k_block)
    pad = n_q * q_block - q_len
    # Padded query rows are discarded, so they repeat the last real row and never turn
    # a full block into a partial one.
    lo = np.concatenate([lo, np.repeat(lo[-1:], pad)]).reshape(n_q, q_block, 1)
    hi = np.concatenate([hi, np.repeat(hi[-1:], pad)]).reshape(n_q, q_block, 1)
    k_first = np.arange(n_k) * k_block
    k_last = np.minimum(k_first + k_block, k_len) - 1
    overlap = (np.maximum(lo, k_first) <= np.minimum(hi, k_last)).any(axis=1)
    covers = np.asarray(((lo <= k_first) & (hi >= k_last)).all(axis=1))
    # The last key block holds padding unless Lk is a block multiple: never mask-free.
    covers[:, k_last - k_first + 1 < k_block] = False
    classes = np.where(overlap, PARTIAL, EMPTY)
    return np.where(covers, FULL, classes).astype(np.int8)


def static_mask_classes(
    mask_fn: Callable[..., Any],
    classes: np.ndarray,
    *,
    batch: int,
    heads: int,
    q_len: int,
    k_len: int,
    q_block: int,
    k_block: int,
    is_causal: bool,
    window: tuple[int | None, int | None],
) -> np.ndarray:
    """Refine the structural ``classes`` with a ``mask_fn`` that can be evaluated now.

    The mask is evaluated one query block at a time over the span of key blocks that the
    structural masks leave non-empty. Every row has the same shapes, so one compiled
    program serves them all.
    """
    n_q, n_k = classes.shape
    kept = classes != EMPTY
    if not kept.any():
        return classes
    first = np.where(kept.any(axis=1), kept.argmax(axis=1), 0)
    last = np.where(kept.any(axis=1), n_k - 1 - kept[:, ::-1].argmax(axis=1), 0)
    width = int((last - first).max()) + 1
    lo, hi = visible_key_range(q_len, k_len, is_causal, window)
    b_idx = np.arange(batch, dtype=np.int32).reshape(-1, 1, 1, 1)
    h_idx = np.arange(heads, dtype=np.int32).reshape(1, -1, 1, 1)
    # A fresh jit per call: compiled once for all rows, never reused with a stale closure.
    evaluate = jax.jit(lambda q, k: jnp.asarray(mask_fn(b_idx, h_idx, q, k)))
    refined = classes.copy()
    for i in range(n_q):
        if not kept[i].any():
            continue
        start = min(int(first[i]), n_k - width)
        # Padded query rows repeat the last real one: they change neither any() nor all().
        q = np.minimum(i * q_block + np.arange(q_block), q_len - 1)
        k = start * k_block + np.arange(width * k_block)
        with jax.ensure_compile_time_eval():
            values = evaluate(
                q.reshape(1, 1, -1, 1).astype(np.int32),
                np.minimum(k, k_len - 1).reshape(1, 1, 1, -1).astype(np.int32),
            )
        values = np.asarray(values, dtype=bool)
        values = values.reshape((1,) * (4 - values.ndim) + values.shape)
        structural = (k[None, :] >= lo[q][:, None]) & (k[None, :] <= hi[q][:, None])
        visible = values & structural & (k < k_len)
        per_block = np.broadcast_to(visible, (*values.shape[:2], q.size, k.size))
        per_block = per_block.reshape(*values.shape[:2], q.size, width, k_block)
        block_any = np.asarray(per_block.any(axis=(0, 1, 2, 4)))
        block_all = np.asarray(per_block.all(axis=(0, 1, 2, 4)))
        for offset in range(width):
            j = start + offset
            if classes[i, j] == EMPTY:
                continue
            if not block_any[offset]:
                refined[i, j] = EMPTY
            else:
                refined[i, j] = FULL if block_all[offset] else PARTIAL
    return refined


def schedule(classes: np.ndarray) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Per query block: the tuple of full key blocks and the tuple of partial ones."""
    full = tuple(tuple(int(j) for j in np.flatnonzero(row == FULL)) for row in classes)
    partial = tuple(tuple(int(j) for j in np.flatnonzero(row == PARTIAL)) for row in classes)
    return full, partial
