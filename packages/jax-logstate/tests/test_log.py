"""The Log node itself: pytree behaviour, name, repr, equality, immutability."""

import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.logstate import Log


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_log_has_one_child_and_its_name_in_the_aux_data(rng):
    x = rng.normal(size=(3, 2)).astype(np.float32)
    leaves, treedef = jax.tree_util.tree_flatten(Log(x, name="w"))
    assert len(leaves) == 1 and leaves[0] is x
    assert treedef.num_nodes == 2  # the Log node and its leaf
    rebuilt = jax.tree_util.tree_unflatten(treedef, [x + 1])
    assert isinstance(rebuilt, Log) and rebuilt.name == "w"
    np.testing.assert_array_equal(rebuilt.data, x + 1)


def test_names_are_part_of_the_structure():
    unnamed = jax.tree_util.tree_structure(Log(1.0))
    named = jax.tree_util.tree_structure(Log(1.0, name="a"))
    assert unnamed != named
    assert named == jax.tree_util.tree_structure(Log(2.0, name="a"))


def test_cleared_log_has_no_leaves():
    assert jax.tree_util.tree_leaves({"a": Log(None), "b": 3}) == [3]


def test_path_functions_see_the_data_child(rng):
    x = rng.normal(size=4)
    tree = {"metrics": [Log(x), 2.0]}
    (path_x, leaf_x), (path_2, _) = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert leaf_x is x
    assert jax.tree_util.keystr(path_x) == "['metrics'][0].data"
    assert jax.tree_util.keystr(path_2) == "['metrics'][1]"
    doubled = jax.tree_util.tree_map_with_path(
        lambda path, v: v * 2 if path[-1] == jax.tree_util.GetAttrKey("data") else v, tree
    )
    np.testing.assert_array_equal(doubled["metrics"][0].data, 2 * x)
    assert doubled["metrics"][1] == 2.0


def test_repr_shows_data_and_name():
    assert repr(Log(0.5)) == "Log(0.5)"
    assert repr(Log(None, name="loss")) == "Log(None, name='loss')"
    arr = jnp.arange(3)
    assert repr(Log(arr)) == f"Log({arr!r})"


def test_repr_of_a_traced_log_is_short():
    seen = []

    @jax.jit
    def f(x):
        seen.append(repr(Log(x, name="t")))
        return x

    f(jnp.zeros((2, 5), jnp.float32))
    assert seen == ["Log(<traced float32[2,5]>, name='t')"]


def test_equality_compares_names_and_values(rng):
    x = rng.normal(size=(2, 3))
    assert Log(x) == Log(x.copy())
    assert Log(x, name="a") != Log(x.copy(), name="b")
    assert Log(x) != Log(x + 1)
    assert Log(x) != Log(x[:1])
    assert Log({"a": x}) != Log([x])
    assert Log(jnp.asarray(x, jnp.float32)) == Log(np.asarray(x, np.float32))
    assert Log(None) == Log(None)
    assert Log(1.0) != 1.0


def test_equality_of_traced_logs_is_refused():
    @jax.jit
    def f(x):
        return Log(x) == Log(x + 1)

    with pytest.raises(TypeError, match="traced"):
        f(jnp.ones(2))


def test_log_is_immutable_and_unhashable():
    log = Log(1.0)
    with pytest.raises(AttributeError, match="immutable"):
        log.data = 2.0  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        del log.name
    with pytest.raises(TypeError):
        hash(log)


def test_copy_deepcopy_and_pickle_round_trip(rng):
    x = rng.normal(size=3)
    log = Log(x, name="n")
    shallow = copy.copy(log)
    assert shallow.data is x and shallow.name == "n"
    deep = copy.deepcopy(log)
    assert deep.data is not x and deep == log
    assert pickle.loads(pickle.dumps(log)) == log


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [(3, TypeError, "name must be a str or None, got int"), ("", ValueError, "non-empty")],
)
def test_bad_names_are_rejected(name, error, match):
    with pytest.raises(error, match=match):
        Log(1.0, name=name)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ("warmup", "got a 'str' value$"),
        (b"raw", "got a 'bytes' value$"),
        (object(), "got a 'object' value$"),
        (print, "got a 'builtin_function_or_method' value$"),
        ({"loss": 1.0, "note": "text"}, r"got a 'str' value at data\['note'\]$"),
        ([jnp.ones(2), (1, object())], r"got a 'object' value at data\[1\]\[1\]$"),
        ({"inner": Log(1.0)}, r"got another Log at data\['inner'\]$"),
    ],
)
def test_data_that_is_not_arrays_and_numbers_is_a_type_error(data, match):
    with pytest.raises(
        TypeError, match=r"^Log: data must be arrays, numbers or a pytree of them; got "
    ):
        Log(data)
    with pytest.raises(TypeError, match=match):
        Log(data, name="x")


def test_a_log_of_a_log_is_refused():
    with pytest.raises(TypeError, match=r"^Log: data is already a Log; .*Log\(x.data"):
        Log(Log(1.0))


@pytest.mark.parametrize(
    "data",
    [None, 1, 2.5, True, 1 + 2j, np.float32(1), np.ones(2), jnp.ones(2), {"a": [1, None]}, ()],
)
def test_arrays_numbers_and_pytrees_of_them_are_accepted(data):
    assert Log(data).data is data


def test_traced_values_are_accepted():
    out = jax.jit(lambda x: Log({"x": x, "y": [x * 2]}))(jnp.ones(2))
    np.testing.assert_array_equal(out.data["y"][0], np.full(2, 2.0))


def test_subclassing_is_refused():
    with pytest.raises(TypeError, match="cannot be subclassed"):

        class Special(Log):  # type: ignore[misc]
            pass
