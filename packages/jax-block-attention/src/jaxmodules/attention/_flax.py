"""``flax.nnx.dot_product_attention``'s signature over the block-wise attention, so that it
can be flax's ``attention_fn``. Imports no flax."""

from __future__ import annotations

import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp

from ._api import checked_attention, masked_attention_via_map
from ._checks import check_arguments
from ._dropout import check_dropout, check_rate
from ._registry import check_implementation


def _promote_dtype(arrays: tuple[Any, ...], /, *, dtype: Any = None, inexact: bool = True) -> Any:
    """flax's default ``promote_dtype``: every array in ``dtype``, or in their common
    dtype when ``dtype`` is ``None``."""
    del inexact  # the inputs of attention are floating anyway
    target = dtype if dtype is not None else jnp.result_type(*arrays)
    return tuple(jnp.asarray(x, target) for x in arrays)


# The keywords of masked_attention_via_map that this adapter sets itself.
_SET_HERE = {"Q", "K", "V", "bias", "mask", "is_causal", "dropout_rate", "dropout_rng"}


def _options(options: dict[str, Any]) -> dict[str, Any]:
    """``masked_attention_via_map``'s defaults updated by ``**options``, checked."""
    parameters = inspect.signature(masked_attention_via_map).parameters
    for name in options:
        if name not in parameters or name in _SET_HERE:
            allowed = sorted(set(parameters) - _SET_HERE)
            raise TypeError(
                f"flax_dot_product_attention got an unexpected keyword argument {name!r}; "
                f"the options it passes on to masked_attention_via_map are {allowed}"
            )
    values = {n: p.default for n, p in parameters.items() if n not in _SET_HERE}
    values.update(options)
    return values


def _check_precision(precision: Any) -> None:
    parts = precision if isinstance(precision, (tuple, list)) else (precision,)
    for part in parts:
        if part is None or part == jax.lax.Precision.DEFAULT or part == "default":
            continue
        raise ValueError(
            f"precision={precision!r} is not supported: the block-wise attention runs its "
            "matmuls at the backend's default precision with float32 accumulation; pass "
            "precision=None (flax's default)"
        )


def _flat_batch(x: Any, name: str, batch: tuple[int, ...]) -> Any:
    """A ``bias`` or ``mask`` broadcastable to ``(*batch, H, Lq, Lk)`` as a rank-4 array
    broadcastable to ``(prod(batch), H, Lq, Lk)``."""
    if x is None:
        return None
    x = jnp.asarray(x)
    rank = len(batch) + 3
    if x.ndim > rank:
        raise ValueError(
            f"{name} of shape {x.shape} has more axes than (batch..., heads, q_length, "
            f"kv_length) = {rank}"
        )
    x = x.reshape((1,) * (rank - x.ndim) + x.shape)
    lead = x.shape[: len(batch)]
    if all(n == 1 for n in lead):
        return x.reshape((1, *x.shape[len(batch) :]))
    if len(batch) == 1:
        return x
    if any(n not in (1, m) for n, m in zip(lead, batch, strict=True)):
        raise ValueError(f"{name} of shape {x.shape} does not broadcast to the batch {batch}")
    x = jnp.broadcast_to(x, batch + x.shape[len(batch) :])
    return x.reshape((math.prod(batch), *x.shape[len(batch) :]))


def flax_dot_product_attention(
    query: Any,
    key: Any,
    value: Any,
    bias: Any = None,
    mask: Any = None,
    broadcast_dropout: bool = True,
    dropout_rng: Any = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    promote_dtype: Any = _promote_dtype,
    is_causal: bool = False,
    **options: Any,
) -> Any:
    """``flax.nnx.dot_product_attention``'s signature and meaning, in linear memory.

    Pass it as ``attention_fn=`` to ``flax.nnx.MultiHeadAttention`` or
    ``flax.linen.MultiHeadDotProductAttention``: the layer's masks, ``is_causal`` and
    dropout work as with flax's own attention, computed block by block by
    [`masked_attention_via_map`][jaxmodules.attention.masked_attention_via_map], so no
    ``(q_length, kv_length)`` weight matrix exists in either pass. ``is_causal=True``
    skips the key blocks above the diagonal without building any mask; a dense ``mask``
    works too, and key blocks it leaves empty are skipped. Needs no flax import.

    Differences from flax: dropout draws its keep decisions from a hash of the key and
    the positions (see [`dropout_keep_mask`][jaxmodules.attention.dropout_keep_mask]),
    so with the same key they differ from flax's ``jax.random.bernoulli`` draw, with the
    same statistics; softmax statistics are float32 whatever ``dtype``; a query row with
    no visible key gives 0 where flax gives the mean of the values.

    Args:
        query: ``(batch..., q_length, num_heads, qk_depth)``.
        key: ``(batch..., kv_length, num_kv_heads, qk_depth)``; ``num_heads`` a multiple
            of ``num_kv_heads``.
        value: ``(batch..., kv_length, num_kv_heads, v_depth)``.
        bias: Added to the scores, broadcastable to ``(batch..., num_heads, q_length,
            kv_length)``; it gets a gradient.
        mask: Broadcastable to ``(batch..., num_heads, q_length, kv_length)``; nonzero
            (``True``) = visible, as flax's float or boolean masks.
        broadcast_dropout: One keep mask shared by every batch row and head, as flax.
        dropout_rng: The PRNG key of the dropout; needed when it applies.
        dropout_rate: The probability of dropping an attention weight, in ``[0, 1)``.
        deterministic: No dropout when ``True``.
        dtype: The dtype the inputs are promoted to (their common dtype when ``None``);
            the output has it.
        precision: ``None`` or ``jax.lax.Precision.DEFAULT``; others are refused.
        module: Must be ``None``: flax sets it when ``sow_weights=True`` to record the
            weights, which are never materialised here.
        promote_dtype: ``promote_dtype((query, key, value), dtype=dtype)`` returns the
            three arrays in the computation dtype, as in flax.
        is_causal: Key ``k`` visible from query ``q`` only if ``k <= q``.
        **options: Passed on to ``masked_attention_via_map`` (``block_size``,
            ``implementation``, ``logits_soft_cap``, ...).

    Returns:
        ``(batch..., q_length, num_heads, v_depth)`` in the computation dtype.

    Raises:
        ValueError: A ``module`` (``sow_weights=True``), a ``dropout_rate`` outside
            ``[0, 1)`` or an active dropout without ``dropout_rng``, an unsupported
            ``precision``, shapes that do not fit.
        TypeError: An unknown keyword in ``options``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxmodules.attention import flax_dot_product_attention
        >>> kq, kk, kv = jax.random.split(jax.random.key(0), 3)
        >>> q = jax.random.normal(kq, (2, 64, 4, 16))
        >>> k = jax.random.normal(kk, (2, 64, 4, 16))
        >>> v = jax.random.normal(kv, (2, 64, 4, 16))
        >>> out = flax_dot_product_attention(q, k, v, is_causal=True)
        >>> ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        >>> bool(jnp.allclose(out, ref, atol=1e-5))
        True
        >>> train = flax_dot_product_attention(
        ...     q, k, v, is_causal=True, dropout_rate=0.1, dropout_rng=jax.random.key(1)
        ... )
        >>> train.shape
        (2, 64, 4, 16)
    """
    if module is not None:
        raise ValueError(
            "flax_dot_product_attention got module= (flax's sow_weights=True), which records "
            "the attention weights; they are never materialised here (attention is computed "
            "block by block in linear memory). Call the layer with sow_weights=False, or "
            "use flax's own dot_product_attention_weights where the weights are needed; "
            "return_lse=True (an option) gives each row's log-sum-exp"
        )
    _check_precision(precision)
    rate = check_rate(dropout_rate)
    active = not deterministic and rate > 0.0
    dropout = check_dropout(rate, dropout_rng, shared=bool(broadcast_dropout)) if active else None
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
    if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(
            "query, key and value must have the same rank, at least 3 (batch..., length, "
            f"heads, depth), got shapes {query.shape}, {key.shape}, {value.shape}"
        )
    batch = tuple(query.shape[:-3])
    if key.shape[:-3] != batch or value.shape[:-3] != batch:
        raise ValueError(
            f"query, key and value must have the same batch axes, got shapes {query.shape}, "
            f"{key.shape}, {value.shape}"
        )
    flat = math.prod(batch)
    q4, k4, v4 = (x.reshape((flat, *x.shape[-3:])) for x in (query, key, value))
    if mask is not None:
        mask = jnp.asarray(mask)
        mask = mask if mask.dtype == jnp.bool_ else mask != 0
    values = _options(options)
    implementation = check_implementation(values.pop("implementation"))
    return_lse = values.pop("return_lse")
    args = check_arguments(
        q4,
        k4,
        v4,
        bias=_flat_batch(bias, "bias", batch),
        mask=_flat_batch(mask, "mask", batch),
        is_causal=bool(is_causal),
        dropout=dropout,
        **values,
    )
    out = checked_attention(args, implementation, return_lse)
    if return_lse:
        out, lse = out
        return out.reshape(query.shape[:-1] + out.shape[-1:]), lse.reshape(batch + lse.shape[1:])
    return out.reshape(query.shape[:-1] + out.shape[-1:])
