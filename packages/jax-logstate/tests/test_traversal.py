"""list_of_logs / map_logs on plain Python objects: attributes, cycles, sharing, copies."""

import dataclasses
import io
import logging
import types

import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.logstate import Log, list_of_logs, map_logs


@pytest.fixture
def rng():
    return np.random.default_rng(1)


class State:
    def __init__(self, **attributes):
        for name, value in attributes.items():
            setattr(self, name, value)


def test_plain_object_attributes_and_the_pytrees_they_hold_are_searched(rng):
    a, b, c = (rng.normal(size=2) for _ in range(3))
    state = State(params={"w": Log(a), "b": [1.0, Log(b)]}, step=3, norm=Log(c))
    assert [x is y for x, y in zip(list_of_logs(state), [b, a, c], strict=True)] == [True] * 3


def test_a_plain_object_inside_a_pytree_is_searched(rng):
    a, b = rng.normal(size=2), rng.normal(size=3)
    tree = {"z": Log(a), "inner": [State(hidden=Log(b), other=2)]}
    found = list_of_logs(tree)
    assert found[0] is b and found[1] is a  # "inner" sorts before "z"


def test_cycles_are_followed_once_and_copied_as_cycles(rng):
    x, y = rng.normal(size=2), rng.normal(size=2)
    first, second = State(log=Log(x)), State(log=Log(y))
    first.partner, second.partner = second, first
    first.me = first
    found = list_of_logs(first)
    assert len(found) == 2 and found[0] is x and found[1] is y

    new = map_logs(lambda v: v + 10, first)
    assert new is not first and new.partner is not second
    assert new.partner.partner is new and new.me is new  # the copies form the same cycle
    np.testing.assert_array_equal(new.log.data, x + 10)
    np.testing.assert_array_equal(new.partner.log.data, y + 10)
    assert first.log.data is x and second.log.data is y and first.partner is second


def test_a_shared_object_is_visited_once_and_stays_shared_in_the_copy(rng):
    x = rng.normal(size=2)
    shared = State(log=Log(x))
    tree = {"a": shared, "b": shared}
    assert len(list_of_logs(tree)) == 1
    calls = []
    new = map_logs(lambda v: calls.append(v) or v * 2, tree)
    assert len(calls) == 1
    assert new["a"] is new["b"] and new["a"] is not shared
    np.testing.assert_array_equal(new["b"].log.data, 2 * x)


def test_objects_without_logs_are_kept_as_they_are(rng):
    untouched = State(table=np.arange(4), lock=object())
    tree = State(config=untouched, norm=Log(rng.normal()))
    new = map_logs(lambda v: -v, tree)
    assert new is not tree and new.config is untouched
    assert map_logs(lambda v: -v, untouched) is untouched
    no_logs = {"a": [1, 2], "b": untouched}
    assert map_logs(lambda v: -v, no_logs) is no_logs


def test_frozen_dataclasses_and_strict_setattr_classes_are_copied_not_mutated(rng):
    @dataclasses.dataclass(frozen=True)
    class Frozen:
        norm: Log
        width: int

    class Guarded:
        def __init__(self, norm):
            object.__setattr__(self, "norm", norm)

        def __setattr__(self, name, value):
            raise AttributeError("read-only")

    x = rng.normal(size=3)
    for original in (Frozen(Log(x), 4), Guarded(Log(x))):
        new = map_logs(lambda v: v * 5, original)
        assert type(new) is type(original) and new is not original
        np.testing.assert_array_equal(new.norm.data, 5 * x)
        assert original.norm.data is x


def test_slots_including_private_and_mixed_with_a_dict_are_searched(rng):
    class Base:
        __slots__ = ("__hidden",)

    class Mixed(Base):
        __slots__ = ("__dict__", "unset", "visible")

    x, y, z = rng.normal(size=3)
    obj = Mixed()
    obj._Base__hidden = Log(x)
    obj.visible = Log(y)
    obj.extra = Log(z)  # lives in the instance __dict__
    assert list_of_logs(obj) == [z, x, y]  # __dict__ first, then slots from the base up
    new = map_logs(lambda v: v + 1, obj)
    assert [new.extra.data, new._Base__hidden.data, new.visible.data] == [z + 1, x + 1, y + 1]
    assert not hasattr(new, "unset")
    assert obj.visible.data == y


def test_class_attributes_functions_and_modules_are_not_searched():
    class Config:
        default = Log(1.0)  # a class attribute: shared by all instances, not state

    def helper():
        return Config.default

    tree = {"cls": Config, "fn": helper, "module": np, "instance": Config()}
    assert list_of_logs(tree) == []


def test_modules_classes_functions_files_loggers_and_writers_are_not_descended(tmp_path):
    # Each holds a Log as an attribute, so descending into any of them would find it.
    hidden = Log(1.0)
    module = types.ModuleType("fake_module")
    module.hidden = hidden

    class Holder:
        hidden = Log(2.0)

    def function():
        return None

    function.hidden = hidden  # type: ignore[attr-defined]

    class File(io.StringIO):
        pass

    stream = File()
    stream.hidden = hidden  # type: ignore[attr-defined]
    logger = logging.getLogger("jaxmodules.tests.hidden")
    logger.hidden = hidden  # type: ignore[attr-defined]
    handler = logging.StreamHandler(stream)
    handler.hidden = hidden  # type: ignore[attr-defined]

    class Writer:  # duck-typed writers: add_scalar, write or flush
        def __init__(self):
            self.hidden = hidden

        def add_scalar(self, tag, value, step):
            pass

    class CsvSink:
        def __init__(self):
            self.hidden = hidden

        def write(self, row):
            pass

    with open(tmp_path / "log.txt", "w") as real_file:
        sinks = [module, Holder, function, stream, logger, handler, Writer(), CsvSink()]
        tree = {"sinks": sinks, "file": real_file, "method": Writer().add_scalar}
        assert list_of_logs(tree) == []
        assert map_logs(lambda v: v, tree) is tree

    class State:  # the same attribute in a plain object is found
        def __init__(self):
            self.hidden = hidden

    assert list_of_logs({"state": State(), "sinks": sinks}) == [1.0]


def test_the_per_type_caches_are_bounded():
    from jaxmodules.logstate import _traverse

    def make_state(i):
        cls = type(f"State{i}", (), {"__slots__": ("log",)})
        state = cls()
        state.log = Log(float(i))
        return state

    states = [make_state(i) for i in range(3000)]
    assert list_of_logs(states) == [float(i) for i in range(3000)]
    assert _traverse._kind.cache_info().currsize <= _traverse._CACHE_SIZE
    assert _traverse._slots.cache_info().currsize <= _traverse._CACHE_SIZE


def test_map_logs_refuses_a_result_a_log_cannot_hold():
    state = {"a": Log(1.0)}
    with pytest.raises(TypeError, match="map_logs: the value fn returned: data must be"):
        map_logs(str, state)
    assert state["a"].data == 1.0


def test_arrays_and_numbers_are_leaves_not_objects():
    tree = [jnp.ones(2), np.float32(1), 3, 2.5, "text", b"raw", np.dtype("float32")]
    assert list_of_logs(tree) == []
    assert map_logs(lambda v: v, tree) is tree


def test_fn_errors_propagate_and_leave_the_input_alone(rng):
    x = rng.normal(size=2)
    state = State(log=Log(x))

    def boom(value):
        raise RuntimeError("from fn")

    with pytest.raises(RuntimeError, match="from fn"):
        map_logs(boom, state)
    assert state.log.data is x


def test_non_callable_fn_is_a_type_error():
    with pytest.raises(TypeError, match="fn must be callable, got int"):
        map_logs(3, {"a": Log(1.0)})
    with pytest.raises(TypeError, match=r"map_logs\(fn, tree\)"):
        map_logs({"a": Log(1.0)}, lambda x: x)


def test_an_object_whose_copy_is_itself_is_refused():
    class Singleton:
        def __init__(self):
            self.log = Log(1.0)

        def __copy__(self):
            return self

    with pytest.raises(TypeError, match=r"copy\.copy returned the same Singleton"):
        map_logs(lambda v: v, Singleton())
