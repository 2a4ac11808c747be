"""`collect`'s arguments: stand-ins for tracing, and in-place updates carried back.

`collect` traces its function on stand-ins for the caller's arrays, so whatever the
function changes in place lands on objects made for the trace. This module makes those
objects and, after the call, carries every change it can back to the caller's objects,
as flax.nnx's own transformations do:

- flax.nnx objects (modules, optimizers, `nnx.Rngs`, variables) found among the
  arguments go through flax's graph API: `nnx.split` the caller's objects together (so
  variables shared between them stay shared), `nnx.merge` copies of them holding the
  traced values, let the function update the copies, `nnx.split` them again, and pass
  the variables' new values out of the trace. After the program has run on the caller's
  values, `nnx.update` writes them into the caller's own objects. flax is never imported
  here: an nnx object can only be among the arguments if its caller imported flax.
- Everything else is flattened with `jax.tree_util`, arrays traced, and rebuilt; an
  update of a rebuilt container (a dict entry replaced, a list appended to) would be
  lost, so it is an error. So is a traced value stored on an object that is not a pytree
  (a plain class instance among the arguments, or reached through one): the trace's
  value would leak out of it.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

Tracer = jax.core.Tracer


def is_dynamic(x: Any) -> bool:
    """What collect traces: arrays and tracers (Python numbers are constants of the trace)."""
    return isinstance(x, jax.Array | np.ndarray | np.generic | Tracer)


def _nnx() -> Any:
    """flax.nnx when its caller has imported it, else None."""
    return sys.modules.get("flax.nnx")


def fn_name(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or fn)


def _node_test(nnx: Any) -> Callable[[Any], bool]:
    """Whether a value is an nnx object (graph node or variable), for `nnx` = flax.nnx."""
    variable, is_graph_node = nnx.Variable, nnx.graph.is_graph_node

    def is_node(x: Any) -> bool:
        return isinstance(x, variable) or bool(is_graph_node(x))

    return is_node


def _never(x: Any) -> bool:
    return False


class Arguments:
    """The caller's arguments of one call: flattened, traced, rebuilt, updated back."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.who = f"collect({fn_name(fn)})"
        nnx = self.nnx = _nnx()
        is_node = _node_test(nnx) if nnx is not None else None
        self.leaves, self.tree = jax.tree_util.tree_flatten((args, kwargs), is_leaf=is_node)
        self.is_node: Callable[[Any], bool] = is_node or _never
        self.node_at = [i for i, x in enumerate(self.leaves) if self.is_node(x)]
        self.state_leaves: list[Any] = []
        if self.node_at:
            nodes = tuple(self.leaves[i] for i in self.node_at)
            self.graphdef, state = nnx.split(nodes)
            self.state_leaves, self.state_tree = jax.tree_util.tree_flatten(state)
        self.dynamic = [i for i, x in enumerate(self.leaves) if is_dynamic(x)]
        self.state_dynamic = [i for i, x in enumerate(self.state_leaves) if is_dynamic(x)]
        # Plain objects (not pytrees, not nnx): the function gets the caller's own, and a
        # traced value stored on one would leak. The tracers they hold before the call.
        self.plain: list[tuple[str, Any]] = []
        if any(_is_plain(x) and not self.is_node(x) for x in self.leaves):
            paths = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=is_node)[0]
            self.plain = [
                (_where(path), x) for path, x in paths if _is_plain(x) and not self.is_node(x)
            ]
        self.held = _tracers_in(self.plain) if self.plain else {}
        self.changed: list[int] = []  # state leaves the call changed, filled by `after`

    def values(self) -> list[Any]:
        """The values to trace: the arrays among the arguments, then those of nnx state."""
        return [self.leaves[i] for i in self.dynamic] + [
            self.state_leaves[i] for i in self.state_dynamic
        ]

    def rebuild(self, values: Sequence[Any]) -> tuple[Any, Any]:
        """(args, kwargs) for the function, holding `values` (tracers) in place of arrays."""
        full = list(self.leaves)
        for i, value in zip(self.dynamic, values, strict=False):
            full[i] = value
        if self.node_at:
            state = list(self.state_leaves)
            for i, value in zip(self.state_dynamic, values[len(self.dynamic) :], strict=True):
                state[i] = value
            self.traced_state = state
            self.copies = self.nnx.merge(
                self.graphdef, jax.tree_util.tree_unflatten(self.state_tree, state)
            )
            for i, copy in zip(self.node_at, self.copies, strict=True):
                full[i] = copy
        self.full = full
        return jax.tree_util.tree_unflatten(self.tree, full)

    def after(self, call_args: Any, call_kwargs: Any) -> list[Any]:
        """Inside the trace, after the call: check what it changed in place, and return the
        new values of the nnx variables it updated (extra outputs of the traced program)."""
        self._check_rebuilt(call_args, call_kwargs)
        if self.plain:
            self._check_plain()
        if not self.node_at:
            return []
        graphdef, state = self.nnx.split(self.copies)
        if graphdef != self.graphdef:
            raise ValueError(
                f"{self.who}: the call changed the structure of an nnx object among its "
                "arguments (an attribute added, removed, or replaced by another kind of "
                "value), which collect cannot carry back to the caller's object; it carries "
                "back new values of existing nnx.Variables. Create every attribute in "
                "__init__ (an nnx.Variable can start as zeros) and update its value in the call"
            )
        new = jax.tree_util.tree_leaves(state)
        self.changed = [
            i for i, (a, b) in enumerate(zip(self.traced_state, new, strict=True)) if a is not b
        ]
        return [new[i] for i in self.changed]

    def carry_back(self, values: Sequence[Any]) -> None:
        """After the program has run: write the updated values into the caller's objects."""
        if not self.changed:
            return
        state = list(self.state_leaves)
        for i, value in zip(self.changed, values, strict=True):
            state[i] = value
        nodes = tuple(self.leaves[i] for i in self.node_at)
        self.nnx.update(nodes, jax.tree_util.tree_unflatten(self.state_tree, state))

    def _check_rebuilt(self, call_args: Any, call_kwargs: Any) -> None:
        after = jax.tree_util.tree_flatten_with_path((call_args, call_kwargs), is_leaf=self.is_node)
        paths_after, tree_after = after
        if tree_after != self.tree:  # type: ignore[operator]
            raise ValueError(
                f"{self.who}: the call changed the structure of a container among its "
                f"arguments in place (now {_show_args(tree_after)}, passed as "
                f"{_show_args(self.tree)}). collect hands the function copies of its "
                "containers, as jax.jit does, so the change would be lost; return the new "
                "value instead"
            )
        for (path, new), old in zip(paths_after, self.full, strict=True):
            if new is not old:
                raise ValueError(
                    f"{self.who}: the call replaced {_where(path)} of its arguments in "
                    "place. collect hands the function copies of its containers (as jax.jit "
                    "does), so the update would be lost; return the new value instead (or "
                    "keep the state in flax.nnx objects, whose updates collect carries back)"
                )

    def _check_plain(self) -> None:
        now = _tracers_in(self.plain)
        for key, (where, tracer) in now.items():
            if key not in self.held:
                raise ValueError(
                    f"{self.who}: the call stored a traced value in {where}, on an object "
                    f"that is not a pytree ({type(tracer).__name__} of shape "
                    f"{getattr(tracer, 'shape', '?')}). collect traces the function on "
                    "stand-ins for its arrays, so the stored value would be a leaked tracer "
                    "and the update is lost. Return the value from the function instead, or "
                    "make the object a flax.nnx.Module (or nnx.Pytree) holding nnx.Variables, "
                    "whose updates collect carries back"
                )


def _is_plain(x: Any) -> bool:
    """An object whose attributes the function may set: not an array, type or function."""
    if is_dynamic(x) or isinstance(
        x, type | types.ModuleType | types.FunctionType | types.MethodType | functools.partial
    ):
        return False
    return isinstance(getattr(x, "__dict__", None), dict)


def _tracers_in(roots: Sequence[tuple[str, Any]]) -> dict[int, tuple[str, Any]]:
    """Every tracer reachable from `roots` through attributes and pytree containers, by id,
    with where it sits. Cycle-safe; the values are kept alive so ids stay unique."""
    found: dict[int, tuple[str, Any]] = {}
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        where, obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for name, value in list(vars(obj).items()):
            for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
                at = f"{where}.{name}{jax.tree_util.keystr(path)}"
                if isinstance(leaf, Tracer):
                    found.setdefault(id(leaf), (at, leaf))
                elif _is_plain(leaf):
                    stack.append((at, leaf))
    return found


def _where(path: Any) -> str:
    """`args[0]['w']` for a path into (args, kwargs)."""
    if not path:
        return "an argument"
    head, *rest = path
    index = getattr(head, "idx", getattr(head, "key", None))
    base = "args" if index == 0 else "kwargs"
    return f"{base}{jax.tree_util.keystr(tuple(rest))}"


def _show_args(tree: Any) -> str:
    text = str(tree)
    return text if len(text) <= 120 else text[:117] + "..."
