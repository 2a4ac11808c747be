"""named_logs: path names, explicit names, collisions."""

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.logstate import Log, named_logs


class Attention(eqx.Module):
    weight: jax.Array
    entropy: Log


class Layer(eqx.Module):
    attn: Attention
    scale: float


class Model(eqx.Module):
    layers: list


class Stats(NamedTuple):
    mean: Any
    spread: Any


class Bag:
    def __init__(self, *items):
        self.items = items


jax.tree_util.register_pytree_node(Bag, lambda b: (b.items, None), lambda _, c: Bag(*c))


@pytest.fixture
def rng():
    return np.random.default_rng(2)


def test_path_names_through_equinox_modules_lists_and_dicts(rng):
    entropies = rng.normal(size=3)
    model = Model(
        layers=[Layer(Attention(jnp.ones(2), Log(e)), 1.0) for e in entropies],
    )
    state = {"model": model, "stats": Stats(Log(1.5), 2.0), "step": 4}
    names = named_logs(state)
    expected = [f"model.layers.{i}.attn.entropy" for i in range(3)] + ["stats.mean"]
    assert list(names) == expected
    assert [names[n] for n in expected[:3]] == list(entropies)
    assert names["stats.mean"] == 1.5


def test_readme_style_plain_object_names():
    class TrainState:
        def __init__(self):
            self.params = {"dense": {"kernel_norm": Log(2.0)}}
            self.activation_norm = Log(0.5)
            self.gradient_norm = Log(0.1)

    assert named_logs(TrainState()) == {
        "params.dense.kernel_norm": 2.0,
        "activation_norm": 0.5,
        "gradient_norm": 0.1,
    }


def test_non_string_keys_and_keyless_custom_nodes_are_rendered_with_str():
    # jax sorts dict keys, so each dict holds one key type.
    assert named_logs({3: Log(1.0), 10: Log(2.0)}) == {"3": 1.0, "10": 2.0}
    assert named_logs({(1, "x"): [Log(2.0)]}) == {"(1, 'x').0": 2.0}
    # A node registered without keys gets jax's flattened index keys.
    assert named_logs({"bag": Bag(0.0, Log(3.0))}) == {"bag.1": 3.0}


def test_explicit_names_win_and_survive_jit(rng):
    x = rng.normal(size=(4,)).astype(np.float32)

    @jax.jit
    def step(v):
        return {"deep": {"inside": Log(jnp.sum(v**2), name="train/loss")}, "other": Log(v[0])}

    names = named_logs(step(x))
    assert list(names) == ["train/loss", "other"]
    np.testing.assert_allclose(names["train/loss"], np.sum(x.astype(np.float64) ** 2), rtol=1e-6)


def test_a_log_at_the_root_is_called_log_unless_named():
    assert named_logs(Log(1.0)) == {"log": 1.0}
    assert named_logs(Log(1.0, name="x")) == {"x": 1.0}


def test_cleared_logs_are_left_out():
    assert named_logs({"a": Log(None), "b": Log(2.0), "c": Log(None, name="c")}) == {"b": 2.0}


def test_two_explicit_names_colliding_are_reported_with_both_paths():
    tree = {"a": [Log(1.0, name="loss")], "b": {"c": Log(2.0, name="loss")}}
    with pytest.raises(ValueError, match=r"both named 'loss'.*\['a'\]\[0\] \(explicit name\).*"):
        named_logs(tree)
    with pytest.raises(ValueError, match=r"\['b'\]\['c'\] \(explicit name\)"):
        named_logs(tree)


def test_a_dotted_key_colliding_with_a_nested_path_is_reported():
    tree = {"a": {"b": Log(1.0)}, "a.b": Log(2.0)}
    with pytest.raises(ValueError, match=r"both named 'a\.b'.*\['a'\]\['b'\].*\['a\.b'\]"):
        named_logs(tree)
    # A different separator keeps them apart.
    assert named_logs(tree, sep="/") == {"a/b": 1.0, "a.b": 2.0}


def test_an_explicit_name_colliding_with_a_path_is_reported():
    with pytest.raises(ValueError, match="both named 'x'"):
        named_logs({"x": Log(1.0), "y": Log(2.0, name="x")})


@pytest.mark.parametrize(("sep", "error"), [(1, TypeError), ("", ValueError), (None, TypeError)])
def test_bad_separators_are_rejected(sep, error):
    with pytest.raises(error, match="named_logs: sep must be"):
        named_logs({"a": Log(1.0)}, sep=sep)
