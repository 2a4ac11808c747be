"""Attention dropout's keep decisions: one counter-based hash shared by every backend.

Whether the attention weight of query position ``q`` on key position ``k`` in batch row
``b`` and query head ``h`` is kept is a pure function of ``(rng, b, h, q, k)``::

    seed[b, h] = mix(mix(mix(words(rng)) ^ b * B_ODD) ^ h * H_ODD)
    row        = mix(seed[b, h] ^ q * Q_ODD)
    keep       = mix(row ^ k * K_ODD) >= threshold(rate)

where ``mix`` is MurmurHash3's 32-bit finaliser (xor-shifts and two multiplications,
a bijection of ``uint32`` whose every output bit depends on every input bit) and the
``*_ODD`` are odd constants (multiplication by them is a bijection too, spreading
consecutive positions over all bits). So no mask is ever stored: both backends, and the
backward passes, regenerate any tile's decisions from its positions, whatever the block
size. Every operation is a ``uint32`` multiply, xor, logical shift or compare, with no
64-bit value and no ``jax.random`` call, so the same ``jnp`` code runs in the block loop,
in Pallas interpret mode and inside a Triton-lowered kernel.

The per-``(b, h)`` seeds are computed once per call outside the kernels, a ``(B, Hq)``
``uint32`` array; with ``shared=True`` (flax's ``broadcast_dropout``) every entry is
the seed of ``(0, 0)``, so the decisions are the same for every batch row and head.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # jax.Array, or a value inside a Pallas kernel

_U32 = jnp.uint32
# MurmurHash3's finaliser constants, and odd multipliers for the positions (the
# golden-ratio constant and three of its relatives from the same family of hashes).
_MIX_1 = 0x85EBCA6B
_MIX_2 = 0xC2B2AE35
_START = 0x6A09E667
_BATCH_ODD = 0x9E3779B1
_HEAD_ODD = 0x7FEB352D
_QUERY_ODD = 0x846CA68B
_KEY_ODD = 0xCC9E2D51


def mix(x: Array) -> Array:
    """MurmurHash3's 32-bit finaliser on ``uint32`` values."""
    x = x ^ (x >> 16)
    x = x * _U32(_MIX_1)
    x = x ^ (x >> 13)
    x = x * _U32(_MIX_2)
    return x ^ (x >> 16)


def _u32(x: Array) -> Array:
    return jnp.asarray(x).astype(_U32)


def row_hashes(seeds: Array, q_pos: Array) -> Array:
    """Per query row: the seed of its ``(b, h)`` mixed with its position (broadcast)."""
    return mix(seeds ^ (_u32(q_pos) * _U32(_QUERY_ODD)))


def keep_from_rows(rows: Array, k_pos: Array, threshold: int) -> Array:
    """The keep decisions of rows (``row_hashes``) against key positions (broadcast)."""
    return mix(rows ^ (_u32(k_pos) * _U32(_KEY_ODD))) >= _U32(threshold)


def keep_tile(seeds: Array, q_pos: Array, k_pos: Array, threshold: int) -> Array:
    """The keep decisions of a tile: ``seeds`` and ``q_pos`` broadcast against each
    other along the rows, ``k_pos`` along the keys."""
    return keep_from_rows(row_hashes(seeds, q_pos), k_pos, threshold)


def threshold(rate: float) -> int:
    """The ``uint32`` threshold at or above which a hash keeps its weight: a weight is
    dropped with probability ``rate`` (to within ``2**-32``)."""
    return min(round(rate * 2.0**32), 2**32 - 1)


def _key_words(rng: Any) -> jax.Array:
    """The ``uint32`` words of a single PRNG key: a typed key (``jax.random.key``) or a
    raw ``uint32`` key array (``jax.random.PRNGKey``)."""
    if isinstance(rng, (jax.Array, np.ndarray)) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.shape != ():
            raise ValueError(
                f"dropout_rng must be a single PRNG key, got a key array of shape {rng.shape}"
            )
        return jax.random.key_data(rng).reshape(-1).astype(_U32)
    if not hasattr(rng, "dtype") or not hasattr(rng, "shape"):
        raise TypeError(
            f"dropout_rng must be a PRNG key (jax.random.key or jax.random.PRNGKey), got "
            f"{type(rng).__name__}"
        )
    if rng.dtype != np.uint32:
        raise TypeError(
            "dropout_rng must be a PRNG key (jax.random.key or jax.random.PRNGKey), got "
            f"an array of dtype {rng.dtype} and shape {tuple(rng.shape)}"
        )
    shapes = _raw_key_shapes()
    if tuple(rng.shape) not in shapes:
        expected = " or ".join(str(s) for s in shapes)
        raise ValueError(
            "dropout_rng must be a single PRNG key: a typed key (jax.random.key) or a raw "
            f"uint32 key (jax.random.PRNGKey) of shape {expected}, got a uint32 array of "
            f"shape {tuple(rng.shape)}"
        )
    return jnp.asarray(rng, _U32)


def _raw_key_shapes() -> tuple[tuple[int, ...], ...]:
    """The shapes of a raw key: threefry's ``(2,)`` and the default implementation's
    (``rbg`` keys are ``(4,)``)."""
    default = tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)
    return ((2,),) if default == (2,) else ((2,), default)


def stream_seeds(rng: Any, batch: int, heads: int, *, shared: bool = False) -> jax.Array:
    """The ``(batch, heads)`` ``uint32`` seeds of a key; with ``shared`` all equal to the
    seed of batch row 0, head 0."""
    words = _key_words(rng)
    state = _U32(_START)
    for n in range(words.shape[0]):
        state = mix(state ^ words[n])
    if shared:
        batch_index = jnp.zeros((batch, 1), _U32)
        head_index = jnp.zeros((1, heads), _U32)
    else:
        batch_index = jnp.arange(batch, dtype=_U32)[:, None]
        head_index = jnp.arange(heads, dtype=_U32)[None, :]
    state = mix(state ^ (batch_index * _U32(_BATCH_ODD)))
    return mix(state ^ (head_index * _U32(_HEAD_ODD)))


@dataclass(frozen=True)
class Dropout:
    """A checked dropout request: the rate, and the ``(B, Hq)`` seeds once the shapes
    are known (built by ``seeds``)."""

    rate: float
    rng: Any
    shared: bool = False

    @property
    def threshold(self) -> int:
        return threshold(self.rate)

    @property
    def scale(self) -> float:
        """The factor on kept weights, ``1 / (1 - rate)``."""
        return 1.0 / (1.0 - self.rate)

    def seeds(self, batch: int, heads: int) -> jax.Array:
        return stream_seeds(self.rng, batch, heads, shared=self.shared)


def check_rate(rate: Any) -> float:
    """``dropout_rate`` checked: a float in ``[0, 1)`` known at trace time."""
    if isinstance(rate, jax.core.Tracer):
        raise TypeError(
            "dropout_rate must be a Python float known when the call is traced (it fixes "
            "the compiled program), got a traced value"
        )
    if isinstance(rate, bool) or not isinstance(rate, (numbers.Real, np.generic)):
        raise TypeError(f"dropout_rate must be a float in [0, 1), got {rate!r}")
    value = float(rate)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {value}")
    return value


def check_dropout(rate: Any, rng: Any, *, shared: bool = False) -> Dropout | None:
    """``dropout_rate`` and ``dropout_rng`` checked; ``None`` when there is no dropout
    (a rate of 0)."""
    value = check_rate(rate)
    if value == 0.0:
        return None
    if rng is None:
        raise ValueError(
            f"dropout_rate={value} needs dropout_rng, a PRNG key (jax.random.key(...)); "
            "got dropout_rng=None"
        )
    _key_words(rng)  # type and shape checked here, before any tracing
    return Dropout(value, rng, shared)


def dropout_keep_mask(
    rng: Any,
    rate: float,
    shape: tuple[int, int, int, int],
    *,
    q_offset: Any = 0,
    shared: bool = False,
) -> jax.Array:
    """The keep decisions that attention dropout draws for ``rng``, materialised.

    ``masked_attention_via_map(..., dropout_rate=rate, dropout_rng=rng)`` keeps the
    weight of query row ``i`` on key ``j`` in batch row ``b`` and query head ``h``
    exactly where this mask is ``True`` (kept weights are scaled by ``1 / (1 - rate)``),
    for every backend and block size. Each decision is a hash of ``(rng, b, h, i +
    q_offset, j)``, so a chunk of queries computed with ``q_offset=start`` draws the
    rows ``start:`` of the full call's mask. The attention functions never build this
    array; it is ``B * H * Lq * Lk`` booleans, for tests and inspection.

    Args:
        rng: The PRNG key passed as ``dropout_rng`` (``jax.random.key`` or
            ``jax.random.PRNGKey``).
        rate: The dropout rate, in ``[0, 1)``.
        shape: ``(B, H, Lq, Lk)``: batch rows, query heads (with grouped-query
            attention, the query heads), query and key lengths.
        q_offset: Position of query row 0, an int or an int array ``(B,)``, as in
            ``masked_attention_via_map``.
        shared: One mask for every batch row and head, as flax's
            ``broadcast_dropout=True`` (what ``flax_dot_product_attention`` draws then).

    Returns:
        A boolean array of ``shape``; ``True`` where the weight is kept.

    Raises:
        ValueError: A rate outside ``[0, 1)``, a shape that is not four non-negative
            ints, a key array holding more than one key.
        TypeError: ``rng`` that is not a PRNG key.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxmodules.attention import dropout_keep_mask
        >>> keep = dropout_keep_mask(jax.random.key(0), 0.25, (2, 4, 64, 64))
        >>> keep.shape, keep.dtype
        ((2, 4, 64, 64), dtype('bool'))
        >>> bool(abs(jnp.mean(keep) - 0.75) < 0.01)  # about 1 - rate of them are kept
        True
    """
    if isinstance(rate, bool) or not isinstance(rate, (numbers.Real, np.generic)):
        raise TypeError(f"rate must be a float in [0, 1), got {rate!r}")
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {float(rate)}")
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) != 4
        or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) for n in shape)
        or any(int(n) < 0 for n in shape)
    ):
        raise ValueError(f"shape must be four non-negative ints (B, H, Lq, Lk), got {shape!r}")
    batch, heads, q_len, k_len = (int(n) for n in shape)
    seeds = stream_seeds(rng, batch, heads, shared=shared)
    offset = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32).reshape(-1), (batch,))
    q_pos = jnp.arange(q_len, dtype=jnp.int32)[None, :] + offset[:, None]
    rows = row_hashes(seeds[:, :, None, None], q_pos[:, None, :, None])
    k_pos = jnp.arange(k_len, dtype=jnp.int32)
    return keep_from_rows(rows, k_pos[None, None, None, :], threshold(float(rate)))
