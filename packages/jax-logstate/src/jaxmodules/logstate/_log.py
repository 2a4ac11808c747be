"""The `Log` pytree node."""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast, final

import jax
import numpy as np

T = TypeVar("T")


@final
class Log(Generic[T]):
    """A value to log, carried inside a pytree.

    `Log` is a registered pytree node with exactly one child, `data`, so it passes through
    `jax.jit`, `jax.vmap`, `jax.lax.scan` (a `Log` returned from a scan body comes out
    stacked over the steps), `jax.grad(..., has_aux=True)` and `jax.checkpoint` like any
    other container. The optional `name` is static: it lives in the node's auxiliary data,
    so it survives `jit` and is part of the tree structure.

    A `Log` is immutable. Two `Log`s are equal when their names match and their data have
    the same structure and the same values (compared on the host like `numpy.array_equal`);
    comparing `Log`s that hold traced values raises `TypeError`. Because the data may be an
    array, a `Log` is not hashable.

    Args:
        data: the value to log: an array, a Python number, any pytree of them, or `None`
            for a cleared log. Strings, arbitrary objects and `Log`s are refused.
        name: an explicit name, used as is by `named_logs` instead of the Log's path in
            the tree. `None` (the default) means "name me after my path".

    Raises:
        TypeError: if `data` holds something other than arrays and numbers (a string, an
            arbitrary object, another `Log`), or if `name` is neither a string nor `None`.
        ValueError: if `name` is the empty string.

    Examples:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> from jaxmodules.logstate import Log
        >>> Log(1.5, name="loss")
        Log(1.5, name='loss')
        >>> jax.tree_util.tree_leaves({"loss": Log(jnp.ones(3)), "step": 7})
        [Array([1., 1., 1.], dtype=float32), 7]
        >>> jax.jit(lambda x: Log(2 * x, name="double"))(jnp.arange(3)).name
        'double'
        >>> Log("warmup")
        Traceback (most recent call last):
        ...
        TypeError: Log: data must be arrays, numbers or a pytree of them; got a 'str' value
    """

    __slots__ = ("data", "name")
    data: T
    name: str | None

    def __init__(self, data: T, name: str | None = None) -> None:
        if name is not None:
            if not isinstance(name, str):
                raise TypeError(f"Log: name must be a str or None, got {type(name).__name__}")
            if not name:
                raise ValueError("Log: name must be a non-empty string or None, got ''")
        check_data(data, "Log")
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "name", name)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Only Log itself is registered with jax; a subclass would be an opaque leaf.
        raise TypeError("Log cannot be subclassed; wrap your value in a Log instead")

    @classmethod
    def _build(cls, data: Any, name: str | None) -> Log[Any]:
        # Skips validation: jax unflattens with placeholder objects, and names coming
        # from an existing Log were validated when it was made.
        log = object.__new__(cls)
        object.__setattr__(log, "data", data)
        object.__setattr__(log, "name", name)
        return log

    def __setattr__(self, attr: str, value: Any) -> None:
        raise AttributeError(
            f"Log is immutable, cannot set {attr!r}; build a new one with "
            "Log(data, name=...) or transform a whole tree with map_logs"
        )

    def __delattr__(self, attr: str) -> None:
        raise AttributeError(f"Log is immutable, cannot delete {attr!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Log, (self.data, self.name))

    def __repr__(self) -> str:
        shown = _short_repr(self.data)
        return f"Log({shown})" if self.name is None else f"Log({shown}, name={self.name!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Log):
            return NotImplemented
        return self.name == other.name and _data_equal(self.data, other.data)

    __hash__ = None  # type: ignore[assignment]


# Leaf types a Log may hold (jax arrays include tracers; the rest are host values).
_VALUE_TYPES = (jax.Array, jax.core.Tracer, np.ndarray, np.generic, bool, int, float, complex)


def check_data(data: Any, who: str) -> None:
    """Raise `TypeError` unless `data` is an array, a number, or a pytree of them."""
    if isinstance(data, _VALUE_TYPES) or data is None:
        return
    if isinstance(data, Log):
        raise TypeError(
            f"{who}: data is already a Log; a Log cannot hold another Log, wrap the value "
            "itself (Log(x.data, name=...))"
        )
    for path, leaf in jax.tree_util.tree_flatten_with_path(data, is_leaf=is_log)[0]:
        if not isinstance(leaf, _VALUE_TYPES):
            where = f" at data{jax.tree_util.keystr(path)}" if path else ""
            what = "another Log" if isinstance(leaf, Log) else f"a {type(leaf).__name__!r} value"
            raise TypeError(
                f"{who}: data must be arrays, numbers or a pytree of them; got {what}{where}"
            )


def _short_repr(data: Any) -> str:
    # A tracer's repr is long and full of internals; its dtype and shape say what matters.
    if isinstance(data, jax.core.Tracer):
        aval = data.aval
        dtype = getattr(aval, "dtype", None)
        shape = getattr(aval, "shape", None)
        if dtype is not None and shape is not None:
            return f"<traced {dtype}[{','.join(map(str, shape))}]>"
    return repr(data)


def _data_equal(a: Any, b: Any) -> bool:
    if a is b:
        return True
    leaves_a, def_a = jax.tree_util.tree_flatten(a)
    leaves_b, def_b = jax.tree_util.tree_flatten(b)
    if cast(Any, def_a) != def_b:  # jaxlib ships no comparison in its stubs
        return False
    if any(isinstance(x, jax.core.Tracer) for x in (*leaves_a, *leaves_b)):
        raise TypeError(
            "Log.__eq__: cannot compare Logs holding traced values; compare their data "
            "with jnp operations inside the traced function instead"
        )
    host_a, host_b = jax.device_get((leaves_a, leaves_b))
    return all(
        x is y or (np.shape(x) == np.shape(y) and bool(np.array_equal(x, y)))
        for x, y in zip(host_a, host_b, strict=True)
    )


def _flatten_with_keys(log: Log[Any]) -> tuple[tuple[tuple[Any, Any]], str | None]:
    return ((jax.tree_util.GetAttrKey("data"), log.data),), log.name


def _flatten(log: Log[Any]) -> tuple[tuple[Any], str | None]:
    return (log.data,), log.name


def _unflatten(name: str | None, children: Any) -> Log[Any]:
    (data,) = children
    return Log._build(data, name)


jax.tree_util.register_pytree_with_keys(Log, _flatten_with_keys, _unflatten, _flatten)

# A C-level predicate: jax calls `is_leaf` on every node, and a bound builtin is several
# times cheaper to call than a Python lambda.
is_log = Log.__instancecheck__
