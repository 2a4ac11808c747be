"""What `collect` promises beyond the logs: nothing of the program dropped, the jax it
runs on, the jax internals it leans on, and errors that say what to do."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxmodules.logstate import collect, emit, scope
from jaxmodules.logstate._collect import KNOWN_PARAMS
from jaxmodules.logstate._emit import PRIVATE_JAX, SUPPORTED

JAX_VERSION = tuple(int(part) for part in jax.__version__.split(".")[:2])
NEEDS_0_8 = pytest.mark.skipif(JAX_VERSION < (0, 8), reason="collect needs jax 0.8 or newer")


@pytest.fixture
def rng():
    return np.random.default_rng(23)


def test_collect_runs_on_every_declared_jax_from_0_8():
    if JAX_VERSION < (0, 8):
        with pytest.raises(RuntimeError, match=r"collect needs jax 0\.8 or newer"):
            collect(jnp.sin)
        return
    assert SUPPORTED, f"collect is unsupported on jax {jax.__version__}, which is >= 0.8"
    out, logs = collect(lambda v: (emit("v", v), jnp.sin(v))[1])(jnp.float32(0.5))
    np.testing.assert_allclose(out, np.sin(0.5), rtol=1e-6)
    np.testing.assert_allclose(logs["v"].data, 0.5)


@pytest.mark.parametrize(("module", "name", "since"), PRIVATE_JAX, ids=lambda v: str(v))
def test_every_private_jax_name_the_package_uses_exists(module, name, since):
    if since > JAX_VERSION:
        pytest.skip(f"used from jax {since} on")
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} is gone"


def _programs():
    """One traced program per equation kind collect rebuilds, with every option set."""
    x = jnp.ones((4, 3))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
    spec = jax.sharding.PartitionSpec()
    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # pragma: no cover - older jax
        from jax.experimental.shard_map import shard_map

    @jax.custom_jvp
    def cj(v):
        return jnp.sin(v)

    cj.defjvp(lambda p, t: (cj(*p), t[0]))

    @jax.custom_vjp
    def cv(v):
        return jnp.sin(v)

    cv.defvjp(lambda v: (cv(v), v), lambda r, g: (g,))
    yield jax.jit(lambda v: 2 * v, donate_argnums=0), x
    yield lambda v: lax.scan(lambda c, y: (c + y, c), jnp.zeros(3), v), x
    yield lambda v: lax.cond(v[0, 0] > 0, lambda: v, lambda: -v), x
    yield jax.checkpoint(jnp.sin, policy=jax.checkpoint_policies.nothing_saveable), x
    yield cj, x
    yield cv, x
    yield shard_map(lambda v: 2 * v, mesh=mesh, in_specs=spec, out_specs=spec), x


@NEEDS_0_8
def test_collect_knows_every_parameter_of_the_equations_it_rebuilds():
    seen = set()
    for fn, x in _programs():
        for eqn in jax.make_jaxpr(fn)(x).eqns:
            name = eqn.primitive.name
            if name not in KNOWN_PARAMS:
                continue
            seen.add(name)
            new = sorted(set(eqn.params) - KNOWN_PARAMS[name])
            assert not new, (
                f"this jax's {name!r} equations carry parameters collect does not know: {new}"
            )
    assert {"scan", "cond", "remat2", "custom_jvp_call", "shard_map"} <= seen, seen
    assert seen & {"jit", "pjit"} and seen & {"custom_vjp_call", "custom_vjp_call_jaxpr"}, seen


def _jit_eqn(jaxpr):
    return next(e for e in jaxpr.eqns if e.primitive.name in ("jit", "pjit"))


@NEEDS_0_8
def test_a_jit_inside_collect_keeps_all_its_parameters_donation_included(rng):
    x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)

    def inner(v, w):
        emit("norm", jnp.linalg.norm(v))
        return jnp.sin(v) * w

    jitted = jax.jit(inner, donate_argnums=0)
    original = _jit_eqn(jax.make_jaxpr(jitted)(x, x)).params
    assert original["donated_invars"] == (True, False)
    rebuilt_jaxpr = jax.make_jaxpr(lambda v, w: collect(jitted)(v, w))(x, x)
    rebuilt = _jit_eqn(rebuilt_jaxpr).params
    for key in set(original) - {"jaxpr", "out_shardings", "out_layouts"}:
        assert rebuilt[key] == original[key], key
    for key in ("out_shardings", "out_layouts"):
        assert rebuilt[key][:1] == original[key], key
    # Run eagerly, the donated argument is given up, as jax.jit alone would do.
    v, w = jnp.asarray(x) + 0, jnp.asarray(x) + 1
    want = np.sin(np.asarray(v)) * np.asarray(w)
    out, logs = collect(jitted)(v, w)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    np.testing.assert_allclose(logs["norm"].data, np.linalg.norm(np.asarray(x)), rtol=1e-6)
    assert v.is_deleted() and not w.is_deleted()


@NEEDS_0_8
def test_a_checkpoint_inside_collect_keeps_its_policy(rng):
    x = jnp.asarray(rng.normal(size=(5,)), jnp.float32)
    policy = jax.checkpoint_policies.nothing_saveable

    def f(v):
        emit("s", jnp.sum(v))
        return jnp.sin(jnp.cos(v))

    ck = jax.checkpoint(f, policy=policy, prevent_cse=False)
    eqn = next(
        e for e in jax.make_jaxpr(lambda v: collect(ck)(v))(x).eqns if "remat" in e.primitive.name
    )
    assert eqn.params["policy"] is policy and eqn.params["prevent_cse"] is False
    g = jax.grad(lambda v: collect(ck)(v)[0].sum())(x)
    np.testing.assert_allclose(g, -np.cos(np.cos(x)) * np.sin(x), rtol=1e-5)


# ------------------------------------------------------------------------ clear errors


@NEEDS_0_8
def test_a_function_returning_a_str_is_named():
    def describe(v):
        return "norm", jnp.linalg.norm(v)

    with pytest.raises(
        TypeError, match=r"collect\(.*describe\): .*describe returned a str \(output\[0\]\)"
    ):
        collect(describe)(jnp.ones(3))


def test_a_scope_prefix_with_an_empty_part_is_a_value_error():
    for bad, fixed in (("layer.", "'layer'"), (".layer", "'layer'"), ("a..b", "'a.b'")):
        match = rf"scope: the prefix .* write scope\({fixed}\)"
        with pytest.raises(ValueError, match=match), scope(bad):
            pass


class PlainState:
    """Not a pytree: collect hands the function the caller's own object."""

    def __init__(self, w):
        self.w = w
        self.calls = 0


@NEEDS_0_8
def test_a_traced_value_stored_on_a_plain_object_is_refused_on_the_first_call(rng):
    w = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    state = PlainState(w)
    x = jnp.asarray(rng.normal(size=(3,)), jnp.float32)

    def step(state, x):
        state.calls += 1  # a Python value: it happens once per call, as without collect
        emit("dot", state.w @ x)
        state.w = state.w - 0.1 * x  # a traced value: it cannot reach the caller's object
        return state.w @ x

    with pytest.raises(
        ValueError, match=r"collect\(.*step\): the call stored a traced value in args\[0\]\.w"
    ):
        collect(step)(state, x)
    state = PlainState(w)

    def count(state, x):
        state.calls += 1
        emit("dot", state.w @ x)
        return state.w @ x

    reference = PlainState(w)
    for _ in range(2):
        out, logs = collect(count)(state, x)
        want = count(reference, x)
        np.testing.assert_allclose(out, want, rtol=1e-6)
        np.testing.assert_allclose(logs["dot"].data, want, rtol=1e-6)
    assert state.calls == reference.calls == 2


@NEEDS_0_8
def test_a_container_argument_updated_in_place_is_refused(rng):
    params = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32), "n": 0}

    def step(params, x):
        params["w"] = params["w"] - 0.1 * x
        return jnp.sum(params["w"])

    with pytest.raises(ValueError, match=r"collect\(.*step\): the call replaced args\[0\]\['w'\]"):
        collect(step)(params, jnp.ones(3))

    def grow(items, x):
        items.append(x)
        return x

    with pytest.raises(ValueError, match=r"changed the structure of a container"):
        collect(grow)([jnp.ones(3)], jnp.ones(3))
