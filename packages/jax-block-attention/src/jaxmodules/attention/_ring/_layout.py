"""Which sequence chunks each device holds in a ring, and how they move there.

The sequence is cut into ``2 n`` equal chunks (``n`` devices along the ring) and every
device holds two of them. Three orders exist:

- ``"contiguous"``: device ``d`` holds chunks ``2 d`` and ``2 d + 1``: the natural order
  of a sequence sharded along a mesh axis.
- ``"zigzag"``: device ``d`` holds chunks ``d`` and ``2 n - 1 - d``, so each device owns
  as many early (cheap under a causal mask) as late (expensive) query rows.
- ``"balanced"``: the zigzag pair, the even chunk first. It is what ``balance`` makes
  of the contiguous order inside a ``shard_map`` with two collective permutes, one per
  half of each device's block, each moving ``L / (2 n)`` positions: every device's even
  chunk has a distinct zigzag home, and so has its odd one, so each half moves in one
  permutation of the devices and lands in a fixed slot, with no select afterwards.

Natural-order inputs (the default of ``ring_attention``) are exchanged into
``"balanced"`` only when the mask makes the work uneven along the sequence.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._band import band_limits, ranges_meet
from .._normalize import normalize_window

Array = jax.Array

# The orders a caller may declare, and the one the ring runs on for each.
LAYOUTS = ("natural", "zigzag", "contiguous")
ORDERS = ("contiguous", "zigzag", "balanced")


def zigzag_order(length: int, num_devices: int) -> np.ndarray:
    """Indices that put a sequence of ``length`` positions into the zigzag layout.

    The sequence is cut into ``2 * num_devices`` equal chunks; device ``i`` gets chunks
    ``i`` and ``2 * num_devices - 1 - i``, in that order. ``x[..., zigzag_order(L, n), ...]``
    (along the sequence axis) is the zigzag form of ``x``.

    Args:
        length: Sequence length, a multiple of ``2 * num_devices``.
        num_devices: Devices along the sequence mesh axis.

    Returns:
        An int array of shape ``(length,)``, a permutation of ``range(length)``.

    Raises:
        ValueError: ``length`` not a positive multiple of ``2 * num_devices``.

    Examples:
        >>> from jaxmodules.attention import zigzag_order
        >>> zigzag_order(8, 2).tolist()
        [0, 1, 6, 7, 2, 3, 4, 5]
    """
    num_devices = int(num_devices)
    if num_devices < 1:
        raise ValueError(f"num_devices must be positive, got {num_devices}")
    if length <= 0 or length % (2 * num_devices):
        raise ValueError(
            f"length must be a positive multiple of 2 * num_devices = {2 * num_devices}, "
            f"got {length}"
        )
    chunk = length // (2 * num_devices)
    chunks = [c for i in range(num_devices) for c in chunk_pair(i, num_devices, "zigzag")]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks])


def to_zigzag(x: Any, num_devices: int, axis: int = 1) -> Array:
    """Reorder ``x`` along ``axis`` (the sequence) into the zigzag layout.

    ``ring_attention`` balances natural-order inputs itself; this is for data kept in
    zigzag order from the input pipeline on, passed with ``layout="zigzag"``. On an
    array already sharded along the sequence this is a gather across devices; on a mesh
    with ``Explicit`` axes jax asks for the output sharding of that gather, so reorder
    before sharding the sequence (on the host or on unsharded arrays).

    Args:
        x: Array whose ``axis`` is the sequence, length a multiple of ``2 * num_devices``.
        num_devices: Devices along the sequence mesh axis.
        axis: The sequence axis (1 for ``(B, L, H, d)``).

    Returns:
        ``x`` with the sequence in zigzag order.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxmodules.attention import from_zigzag, to_zigzag
        >>> x = jnp.arange(8)
        >>> to_zigzag(x, 2, axis=0).tolist()
        [0, 1, 6, 7, 2, 3, 4, 5]
        >>> from_zigzag(to_zigzag(x, 2, axis=0), 2, axis=0).tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    x = jnp.asarray(x)
    return jnp.take(x, jnp.asarray(zigzag_order(x.shape[axis], num_devices)), axis=axis)


def from_zigzag(x: Any, num_devices: int, axis: int = 1) -> Array:
    """Undo [`to_zigzag`][jaxmodules.attention.to_zigzag]: back to sequence order.

    Args:
        x: Array in zigzag order along ``axis``.
        num_devices: Devices along the sequence mesh axis.
        axis: The sequence axis (1 for ``(B, L, H, d)``, 2 for an lse ``(B, H, L)``).

    Returns:
        ``x`` with the sequence in natural order.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxmodules.attention import from_zigzag
        >>> from_zigzag(jnp.asarray([0, 1, 6, 7, 2, 3, 4, 5]), 2, axis=0).tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    x = jnp.asarray(x)
    inverse = np.argsort(zigzag_order(x.shape[axis], num_devices))
    return jnp.take(x, jnp.asarray(inverse), axis=axis)


def chunk_pair(device: Any, n: int, order: str) -> tuple[Any, Any]:
    """The two chunk indices (out of ``2 n``) that ``device`` holds in ``order``; a
    Python int or a traced device index."""
    if order == "contiguous":
        return 2 * device, 2 * device + 1
    if order == "zigzag":
        return device, 2 * n - 1 - device
    # The zigzag pair {d, 2n-1-d} holds one even and one odd chunk: even first.
    even = device + (device % 2) * (2 * n - 1 - 2 * device)
    return even, 2 * n - 1 - even


def needs_balance(is_causal: bool, window: tuple[int | None, int | None]) -> bool:
    """Whether the work per query row grows (or shrinks) along the sequence, so that
    the contiguous order would load the devices unevenly: the visible band ``lo <= k - q
    <= hi`` is bounded on one side only (causal, or a one-sided window). An unmasked
    call or a two-sided window does the same work on every chunk."""
    lo, hi = band_limits(is_causal, window)
    return (lo is None) != (hi is None)


def ring_order(layout: str, n: int, is_causal: bool, window: tuple[int | None, int | None]) -> str:
    """The chunk order the ring runs on for inputs in ``layout``: natural-order inputs
    are exchanged into ``"balanced"`` when the mask makes the work uneven (and there is
    more than one device), else the ring runs on them as they are."""
    if layout != "natural":
        return layout
    return "balanced" if n > 1 and needs_balance(is_causal, window) else "contiguous"


def _home(chunk: int, n: int) -> int:
    """The device that holds ``chunk`` in the zigzag (and balanced) order."""
    return chunk if chunk < n else 2 * n - 1 - chunk


def _exchange(x: Array, axis: int, seq_axis: str, n: int, inverse: bool) -> Array:
    first, second = jnp.split(x, 2, axis=axis)
    moved = []
    for half, parity in ((first, 0), (second, 1)):
        perm = [(d, _home(2 * d + parity, n)) for d in range(n)]
        if inverse:
            perm = [(dst, src) for src, dst in perm]
        moved.append(lax.ppermute(half, seq_axis, perm))
    return jnp.concatenate(moved, axis=axis)


def balance(x: Array, axis: int, seq_axis: str, n: int) -> Array:
    """Inside ``shard_map``: this device's contiguous block (chunks ``2 d``, ``2 d + 1``
    along ``axis``) to its balanced pair. The even chunks go out by one collective
    permute and the odd ones by another: ``L / n`` positions sent per device."""
    return _exchange(x, axis, seq_axis, n, inverse=False)


def unbalance(x: Array, axis: int, seq_axis: str, n: int) -> Array:
    """Inside ``shard_map``: the inverse of ``balance``."""
    return _exchange(x, axis, seq_axis, n, inverse=True)


def pair_visible(
    q_first: Any, q_len: int, k_first: Any, k_len: int, band: tuple[int | None, int | None]
) -> Any:
    """Whether any key of the ``k_len`` positions from ``k_first`` can be visible from
    any query of the ``q_len`` positions from ``q_first`` under the band ``(lo, hi)``:
    ``True`` when the band is unbounded, else a Python or traced boolean."""
    return ranges_meet(q_first, q_first + q_len - 1, k_first, k_first + k_len - 1, *band)


def ring_block_counts(
    num_devices: int,
    *,
    is_causal: bool = True,
    window_size: int | tuple[int | None, int | None] | None = None,
    layout: str = "natural",
    seq_len: int | None = None,
) -> list[int]:
    """Half-chunk pairs each device computes over the whole ring (the rest are skipped).

    Every device holds two half-chunks of queries and, at each of the ``n`` steps, sees two
    half-chunks of keys: ``4 n`` pairs in all. This counts the pairs a device does not skip,
    the measure of its work, in the order ``ring_attention`` runs on for inputs in
    ``layout``: ``"natural"`` (the default) is balanced wherever the mask makes the work
    uneven; ``"contiguous"`` shows the imbalance of the natural order without that step.

    Args:
        num_devices: Devices along the sequence axis.
        is_causal: Count with a causal mask.
        window_size: As in ``masked_attention_via_map`` (needs ``seq_len``).
        layout: ``"natural"``, ``"zigzag"`` or ``"contiguous"``, as in ``ring_attention``.
        seq_len: Sequence length (needed only with ``window_size``); defaults to
            ``2 * num_devices`` (one position per half-chunk).

    Returns:
        One count per device.

    Raises:
        ValueError: An unknown ``layout`` or a malformed ``window_size``.

    Examples:
        >>> from jaxmodules.attention import ring_block_counts
        >>> ring_block_counts(4)
        [9, 9, 9, 9]
        >>> ring_block_counts(4, layout="contiguous")
        [3, 7, 11, 15]
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    n = int(num_devices)
    length = 2 * n if seq_len is None else int(seq_len)
    chunk = length // (2 * n)
    window = normalize_window(window_size)
    band = band_limits(is_causal, window)
    order = ring_order(layout, n, is_causal, window)
    counts = []
    for device in range(n):
        count = 0
        for step in range(n):
            source = (device - step) % n
            for qc in chunk_pair(device, n, order):
                for kc in chunk_pair(source, n, order):
                    count += bool(pair_visible(qc * chunk, chunk, kc * chunk, chunk, band))
        counts.append(count)
    return counts
