"""``explain_dispatch``: which backend computes a call on each platform, and why the
others refuse it."""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any

from . import _dispatch as dispatch
from ._api import masked_attention_via_map
from ._checks import check_arguments
from ._dispatch import DispatchDecision
from ._dropout import check_dropout
from ._platforms import DEFAULT, PLATFORMS
from ._registry import check_implementation


def explain_dispatch(
    Q: Any, K: Any, V: Any, *, platform: str | None = None, **keywords: Any
) -> dict[str, DispatchDecision]:
    """Which backend ``masked_attention_via_map(Q, K, V, **keywords)`` runs on each
    platform, and why each backend tried before it refuses the call.

    The call is checked as ``masked_attention_via_map`` checks it, and not computed. With
    ``implementation=None`` (the default) every platform tries its backends in order
    (on ``"cuda"``: cuDNN, Triton, the block loop) and takes the first that does not
    refuse; a named ``implementation`` is the only one tried. In a program, each
    backend's work sits in ``jax.named_scope("jaxmodules.attention/<name>")``.

    Args:
        Q: Queries, as for ``masked_attention_via_map``.
        K: Keys.
        V: Values.
        platform: One of ``"cpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"`` or ``"default"``
            (any other platform); ``None``: all of them.
        **keywords: The other arguments of ``masked_attention_via_map``.

    Returns:
        A ``DispatchDecision`` per platform: ``backend`` (its name, or ``None`` when the
        named ``implementation`` refuses the call there), ``refusals`` (backend name ->
        reason) and ``interpreted``; ``str()`` of it reads as a sentence per backend.

    Raises:
        ValueError: An unknown ``platform``, or arguments ``masked_attention_via_map``
            rejects.
        TypeError: As ``masked_attention_via_map``, and an unknown keyword.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxmodules.attention import explain_dispatch
        >>> q = jnp.zeros((1, 128, 4, 64), jnp.bfloat16)
        >>> decisions = explain_dispatch(q, q, q, is_causal=True, logits_soft_cap=30.0)
        >>> decisions["cpu"].backend, decisions["cuda"].backend
        ('xla', 'triton')
        >>> print(decisions["cuda"].refusals["cudnn"])
        cuDNN has no equivalent of logits_soft_cap
    """
    platforms = (*PLATFORMS, DEFAULT)
    if platform is not None and platform not in platforms:
        raise ValueError(f"platform must be None or one of {platforms}, got {platform!r}")
    bound = inspect.signature(masked_attention_via_map).bind(Q, K, V, **keywords)
    bound.apply_defaults()
    given = dict(bound.arguments)
    implementation = check_implementation(given.pop("implementation"))
    return_lse = given.pop("return_lse")
    dropout = check_dropout(given.pop("dropout_rate"), given.pop("dropout_rng"))
    args = check_arguments(given.pop("Q"), given.pop("K"), given.pop("V"), dropout=dropout, **given)
    if args.q.ndim == 3:
        args = replace(args, q=args.q[None], k=args.k[None], v=args.v[None])
    asked = platforms if platform is None else (platform,)
    return dispatch.explain(args, implementation, bool(return_lse), asked)
