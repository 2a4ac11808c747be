"""A user's ``mask_fn`` as a reusable program: traced once, evaluated at any shape.

The function is traced on four scalar ``int32`` indices (``b, h, q, k``) into a jaxpr.
Everything it closes over (segment ids, lengths; concrete or traced) becomes an explicit
argument, so compiled programs can be cached on the jaxpr's text without baking stale
arrays into them, and the same jaxpr evaluates any grid of indices through nested
``vmap``s that only batch the axes an index actually varies along.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

Array = jax.Array


def _arity(mask_fn: Callable[..., Any]) -> int:
    """4 for ``mask_fn(b, h, q, k)``, 3 for ``mask_fn(h, q, k)``."""
    try:
        signature = inspect.signature(mask_fn)
    except (TypeError, ValueError):
        return 4  # no introspectable signature (some builtins): assume the full form
    for arity in (4, 3):
        try:
            signature.bind(*range(arity))
        except TypeError:
            continue
        return arity
    raise TypeError(
        "mask_fn must take 4 positional arguments (b, h, q, k) or 3 (h, q, k), "
        f"got a callable with signature {signature}"
    )


def _used_inputs(jaxpr: Any) -> tuple[bool, ...]:
    """Which of the jaxpr's inputs any equation or output reads."""
    used: set[Any] = set()
    for eqn in jaxpr.eqns:
        used.update(v for v in eqn.invars if not isinstance(v, Literal))
    used.update(v for v in jaxpr.outvars if not isinstance(v, Literal))
    return tuple(v in used for v in jaxpr.invars)


@dataclass(frozen=True, eq=False)
class MaskProgram:
    """The jaxpr of a scalar ``mask_fn(b, h, q, k) -> bool``, hashable by its text.

    Attributes:
        jaxpr: The jaxpr; its constvars stand for the closed-over arrays.
        key: Text that identifies the program (equal text, equal function).
        uses_batch: Whether the result depends on ``b``.
        uses_head: Whether the result depends on ``h``.
        name: The user's function name, for ``repr``.
    """

    jaxpr: Any = field(repr=False)
    key: str = field(repr=False)
    uses_batch: bool
    uses_head: bool
    name: str

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MaskProgram) and other.key == self.key

    def evaluate(self, consts: Sequence[Array], b: Any, h: Any, q: Any, k: Any) -> Array:
        """The mask on broadcastable integer index arrays of equal rank, as booleans of
        their broadcast shape (size-1 axes kept where no index varies)."""
        index = [jnp.asarray(x, jnp.int32) for x in (b, h, q, k)]
        ndim = max(x.ndim for x in index)
        index = [x.reshape((1,) * (ndim - x.ndim) + x.shape) for x in index]

        def scalar(*idx: Array) -> Array:
            return jax.core.eval_jaxpr(self.jaxpr, list(consts), *idx)[0]

        def over(fn: Callable[..., Array]) -> Callable[..., Array]:
            # vmap over the leading axis only the indices that vary along it.
            def mapped(*idx: Array) -> Array:
                sizes = {x.shape[0] for x in idx if x.shape[0] != 1}
                if not sizes:
                    return fn(*(x[0] for x in idx))[None]
                axes = tuple(0 if x.shape[0] != 1 else None for x in idx)
                args = tuple(x if a == 0 else x[0] for x, a in zip(idx, axes, strict=True))
                return jax.vmap(fn, in_axes=axes)(*args)

            return mapped

        fn: Callable[..., Array] = scalar
        for _ in range(ndim):
            fn = over(fn)
        return fn(*index)


def trace_mask_fn(mask_fn: Any) -> tuple[MaskProgram, tuple[Array, ...]]:
    """Trace ``mask_fn`` on scalar indices; return its program and its closed-over arrays.

    Raises:
        TypeError: ``mask_fn`` is not callable, takes neither 3 nor 4 arguments, uses
            Python control flow or NumPy on its traced indices, or does not return a
            boolean.
        ValueError: ``mask_fn`` fails on scalar indices or is not element-wise.
    """
    if not callable(mask_fn):
        raise TypeError(f"mask_fn must be callable or None, got {type(mask_fn).__name__}")
    arity = _arity(mask_fn)

    def mask4(b: Any, h: Any, q: Any, k: Any) -> Any:
        return mask_fn(b, h, q, k) if arity == 4 else mask_fn(h, q, k)

    scalars = (np.int32(0),) * 4
    what = "scalar int32 indices b, h, q, k"
    try:
        closed = jax.make_jaxpr(lambda *idx: jnp.asarray(mask4(*idx)))(*scalars)
    except jax.errors.JAXTypeError as err:
        raise TypeError(
            "mask_fn must be written with JAX array operations (jnp.where, &, |, indexing "
            "jnp arrays): it is traced with integer indices, so it may not branch on them "
            "in Python, convert them to NumPy or index NumPy arrays with them. Calling it "
            f"with {what} failed with {type(err).__name__}: {err}"
        ) from None
    except (ValueError, IndexError) as err:
        raise ValueError(
            f"mask_fn failed when called with {what} (it must be element-wise, as if "
            f"vectorized with jax.vmap): {type(err).__name__}: {err}"
        ) from err
    (result,) = closed.out_avals
    if result.dtype != jnp.bool_:
        raise TypeError(
            "mask_fn must return booleans (True = visible), got dtype "
            f"{result.dtype} with shape {result.shape} for {what}"
        )
    if result.shape != ():
        raise ValueError(
            f"mask_fn must be element-wise: for {what} it returned shape {result.shape} "
            "instead of a scalar (each (b, h, q, k) gets one bool; it is vectorized over "
            "(B, Hq, n_q, n_k) index grids with jax.vmap)"
        )
    # The closed-over arrays stay constvars: the program text names them, holds none.
    jaxpr = closed.jaxpr
    used = _used_inputs(jaxpr)
    consts = tuple(jnp.asarray(c) if isinstance(c, np.ndarray) else c for c in closed.consts)
    avals = ", ".join(f"{jnp.shape(c)}:{jnp.result_type(c)}" for c in consts)
    program = MaskProgram(
        jaxpr=jaxpr,
        key=f"{jaxpr}|{avals}",
        uses_batch=used[0],
        uses_head=used[1],
        name=getattr(mask_fn, "__name__", type(mask_fn).__name__),
    )
    return program, consts


def has_tracers(values: Sequence[Any]) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in values)
