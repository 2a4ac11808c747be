"""list_of_logs, named_logs and map_logs on random trees, against a reference built alongside.

Each random tree mixes every container the package promises to handle: dicts, lists,
tuples, NamedTuples, dataclasses registered with jax, equinox Modules, plain objects with
a __dict__ and plain objects with __slots__. The builder records, independently of the
library and of jax's path machinery, the order in which Logs must come out and the name
each one must get.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmodules.logstate import Log, list_of_logs, map_logs, named_logs, reset_logs


class Pair(NamedTuple):
    first: Any
    second: Any


@functools.partial(jax.tree_util.register_dataclass, data_fields=["left", "right"], meta_fields=[])
@dataclasses.dataclass
class Node:
    left: Any
    right: Any


class Module(eqx.Module):
    p: Any
    q: Any


class Plain:
    """An ordinary class: not a pytree, searched through its attributes."""


class Slotted:
    __slots__ = ("s", "t")


FIELDS = {"pair": ("first", "second"), "node": ("left", "right"), "module": ("p", "q")}
FIELDS["slots"] = ("s", "t")

KEYS = st.sampled_from(["a", "b", "c", "d"])
LEAVES = st.sampled_from(["array", "scalar", "none", "log", "named", "cleared"])
TREES = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.tuples(st.just("dict"), st.dictionaries(KEYS, children, max_size=3)),
        st.tuples(st.just("list"), st.lists(children, max_size=3)),
        st.tuples(st.just("tuple"), st.lists(children, max_size=3)),
        st.tuples(st.sampled_from(["pair", "node", "module", "slots"]), children, children),
        st.tuples(st.just("plain"), st.dictionaries(KEYS, children, max_size=3)),
    ),
    max_leaves=14,
)


class Builder:
    """Turns a spec into a tree and the list of (name, Log) it must yield, in order."""

    def __init__(self, seed: int, transform=None, on_device=False):
        self.rng = np.random.default_rng(seed)
        self.transform = transform or (lambda x: x)
        self.on_device = on_device
        self.names = itertools.count()
        self.expected: list[tuple[str, Log]] = []

    def value(self):
        value = self.rng.normal(size=self.rng.integers(1, 4, size=self.rng.integers(0, 3)))
        return jnp.asarray(value, jnp.float32) if self.on_device else value

    def build(self, spec, path=()):
        if isinstance(spec, str):
            return self.leaf(spec, path)
        kind = spec[0]
        if kind == "dict":
            built = {k: self.build(v, (*path, k)) for k, v in sorted(spec[1].items())}
            # Insertion order differs from jax's sorted order on purpose.
            return dict(reversed(list(built.items())))
        if kind in ("list", "tuple"):
            items = [self.build(v, (*path, str(i))) for i, v in enumerate(spec[1])]
            return items if kind == "list" else tuple(items)
        if kind == "plain":
            obj = Plain()
            for k, v in spec[1].items():  # attribute order = assignment order
                setattr(obj, k, self.build(v, (*path, k)))
            return obj
        first, second = FIELDS[kind]
        a = self.build(spec[1], (*path, first))
        b = self.build(spec[2], (*path, second))
        if kind == "slots":
            obj = Slotted()
            obj.s, obj.t = a, b
            return obj
        return {"pair": Pair, "node": Node, "module": Module}[kind](a, b)

    def leaf(self, kind, path):
        if kind == "array":
            return self.value()
        if kind == "scalar":
            return float(self.rng.normal())
        if kind == "none":
            return None
        if kind == "cleared":
            log = Log(self.transform(None))
            name = ".".join(path) or "log"
        else:
            explicit = f"given{next(self.names)}" if kind == "named" else None
            log = Log(self.transform(self.value()), name=explicit)
            name = explicit or ".".join(path) or "log"
        self.expected.append((name, log))
        return log


def describe(x):
    """A comparable description of a tree, for structural equality in the tests."""
    if isinstance(x, Log):
        return ("Log", x.name, describe(x.data))
    if isinstance(x, np.ndarray):
        return ("array", x.shape, x.tobytes())
    if isinstance(x, jax.Array):
        return ("jax", x.dtype.name, describe(np.asarray(x)))
    if isinstance(x, dict):
        return ("dict", tuple(sorted((k, describe(v)) for k, v in x.items())))
    if isinstance(x, (Pair, Node, Module)):
        return (type(x).__name__, *(describe(getattr(x, f)) for f in x.__dataclass_fields__))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(describe(v) for v in x))
    if isinstance(x, Plain):
        return ("Plain", tuple((k, describe(v)) for k, v in vars(x).items()))
    if isinstance(x, Slotted):
        return ("Slotted", describe(x.s), describe(x.t))
    return ("value", x)


Pair.__dataclass_fields__ = dict.fromkeys(Pair._fields)  # lets describe() treat them alike

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@SETTINGS
@given(spec=TREES, seed=st.integers(0, 2**16))
def test_list_of_logs_follows_pytree_and_attribute_order(spec, seed):
    builder = Builder(seed)
    tree = builder.build(spec)
    found = list_of_logs(tree)
    assert len(found) == len(builder.expected)
    assert all(got is log.data for got, (_, log) in zip(found, builder.expected, strict=True))


@SETTINGS
@given(spec=TREES, seed=st.integers(0, 2**16))
def test_named_logs_gives_each_live_log_its_path(spec, seed):
    builder = Builder(seed)
    tree = builder.build(spec)
    expected = [(name, log.data) for name, log in builder.expected if log.data is not None]
    got = list(named_logs(tree).items())
    assert [name for name, _ in got] == [name for name, _ in expected]
    assert all(a is b for (_, a), (_, b) in zip(got, expected, strict=True))
    slashed = named_logs(tree, sep="/")
    explicit = {log.name for _, log in builder.expected}
    assert list(slashed) == [n if n in explicit else n.replace(".", "/") for n, _ in expected]


def tag(x):
    return None if x is None else x * 3 + 1


@SETTINGS
@given(spec=TREES, seed=st.integers(0, 2**16))
def test_map_logs_rebuilds_the_same_structure_and_mutates_nothing(spec, seed):
    builder = Builder(seed)
    tree = builder.build(spec)
    before = describe(copy.deepcopy(tree))
    logs_before = list(list_of_logs(tree))
    calls = []

    def fn(x):
        calls.append(x)
        return tag(x)

    result = map_logs(fn, tree)
    # fn saw every Log once, in list_of_logs order.
    assert len(calls) == len(logs_before)
    assert all(a is b for a, b in zip(calls, logs_before, strict=True))
    # The result is the tree built from the same spec with transformed Log data.
    reference = Builder(seed, transform=tag).build(spec)
    assert describe(result) == describe(reference)
    # The input is untouched, down to the identity of the data in its Logs.
    assert describe(tree) == before
    assert all(a is b for a, b in zip(list_of_logs(tree), logs_before, strict=True))
    if not logs_before:
        assert result is tree


def zeros(x):
    if x is None:
        return None
    return jnp.zeros_like(x) if isinstance(x, jax.Array) else np.zeros_like(x)


@SETTINGS
@given(spec=TREES, seed=st.integers(0, 2**16), on_device=st.booleans())
def test_reset_logs_zeroes_every_log_in_place(spec, seed, on_device):
    tree = Builder(seed, on_device=on_device).build(spec)
    before = describe(tree)
    reference = Builder(seed, transform=zeros, on_device=on_device).build(spec)
    assert describe(reset_logs(tree)) == describe(reference)
    assert describe(tree) == before
