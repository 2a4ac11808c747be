"""reset_logs (zeros, structure kept) and clear_logs (None)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.logstate import Log, clear_logs, list_of_logs, map_logs, reset_logs


@pytest.fixture
def rng():
    return np.random.default_rng(4)


class Holder:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def make_state(rng):
    return {
        "f32": Log(jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)),
        "bf16": Log(jnp.asarray(rng.normal(size=4), jnp.bfloat16)),
        "i32": Log(jnp.asarray(rng.integers(1, 9, size=5), jnp.int32)),
        "flag": Log(jnp.asarray(True)),
        "weak": Log(jnp.asarray(rng.normal()) * 1.0),  # weakly typed scalar
        "np": Log(rng.normal(size=2)),
        "npscalar": Log(np.float32(rng.normal())),
        "py": [Log(3), Log(2.5), Log(True), Log(1 + 2j)],
        "tree": Log({"a": jnp.asarray(rng.normal(size=2)), "b": (np.int8(7),)}),
        "cleared": Log(None),
        "params": jnp.asarray(rng.normal(size=3)),
        "holder": Holder(norm=Log(jnp.asarray(rng.normal(), jnp.float32))),
    }


def test_reset_keeps_structure_shapes_dtypes_weak_types_and_kinds(rng):
    state = make_state(rng)
    fresh = reset_logs(state)
    skeleton = jax.tree_util.tree_structure({k: v for k, v in state.items() if k != "holder"})
    fresh_skeleton = jax.tree_util.tree_structure({k: v for k, v in fresh.items() if k != "holder"})
    assert skeleton == fresh_skeleton
    old_leaves = list_of_logs(state)
    for old, new in zip(
        jax.tree_util.tree_leaves(old_leaves),
        jax.tree_util.tree_leaves(list_of_logs(fresh)),
        strict=True,
    ):
        assert type(new) is type(old)
        assert np.shape(new) == np.shape(old) and np.asarray(new).dtype == np.asarray(old).dtype
        assert getattr(new, "weak_type", None) == getattr(old, "weak_type", None)
        assert not np.any(np.asarray(new))
    assert fresh["cleared"].data is None
    assert fresh["params"] is state["params"]  # non-Log leaves untouched
    assert fresh["holder"] is not state["holder"] and float(state["holder"].norm.data) != 0


def test_reset_does_not_mutate_and_abstract_values_match(rng):
    state = make_state(rng)
    before = [np.array(v, copy=True) for v in jax.tree_util.tree_leaves(list_of_logs(state))]
    fresh = reset_logs(state)
    after = jax.tree_util.tree_leaves(list_of_logs(state))
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    jax_only = {k: v for k, v in state.items() if k in ("f32", "bf16", "i32", "flag", "weak")}

    def aval(x):
        return (x.shape, x.dtype, x.weak_type, x.sharding)

    assert jax.tree_util.tree_map(aval, jax_only) == jax.tree_util.tree_map(
        aval, {k: fresh[k] for k in jax_only}
    )


def test_reset_works_on_traced_values_inside_jit(rng):
    x = jnp.asarray(rng.normal(size=3), jnp.float32)

    @jax.jit
    def f(state):
        return reset_logs({"a": Log(state["a"].data * 2), "b": state["b"] + 1})

    out = f({"a": Log(x), "b": x})
    np.testing.assert_array_equal(out["a"].data, np.zeros(3, np.float32))
    np.testing.assert_allclose(out["b"], np.asarray(x) + 1, rtol=1e-6)


def test_reset_refuses_values_without_a_zero():
    with pytest.raises(TypeError, match="reset_logs: a Log holds a str"):
        # Log itself refuses a str; jax's own tree_map can still put one in.
        reset_logs(jax.tree_util.tree_map(lambda _: "text", {"note": Log(1.0)}))


def test_clear_replaces_every_log_with_none_and_drops_its_leaves(rng):
    state = make_state(rng)
    cleared = clear_logs(state)
    assert list_of_logs(cleared) == [None] * len(list_of_logs(state))
    assert jax.tree_util.tree_leaves({k: v for k, v in cleared.items() if k != "holder"}) == [
        cleared["params"]
    ]
    assert cleared["holder"].norm.data is None and state["holder"].norm.data is not None
    reference = map_logs(lambda x: None, state)
    assert jax.tree_util.tree_structure(cleared) == jax.tree_util.tree_structure(reference)
