"""Finding and replacing the `Log`s of a tree: `list_of_logs` and `map_logs`.

A tree is walked in two layers. Registered pytrees (dicts, lists, tuples, NamedTuples,
dataclasses registered with jax, flax structs, equinox Modules, ...) are flattened by
`jax.tree_util` with `Log` as a leaf, so their order is jax's. A leaf that is a plain
Python object (an instance with a `__dict__` or `__slots__` that jax does not know) is
searched through its attributes, each attribute value being walked the same way. Plain
objects are visited once each, by identity, which makes the walk safe on cycles.

Not searched (see `_opaque`): values (numbers, strings, arrays, enums), classes, modules,
functions and methods, files and other I/O objects, loggers and their handlers, and
writers, meaning any object whose class has a callable `write`, `flush` or
`add_scalar` (TensorBoard and CSV writers, W&B runs, streams).
"""

from __future__ import annotations

import copy
import enum
import functools
import io
import itertools
import logging
import types
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import numpy as np

from jaxmodules.logstate._log import Log, check_data, is_log

Tree = TypeVar("Tree")
KeyPath = tuple[Any, ...]

# How a leaf of a flattened tree is handled.
_OTHER, _LOG, _OBJECT = 0, 1, 2

# Leaves that have a __dict__ or slots but are values, not containers of Logs.
_OPAQUE_TYPES: tuple[type, ...] = (
    int,
    float,
    complex,
    str,
    bytes,
    bytearray,
    np.ndarray,
    np.generic,
    np.dtype,
    jax.Array,
    jax.core.Tracer,
    jax.ShapeDtypeStruct,
    type,
    enum.Enum,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    functools.partial,
    io.IOBase,
    logging.Logger,
    logging.LoggerAdapter,
    logging.Handler,
)
# Methods that mark a writer or a stream: such objects are sinks, not state.
_WRITER_METHODS = ("write", "flush", "add_scalar")

# The per-type caches are bounded: programs that make classes on the fly stay small.
_CACHE_SIZE = 1024


def _opaque(cls: type) -> bool:
    """Whether instances of `cls` are values or sinks whose attributes are not searched."""
    return issubclass(cls, _OPAQUE_TYPES) or any(
        callable(getattr(cls, method, None)) for method in _WRITER_METHODS
    )


def _kind_of(cls: type) -> int:
    if cls is Log:
        return _LOG
    if not _opaque(cls) and (cls.__dictoffset__ != 0 or _slots(cls)):
        return _OBJECT
    return _OTHER


def _positions_to_visit(leaves: list[Any]) -> list[int]:
    """Indices of the leaves that are Logs or plain objects, in order.

    States have thousands of array leaves and few Logs; the scan is done with builtins
    (no Python-level loop over the leaves) to stay close to the cost of flattening.
    """
    leaf_types = list(map(type, leaves))
    wanted = {cls for cls in set(leaf_types) if _kind(cls) != _OTHER}
    if not wanted:
        return []
    return list(itertools.compress(range(len(leaves)), map(wanted.__contains__, leaf_types)))


def _key_paths(tree: Any, treedef: Any, positions: list[int]) -> list[KeyPath]:
    """The key paths of the leaves at `positions` (sorted) of `tree` flattened to `treedef`.

    Same paths as `jax.tree_util.tree_flatten_with_path`, but only the subtrees that hold
    a wanted leaf are opened: building a key for each of thousands of parameter arrays
    costs several times the flattening itself.
    """
    found: list[KeyPath] = []

    def descend(node: Any, node_def: Any, wanted: list[int], path: KeyPath) -> None:
        if node_def.num_nodes == 1 and node_def.num_leaves == 1:
            found.append(path)
            return
        # One level of keyed children; `is_leaf` stops the flattening below the node.
        keyed, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
        offset, next_wanted = 0, 0
        for (key_path, child), child_def in zip(keyed, node_def.children(), strict=True):
            end = offset + child_def.num_leaves
            inside = []
            while next_wanted < len(wanted) and wanted[next_wanted] < end:
                inside.append(wanted[next_wanted] - offset)
                next_wanted += 1
            if inside:
                descend(child, child_def, inside, path + tuple(key_path))
            if next_wanted == len(wanted):
                return
            offset = end

    descend(tree, treedef, positions, ())
    return found


def _slots_of(cls: type) -> tuple[tuple[str, Any], ...]:
    """(attribute name, slot descriptor) for every slot a class and its bases declare."""
    pairs = []
    for klass in reversed(cls.__mro__):
        declared = klass.__dict__.get("__slots__", ())
        for slot in (declared,) if isinstance(declared, str) else declared:
            if slot in ("__dict__", "__weakref__"):
                continue
            # Private slot names are stored mangled, like any private attribute.
            if slot.startswith("__") and not slot.endswith("__"):
                slot = f"_{klass.__name__.lstrip('_')}{slot}"
            descriptor = klass.__dict__.get(slot)
            if descriptor is not None and hasattr(descriptor, "__set__"):
                pairs.append((slot, descriptor))
    return tuple(pairs)


# Both are asked once per type met, not per leaf; the caches are bounded (LRU).
_kind: Callable[[type], int] = functools.lru_cache(maxsize=_CACHE_SIZE)(_kind_of)
_slots: Callable[[type], tuple[tuple[str, Any], ...]] = functools.lru_cache(maxsize=_CACHE_SIZE)(
    _slots_of
)


def _attributes(obj: Any) -> Iterator[tuple[str, Any]]:
    """An object's own attributes: its `__dict__` in insertion order, then its slots."""
    instance_dict = getattr(obj, "__dict__", None)
    if isinstance(instance_dict, dict):
        # A snapshot, so that the walk never sees the dict change under it.
        yield from list(instance_dict.items())
    for name, descriptor in _slots(type(obj)):
        try:
            value = descriptor.__get__(obj, type(obj))
        except AttributeError:  # an unset slot
            continue
        yield name, value


def _set_attribute(obj: Any, name: str, value: Any) -> None:
    instance_dict = getattr(obj, "__dict__", None)
    if isinstance(instance_dict, dict) and name in instance_dict:
        # Write straight into the dict: the copy of a frozen dataclass or of a class with
        # its own __setattr__ must take the new value like its original held the old one.
        instance_dict[name] = value
        return
    for slot, descriptor in _slots(type(obj)):
        if slot == name:
            descriptor.__set__(obj, value)
            return
    # A custom __copy__ may build the copy without this attribute; add it the plain way.
    object.__setattr__(obj, name, value)


class _Walk:
    """One pass over a tree that records its Logs in traversal order.

    With `with_paths`, each Log comes with its key path (jax keys; attributes of plain
    objects appear as `GetAttrKey`). With `with_graph`, the walk also records which plain
    objects hold Logs and which plain objects each one reaches, for `map_logs` to copy
    exactly the objects on a way to a Log.
    """

    def __init__(self, *, with_paths: bool, with_graph: bool) -> None:
        self.with_paths = with_paths
        self.with_graph = with_graph
        self.logs: list[Log[Any]] = []
        self.paths: list[KeyPath] = []
        self.visited: dict[int, Any] = {}  # id -> object; holding it keeps the id unique
        self.holds_log: set[int] = set()
        self.reaches: dict[int, list[int]] = {}
        # The flattened root (leaves, treedef, positions to visit), reused by _Rebuild.
        self.top: tuple[list[Any], Any, list[int]] | None = None

    def walk(self, tree: Any, prefix: KeyPath = (), owner: int | None = None) -> None:
        if self.with_paths:
            leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_log)
            positions = _positions_to_visit(leaves)
            paths = _key_paths(tree, treedef, positions) if positions else []
            for i, path in zip(positions, paths, strict=True):
                self._visit(leaves[i], prefix + path, owner)
        else:
            if self.with_graph and owner is None and self.top is None:
                leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_log)
                positions = _positions_to_visit(leaves)
                self.top = (leaves, treedef, positions)
            else:  # no treedef needed: the cheaper call
                leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_log)
                positions = _positions_to_visit(leaves)
            for i in positions:
                self._visit(leaves[i], (), owner)

    def _visit(self, leaf: Any, path: KeyPath, owner: int | None) -> None:
        if type(leaf) is Log:
            self._found(leaf, path, owner)
        else:
            self._object(leaf, path, owner)

    def _found(self, log: Log[Any], path: KeyPath, owner: int | None) -> None:
        self.logs.append(log)
        if self.with_paths:
            self.paths.append(path)
        if owner is not None and self.with_graph:
            self.holds_log.add(owner)

    def _object(self, obj: Any, path: KeyPath, owner: int | None) -> None:
        key = id(obj)
        if owner is not None and self.with_graph:
            self.reaches.setdefault(owner, []).append(key)
        if key in self.visited:
            return
        self.visited[key] = obj
        for name, value in _attributes(obj):
            self.walk(value, (*path, jax.tree_util.GetAttrKey(name)), key)

    def objects_leading_to_logs(self) -> set[int]:
        """Ids of the plain objects from which some Log can be reached."""
        reached_from: dict[int, list[int]] = {}
        for parent, children in self.reaches.items():
            for child in children:
                reached_from.setdefault(child, []).append(parent)
        marked = set(self.holds_log)
        pending = list(marked)
        while pending:
            for parent in reached_from.get(pending.pop(), ()):
                if parent not in marked:
                    marked.add(parent)
                    pending.append(parent)
        return marked


def find_logs(tree: Any, *, with_paths: bool) -> tuple[list[Log[Any]], list[KeyPath]]:
    """Every Log of `tree` in traversal order (and, if asked, their key paths)."""
    walk = _Walk(with_paths=with_paths, with_graph=False)
    walk.walk(tree)
    return walk.logs, walk.paths


class _Rebuild:
    """Rebuilds a tree with each Log's data replaced and the plain objects on the way copied.

    Objects are copied once each (a memo by identity), so a copy of a cycle is a cycle
    among the copies, and an object shared by two parents stays shared.
    """

    def __init__(self, fn: Callable[[Any], Any], to_copy: set[int]) -> None:
        self.fn = fn
        self.to_copy = to_copy
        self.copies: dict[int, Any] = {}

    def tree(self, tree: Any, flat: tuple[list[Any], Any, list[int]] | None = None) -> Any:
        if flat is None:
            leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_log)
            positions = _positions_to_visit(leaves)
        else:
            leaves, treedef, positions = list(flat[0]), flat[1], flat[2]
        changed = False
        for i in positions:
            leaf = leaves[i]
            if type(leaf) is Log:
                leaves[i] = Log._build(self.fn(leaf.data), leaf.name)
                changed = True
            elif id(leaf) in self.to_copy:
                leaves[i] = self.object(leaf)
                changed = True
        return jax.tree_util.tree_unflatten(treedef, leaves) if changed else tree

    def object(self, obj: Any) -> Any:
        key = id(obj)
        if key in self.copies:
            return self.copies[key]
        new = copy.copy(obj)
        if new is obj:
            raise TypeError(
                f"map_logs: copy.copy returned the same {type(obj).__name__} object, so its "
                "Log attributes cannot be replaced without mutating it; give the class a "
                "__copy__ that returns a new instance, or register it as a pytree"
            )
        self.copies[key] = new
        for name, value in _attributes(obj):
            new_value = self.tree(value)
            if new_value is not value:
                _set_attribute(new, name, new_value)
        return new


def list_of_logs(tree: Any) -> list[Any]:
    """The unwrapped values of every `Log` in a tree, in pytree order.

    Registered pytrees are walked in jax's order (dict keys sorted, sequences by index,
    dataclass and NamedTuple fields in declaration order). A leaf that is a plain Python
    object, such as an instance of an ordinary class holding the training state, is
    searched through its attributes in assignment order (its `__dict__`, then any
    `__slots__`); each plain object is visited once, so cycles are fine.

    Cleared logs are listed too: a `Log(None)` contributes `None`, so the list always has
    one entry per `Log` and lines up with the calls `map_logs` makes.

    Args:
        tree: any pytree or plain object, possibly holding `Log`s at any depth.

    Returns:
        The `data` of each `Log`, in traversal order.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxmodules.logstate import Log, list_of_logs
        >>> state = {"b": Log(2.0), "a": [Log(1.0), jnp.zeros(3)], "c": Log(None)}
        >>> list_of_logs(state)
        [1.0, 2.0, None]
    """
    logs, _ = find_logs(tree, with_paths=False)
    return [log.data for log in logs]


def map_logs(fn: Callable[[Any], Any], tree: Tree) -> Tree:
    """The same tree with every `Log(x)` replaced by `Log(fn(x))`; the input is not mutated.

    `fn` is called once per `Log`, in the order of `list_of_logs`, and names are kept.
    Registered pytrees are rebuilt with `jax.tree_util`. A plain Python object that leads
    to a `Log` is shallow-copied (`copy.copy`) and the copy gets the new attribute values;
    plain objects without `Log`s inside are kept as they are, and a tree without any
    `Log` is returned unchanged. `map_logs(lambda x: None, tree)` clears every log (see
    also `clear_logs` and `reset_logs`).

    Args:
        fn: called with each Log's data; its result becomes the new data.
        tree: any pytree or plain object, possibly holding `Log`s at any depth.

    Returns:
        A tree of the same structure with the Logs' data replaced.

    Raises:
        TypeError: if `fn` is not callable, or returns something a `Log` cannot hold
            (see `Log`).

    Examples:
        >>> from jaxmodules.logstate import Log, map_logs
        >>> state = {"loss": Log(0.25), "lr": 1e-3}
        >>> map_logs(lambda x: 2 * x, state)
        {'loss': Log(0.5), 'lr': 0.001}
        >>> state["loss"]
        Log(0.25)
    """
    if not callable(fn):
        hint = " (the arguments are map_logs(fn, tree))" if callable(tree) else ""
        raise TypeError(f"map_logs: fn must be callable, got {type(fn).__name__}{hint}")

    def checked(data: Any) -> Any:
        new = fn(data)
        check_data(new, "map_logs: the value fn returned")
        return new

    return map_all_logs(checked, tree, batched=False)


def map_all_logs(fn: Callable[[Any], Any], tree: Tree, *, batched: bool) -> Tree:
    """`map_logs`; with `batched`, `fn` takes the list of all Log data and returns a list.

    The rebuild replaces Logs in exactly the order (and number) the walk found them.
    """
    walk = _Walk(with_paths=False, with_graph=True)
    walk.walk(tree)
    if not walk.logs:
        return tree
    if batched:
        new_data = iter(fn([log.data for log in walk.logs]))

        def fn(_: Any) -> Any:
            return next(new_data)

    result: Tree = _Rebuild(fn, walk.objects_leading_to_logs()).tree(tree, walk.top)
    return result
