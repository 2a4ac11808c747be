"""A user's ``mask_fn`` or ``score_mod`` as a reusable program: traced once, evaluated
at any shape.

The function is traced on scalars (``b, h, q, k`` int32 indices, and the float32 score
for ``score_mod``) into a jaxpr.
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
class ElementwiseProgram:
    """The jaxpr of an element-wise ``mask_fn(b, h, q, k) -> bool`` or
    ``score_mod(score, b, h, q, k) -> float32``, hashable by its text.

    Attributes:
        jaxpr: The jaxpr; its constvars stand for the closed-over arrays.
        key: Text that identifies the program (equal text, equal function).
        uses_batch: Whether the result depends on ``b``.
        uses_head: Whether the result depends on ``h``.
        differentiable: Positions of the closed-over arrays that are floating point
            (``score_mod`` gradients flow to them).
        name: The user's function name, for ``repr``.
    """

    jaxpr: Any = field(repr=False)
    key: str = field(repr=False)
    uses_batch: bool
    uses_head: bool
    name: str
    differentiable: tuple[int, ...] = ()

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ElementwiseProgram) and other.key == self.key

    def evaluate(self, consts: Sequence[Array], *inputs: Any) -> Array:
        """The function on broadcastable input arrays (``b, h, q, k`` for a mask,
        ``score, b, h, q, k`` for a score change), as an array of their broadcast shape
        (size-1 axes kept where no input varies)."""
        index = [jnp.asarray(x) for x in inputs]
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


def _trace(
    fn: Any, name: str, scalars: tuple, what: str, contract: str
) -> tuple[Any, tuple[Array, ...]]:
    try:
        closed = jax.make_jaxpr(lambda *args: jnp.asarray(fn(*args)))(*scalars)
    except jax.errors.JAXTypeError as err:
        raise TypeError(
            f"{name} must be written with JAX array operations (jnp.where, &, |, indexing "
            "jnp arrays): it is traced with integer indices, so it may not branch on them "
            "in Python, convert them to NumPy or index NumPy arrays with them. Calling it "
            f"with {what} failed with {type(err).__name__}: {err}"
        ) from None
    except (ValueError, IndexError) as err:
        raise ValueError(
            f"{name} failed when called with {what} (it must be element-wise, as if "
            f"vectorized with jax.vmap): {type(err).__name__}: {err}"
        ) from err
    (result,) = closed.out_avals
    if result.shape != ():
        raise ValueError(
            f"{name} must be element-wise: for {what} it returned shape {result.shape} "
            f"instead of a scalar ({contract}; it is vectorized over index grids with "
            "jax.vmap)"
        )
    consts = tuple(jnp.asarray(c) if isinstance(c, np.ndarray) else c for c in closed.consts)
    return closed, consts


def _program(closed: Any, consts: tuple, fn: Any, index_start: int) -> ElementwiseProgram:
    # The closed-over arrays stay constvars: the program text names them, holds none.
    jaxpr = closed.jaxpr
    used = _used_inputs(jaxpr)
    avals = ", ".join(f"{jnp.shape(c)}:{jnp.result_type(c)}" for c in consts)
    floating = tuple(
        i for i, c in enumerate(consts) if jnp.issubdtype(jnp.result_type(c), jnp.floating)
    )
    return ElementwiseProgram(
        jaxpr=jaxpr,
        key=f"{jaxpr}|{avals}",
        uses_batch=used[index_start],
        uses_head=used[index_start + 1],
        name=getattr(fn, "__name__", type(fn).__name__),
        differentiable=floating,
    )


def trace_mask_fn(mask_fn: Any) -> tuple[ElementwiseProgram, tuple[Array, ...]]:
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

    what = "scalar int32 indices b, h, q, k"
    closed, consts = _trace(
        mask4, "mask_fn", (np.int32(0),) * 4, what, "each (b, h, q, k) gets one bool"
    )
    (result,) = closed.out_avals
    if result.dtype != jnp.bool_:
        raise TypeError(
            "mask_fn must return booleans (True = visible), got dtype "
            f"{result.dtype} with shape {result.shape} for {what}"
        )
    return _program(closed, consts, mask_fn, 0), consts


def trace_score_mod(score_mod: Any) -> tuple[ElementwiseProgram, tuple[Array, ...]]:
    """Trace ``score_mod(score, b, h, q, k)`` on scalars; return its program and its
    closed-over arrays.

    Raises:
        TypeError: ``score_mod`` is not callable, does not take 5 arguments, uses Python
            control flow on its traced inputs, or does not return a floating scalar.
        ValueError: ``score_mod`` fails on scalar inputs or is not element-wise.
    """
    if not callable(score_mod):
        raise TypeError(f"score_mod must be callable or None, got {type(score_mod).__name__}")
    try:
        inspect.signature(score_mod).bind(*range(5))
    except TypeError:
        raise TypeError(
            "score_mod must take 5 positional arguments (score, b, h, q, k), got a callable "
            f"with signature {inspect.signature(score_mod)}"
        ) from None
    except ValueError:
        pass  # no introspectable signature
    what = "a float32 scalar score and scalar int32 indices b, h, q, k"
    scalars = (np.float32(0), *(np.int32(0),) * 4)
    closed, consts = _trace(score_mod, "score_mod", scalars, what, "one score in, one out")
    (result,) = closed.out_avals
    if not jnp.issubdtype(result.dtype, jnp.floating):
        raise TypeError(
            f"score_mod must return a floating score, got dtype {result.dtype} for {what}"
        )
    return _program(closed, consts, score_mod, 1), consts


def has_tracers(values: Sequence[Any]) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in values)
