"""emit / collect / scope: each transformation against the same values threaded by hand.

Every test runs a function that emits, through `collect`, and compares the logs with the
values the same computation returns when they are passed out explicitly (as outputs of
the scan body, the branch, the vmapped function, ...).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxmodules.logstate import (
    Log,
    collect,
    emit,
    fetch_logs,
    named_logs,
    scope,
    write_tensorboard,
)

# Skipped only where collect is documented not to run; on a jax >= 0.8 where it does not,
# every test fails (and test_collect_contract says why).
JAX_VERSION = tuple(int(part) for part in jax.__version__.split(".")[:2])
pytestmark = pytest.mark.skipif(JAX_VERSION < (0, 8), reason="collect needs jax 0.8 or newer")


@pytest.fixture
def rng():
    return np.random.default_rng(19)


def data(logs):
    return {name: log.data for name, log in logs.items()}


def assert_logs(logs, expected, rtol=1e-6, ordered=False):
    """Names (and their order, if asked: dicts through jax transformations come back
    sorted), Log names and values."""
    if ordered:
        assert list(logs) == list(expected)
    assert sorted(logs) == sorted(expected)
    for name, want in expected.items():
        assert isinstance(logs[name], Log) and logs[name].name == name
        got_leaves, want_leaves = jax.tree.leaves(logs[name].data), jax.tree.leaves(want)
        assert len(got_leaves) == len(want_leaves), name
        for got, wanted in zip(got_leaves, want_leaves, strict=True):
            np.testing.assert_allclose(got, wanted, rtol=rtol, atol=1e-6, err_msg=name)


def shard_map_fn():
    try:
        from jax import shard_map
    except ImportError:  # older jax
        from jax.experimental.shard_map import shard_map
    return shard_map


# ----------------------------------------------------------------------------- basics


def test_collect_returns_the_output_and_named_logs_in_emission_order(rng):
    x = rng.normal(size=(4, 3)).astype(np.float32)

    def f(v):
        emit("z_last_alphabetically", jnp.sum(v))
        emit("stats", {"max": jnp.max(v), "min": jnp.min(v)})
        emit("a_first_alphabetically", v * 2)
        return jnp.tanh(v)

    out, logs = collect(f)(x)
    np.testing.assert_allclose(out, np.tanh(x), rtol=1e-6)
    assert isinstance(logs, OrderedDict)
    expected = {
        "z_last_alphabetically": x.sum(),
        "stats": {"max": x.max(), "min": x.min()},
        "a_first_alphabetically": 2 * x,
    }
    assert_logs(logs, expected, ordered=True)
    # jit keeps the order of an OrderedDict (a plain dict would come back sorted).
    _, jitted = jax.jit(collect(f))(x)
    assert_logs(jitted, expected, ordered=True)
    # The package's readers take the dict unchanged.
    assert list(named_logs(logs)) == list(expected)
    fetched = fetch_logs(logs)
    assert list(fetched) == [
        "z_last_alphabetically",
        "stats.max",
        "stats.min",
        "a_first_alphabetically",
    ]
    np.testing.assert_allclose(fetched["stats.max"], x.max())

    class Writer:
        def __init__(self):
            self.scalars, self.histograms = {}, {}

        def add_scalar(self, tag, value, global_step=None):
            self.scalars[tag] = value

        def add_histogram(self, tag, values, global_step=None):
            self.histograms[tag] = values

    writer = Writer()
    write_tensorboard(writer, logs, step=3)
    assert set(writer.scalars) == {"z_last_alphabetically", "stats.max", "stats.min"}
    np.testing.assert_allclose(writer.histograms["a_first_alphabetically"], 2 * x, rtol=1e-6)


def test_scope_prefixes_names_and_nests(rng):
    x = rng.normal(size=3).astype(np.float32)

    def f(v):
        with scope("model"):
            for i in range(2):
                with scope(f"layers.{i}"):
                    emit("norm", jnp.linalg.norm(v))
                v = 2 * v
        emit("out", v)
        return v

    _, logs = collect(f)(x)
    assert_logs(
        logs,
        {
            "model.layers.0.norm": np.linalg.norm(x),
            "model.layers.1.norm": 2 * np.linalg.norm(x),
            "out": 4 * x,
        },
        rtol=1e-5,
        ordered=True,
    )


def test_emit_outside_collect_adds_no_operation(rng):
    x = rng.normal(size=(3, 4)).astype(np.float32)

    def with_emits(v):
        m = jnp.mean(v)
        emit("mean", m)
        with scope("inner"):
            emit("v", v)
        return v * m

    def without(v):
        m = jnp.mean(v)
        return v * m

    assert str(jax.make_jaxpr(with_emits)(x)) == str(jax.make_jaxpr(without)(x))
    np.testing.assert_array_equal(with_emits(x), without(x))


def test_collect_uses_no_callback_and_compiles_once_per_input_shape(rng):
    traces = []

    def f(v):
        traces.append(v.shape)
        emit("sq", v**2)
        return lax.scan(lambda c, a: (c + a, emit("c", c)), jnp.zeros(v.shape[1:]), v)[0]

    text = str(jax.make_jaxpr(collect(f))(jnp.ones((3, 2))))
    assert "callback" not in text and "emit" not in text
    step = jax.jit(collect(f))
    traces.clear()
    for shape in [(3, 2), (3, 2), (5, 2), (3, 2), (5, 2)]:
        x = rng.normal(size=shape).astype(np.float32)
        out, logs = step(x)
        np.testing.assert_allclose(out, x.sum(0), rtol=1e-5)
        np.testing.assert_allclose(logs["c"].data, np.cumsum(x, 0) - x, rtol=1e-5, atol=1e-6)
    assert traces == [(3, 2), (5, 2)]


def test_a_jitted_function_is_traced_apart_inside_collect_outside_it_and_per_scope(rng):
    x = rng.normal(size=4).astype(np.float32)
    g = jax.jit(lambda v: (emit("s", jnp.sum(v)), 2 * v)[1])
    np.testing.assert_allclose(g(x), 2 * x)  # traced outside collect first: no emit

    def f(v):
        with scope("a"):
            v = g(v)
        with scope("b"):
            v = g(v[::-1])
        return v

    out, logs = collect(f)(x)
    np.testing.assert_allclose(out, 4 * x[::-1], rtol=1e-6)
    assert_logs(logs, {"a.s": x.sum(), "b.s": 2 * x.sum()}, rtol=1e-5)
    # ... and the trace made inside collect never leaks out of it.
    np.testing.assert_allclose(g(x), 2 * x)
    assert "emit" not in str(jax.make_jaxpr(g)(x))


# ----------------------------------------------------------------------------- jit


def test_jit_inside_and_nested_jits_against_returned_values(rng):
    x = rng.normal(size=(4, 3)).astype(np.float32)
    w = rng.normal(size=(3, 3)).astype(np.float32)

    @jax.jit
    def inner(v):
        h = jnp.tanh(v @ w)
        emit("inner.h_norm", jnp.linalg.norm(h, axis=-1))
        return h

    @jax.jit
    def outer(v):
        h = inner(v) + 1
        emit("outer.sum", jnp.sum(h))
        return h * 2

    # By hand: each function returns its value next to its output.
    @jax.jit
    def inner_ref(v):
        h = jnp.tanh(v @ w)
        return h, jnp.linalg.norm(h, axis=-1)

    @jax.jit
    def outer_ref(v):
        h, norm = inner_ref(v)
        h = h + 1
        return h * 2, norm, jnp.sum(h)

    ref_out, norm, total = outer_ref(x)
    for run in (collect(outer), jax.jit(collect(outer))):
        out, logs = run(x)
        np.testing.assert_allclose(out, ref_out, rtol=1e-6)
        assert_logs(logs, {"inner.h_norm": norm, "outer.sum": total}, rtol=1e-5)


# ----------------------------------------------------------------------------- vmap


def test_vmap_inside_collect_adds_the_batch_axis_in_front(rng):
    xs = rng.normal(size=(5, 3)).astype(np.float32)
    c = np.float32(rng.normal())

    def per_example(v):
        emit("dot", jnp.dot(v, v))
        emit("const", c)  # does not depend on v: broadcast like a returned value
        emit("v", v)
        return jnp.sin(v)

    def by_hand(v):
        return jnp.sin(v), (jnp.dot(v, v), c, v)

    ref_out, (dot, const, v) = jax.vmap(by_hand)(xs)
    out, logs = collect(jax.vmap(per_example))(xs)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6)
    assert_logs(logs, {"dot": dot, "const": const, "v": v}, rtol=1e-5)
    assert logs["const"].data.shape == (5,)
    # in_axes=1 and nested vmaps: outer axis first, like nested vmaps of returned values.
    out, logs = collect(jax.vmap(jax.vmap(per_example), in_axes=1))(xs.T.reshape(3, 5, 1))
    _, (dot, const, v) = jax.vmap(jax.vmap(by_hand), in_axes=1)(xs.T.reshape(3, 5, 1))
    assert logs["v"].data.shape == (5, 3, 1)
    assert_logs(logs, {"dot": dot, "const": const, "v": v}, rtol=1e-5)


def test_vmap_outside_collect_batches_the_logs(rng):
    xs = rng.normal(size=(6, 4)).astype(np.float32)

    def f(v):
        emit("max", jnp.max(v))
        return v / jnp.max(v)

    out, logs = jax.vmap(collect(f))(xs)
    np.testing.assert_allclose(out, xs / xs.max(1, keepdims=True), rtol=1e-6)
    assert_logs(logs, {"max": xs.max(1)})


# ----------------------------------------------------------------------------- scan


def scan_model(x, ws):
    def layer(h, w):
        h = jnp.tanh(h @ w)
        emit("act_norm", jnp.linalg.norm(h))
        emit("act", h)
        return h, jnp.sum(h)

    with scope("layers"):
        h, sums = lax.scan(layer, x, ws)
    emit("final", jnp.mean(h))
    return h, sums


def scan_model_by_hand(x, ws):
    def layer(h, w):
        h = jnp.tanh(h @ w)
        return h, (jnp.sum(h), jnp.linalg.norm(h), h)

    h, (sums, norms, acts) = lax.scan(layer, x, ws)
    return (h, sums), {"layers.act_norm": norms, "layers.act": acts, "final": jnp.mean(h)}


def test_scan_stacks_emits_over_the_iterations(rng):
    x = rng.normal(size=3).astype(np.float32)
    ws = rng.normal(size=(5, 3, 3)).astype(np.float32) / 2
    ref_out, expected = scan_model_by_hand(x, ws)
    out, logs = jax.jit(collect(scan_model))(x, ws)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out, ref_out)
    assert logs["layers.act"].data.shape == (5, 3)
    assert_logs(logs, expected, rtol=1e-5)


def test_nested_scans_add_one_axis_per_level_and_reverse_keeps_the_index_order(rng):
    xs = rng.normal(size=(4, 3, 2)).astype(np.float32)

    def f(x):
        def outer(c, row):
            def inner(c2, v):
                c2 = c2 * 0.5 + v
                emit("inner", c2)
                return c2, None

            c2, _ = lax.scan(inner, c, row, reverse=True)
            emit("outer", jnp.sum(c2))
            return c2, None

        return lax.scan(outer, jnp.zeros(2), x)[0]

    def by_hand(x):
        def outer(c, row):
            def inner(c2, v):
                c2 = c2 * 0.5 + v
                return c2, c2

            c2, ys = lax.scan(inner, c, row, reverse=True)
            return c2, (jnp.sum(c2), ys)

        c, (outer_vals, inner_vals) = lax.scan(outer, jnp.zeros(2), x)
        return c, {"inner": inner_vals, "outer": outer_vals}

    out, logs = jax.jit(collect(f))(xs)
    ref_out, expected = by_hand(xs)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6)
    assert logs["inner"].data.shape == (4, 3, 2)
    assert_logs(logs, expected, rtol=1e-5)


def test_vmap_around_a_scan_inside_collect_puts_the_scan_axis_first(rng):
    x = rng.normal(size=(6, 3)).astype(np.float32)
    ws = rng.normal(size=(5, 3, 3)).astype(np.float32) / 2
    _, logs = collect(jax.vmap(scan_model, in_axes=(0, None)))(x, ws)
    _, expected = jax.vmap(scan_model_by_hand, in_axes=(0, None))(x, ws)
    # By hand, vmap puts its axis in front of the scan's; collect keeps the scan axes first
    # (documented): (layers, batch, ...). vmap(collect(...)) gives (batch, layers, ...).
    assert logs["layers.act"].data.shape == (5, 6, 3)
    expected = {
        name: (np.swapaxes(v, 0, 1) if name.startswith("layers") else v)
        for name, v in expected.items()
    }
    assert_logs(logs, expected, rtol=1e-5)
    _, outside = jax.vmap(collect(scan_model), in_axes=(0, None))(x, ws)
    assert outside["layers.act"].data.shape == (6, 5, 3)
    np.testing.assert_allclose(
        outside["layers.act"].data, np.swapaxes(logs["layers.act"].data, 0, 1), rtol=1e-6
    )


def test_fori_loop_with_static_bounds_behaves_as_scan(rng):
    x = rng.normal(size=3).astype(np.float32)

    def f(v):
        def body(i, c):
            c = jnp.sin(c) + i
            emit("c", c)
            emit("i", i)
            return c

        return lax.fori_loop(0, 4, body, v)

    def by_hand(v):
        def body(c, i):
            c = jnp.sin(c) + i
            return c, (c, i)

        c, (cs, i) = lax.scan(body, v, jnp.arange(4))
        return c, {"c": cs, "i": i}

    out, logs = jax.jit(collect(f))(x)
    ref_out, expected = by_hand(x)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6)
    assert_logs(logs, expected, rtol=1e-6)


# ----------------------------------------------------------------------------- cond


def test_cond_and_switch_give_the_taken_branch_value(rng):
    x = rng.normal(size=4).astype(np.float32)

    def f(v, k):
        def branch(scale):
            def run(u):
                emit("scaled", u * scale)
                emit("which", jnp.int32(scale))
                return u + scale

            return run

        y = lax.switch(k, [branch(1), branch(2), branch(3)], v)
        z = lax.cond(jnp.sum(y) > 0, branch(10), branch(20), -y)
        return z

    def by_hand(v, k):
        def branch(scale):
            return lambda u: (u + scale, (u * scale, jnp.int32(scale)))

        y, (s1, w1) = lax.switch(k, [branch(1), branch(2), branch(3)], v)
        z, (s2, w2) = lax.cond(jnp.sum(y) > 0, branch(10), branch(20), -y)
        return z, {"scaled": s1, "which": w1, "second.scaled": s2, "second.which": w2}

    def f_named(v, k):
        # The same, with the second cond's emits under a scope so that names differ.
        def branch(scale):
            def run(u):
                emit("scaled", u * scale)
                emit("which", jnp.int32(scale))
                return u + scale

            return run

        y = lax.switch(k, [branch(1), branch(2), branch(3)], v)
        with scope("second"):
            return lax.cond(jnp.sum(y) > 0, branch(10), branch(20), -y)

    step = jax.jit(collect(f_named))
    for k in range(3):
        out, logs = step(x, k)
        ref_out, expected = by_hand(x, k)
        np.testing.assert_allclose(out, ref_out, rtol=1e-6)
        assert_logs(logs, expected)
    with pytest.raises(ValueError, match=r"emit\('scaled'\): this name is emitted twice"):
        collect(f)(x, 0)


def test_vmap_outside_collect_selects_per_example_branch_values(rng):
    xs = rng.normal(size=(8, 3)).astype(np.float32)

    def f(v):
        return lax.cond(
            v[0] > 0,
            lambda u: (emit("b", u * 2), u)[1],
            lambda u: (emit("b", u * 3), -u)[1],
            v,
        )

    out, logs = jax.vmap(collect(f))(xs)
    factor = np.where(xs[:, :1] > 0, 2, 3)
    np.testing.assert_allclose(logs["b"].data, xs * factor, rtol=1e-6)
    np.testing.assert_allclose(out, np.where(xs[:, :1] > 0, xs, -xs), rtol=1e-6)


def test_cond_under_a_batched_predicate_inside_collect_is_reported_not_mixed(rng):
    # vmap runs every branch of a cond whose predicate it batches; the emits of both
    # branches then meet at one level: an error pointing at vmap(collect(...)).
    xs = rng.normal(size=(4, 3)).astype(np.float32)

    def f(v):
        return lax.cond(
            v[0] > 0, lambda u: (emit("b", u), u)[1], lambda u: (emit("b", -u), u)[1], v
        )

    with pytest.raises(ValueError, match=r"emit\('b'\): .*twice.*put that vmap outside"):
        collect(jax.vmap(f))(xs)


def test_cond_branches_that_disagree_are_a_value_error_naming_the_emit(rng):
    x = rng.normal(size=3).astype(np.float32)

    def names(v):
        return lax.cond(
            v[0] > 0,
            lambda u: (emit("only_here", u), u)[1],
            lambda u: (emit("other", u), u)[1],
            v,
        )

    branches = r"branch 0 \(false_fun of a lax.cond\) emits it and branch 1 \(true_fun"
    with pytest.raises(ValueError, match=r"emit\('other'\): " + branches):
        collect(names)(x)

    def shapes(v):
        return lax.cond(
            v[0] > 0,
            lambda u: (emit("s", u), u)[1],
            lambda u: (emit("s", u[:2]), u)[1],
            v,
        )

    with pytest.raises(ValueError, match=r"emit\('s'\): .*shapes: float32\[2\] in branch 0"):
        collect(shapes)(x)


# ----------------------------------------------------------------------------- grad


def loss_with_emits(w, x):
    h = jnp.tanh(x @ w)
    emit("h_mean", jnp.mean(h))
    emit("h", h)  # a value that depends on w: must not change any gradient
    return jnp.sum(h**2)


def loss_plain(w, x):
    h = jnp.tanh(x @ w)
    return jnp.sum(h**2), {"h_mean": jnp.mean(h), "h": h}


def test_grad_with_collect_outside_records_the_forward_values(rng):
    w = rng.normal(size=(3, 2)).astype(np.float32)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    (loss, grads), logs = jax.jit(collect(jax.value_and_grad(loss_with_emits)))(w, x)
    (ref_loss, expected), ref_grads = jax.value_and_grad(loss_plain, has_aux=True)(w, x)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-5)
    assert_logs(logs, expected, rtol=1e-5)


def test_grad_with_collect_inside_returns_logs_as_aux_and_they_never_change_gradients(rng):
    w = rng.normal(size=(3, 2)).astype(np.float32)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    grads, logs = jax.jit(jax.grad(collect(loss_with_emits), has_aux=True))(w, x)
    ref_grads, expected = jax.grad(loss_plain, has_aux=True)(w, x)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-5)
    assert_logs(logs, expected, rtol=1e-5)

    # A loss built from the logs themselves has zero gradient: they are cut.
    def through_logs(w):
        _, logs = collect(loss_with_emits)(w, x)
        return jnp.sum(logs["h"].data) + logs["h_mean"].data

    np.testing.assert_array_equal(jax.grad(through_logs)(w), np.zeros_like(w))


@pytest.mark.parametrize("remat", [False, True], ids=["scan", "scan-of-checkpoint"])
def test_grad_through_a_scan_over_layers_with_collect_on_either_side(rng, remat):
    x = rng.normal(size=3).astype(np.float32)
    ws = rng.normal(size=(4, 3, 3)).astype(np.float32) / 2

    def loss(ws, x):
        def layer(h, w):
            h = jnp.tanh(h @ w)
            emit("h_norm", jnp.linalg.norm(h))
            return h, None

        body = jax.checkpoint(layer) if remat else layer
        return jnp.sum(lax.scan(body, x, ws)[0] ** 2)

    def by_hand(ws, x):
        def layer(h, w):
            h = jnp.tanh(h @ w)
            return h, jnp.linalg.norm(h)

        h, norms = lax.scan(layer, x, ws)
        return jnp.sum(h**2), {"h_norm": norms}

    (_, expected), ref_grads = jax.value_and_grad(by_hand, has_aux=True)(ws, x)
    grads, logs = jax.jit(collect(jax.grad(loss)))(ws, x)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-5, atol=1e-7)
    assert_logs(logs, expected, rtol=1e-5)
    grads, logs = jax.jit(jax.grad(collect(loss), has_aux=True))(ws, x)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-5, atol=1e-7)
    assert_logs(logs, expected, rtol=1e-5)
    # Forward mode as well.
    tangent = rng.normal(size=ws.shape).astype(np.float32)
    (_, jvp_out), logs = collect(lambda w: jax.jvp(lambda v: loss(v, x), (w,), (tangent,)))(ws)
    _, ref_jvp = jax.jvp(lambda v: by_hand(v, x)[0], (ws,), (tangent,))
    np.testing.assert_allclose(jvp_out, ref_jvp, rtol=1e-5)
    assert_logs(logs, expected, rtol=1e-5)


def test_checkpoint_emits_once_from_the_forward_pass(rng):
    w = rng.normal(size=(3, 3)).astype(np.float32)
    x = rng.normal(size=3).astype(np.float32)

    def f(w):
        def block(h):
            h = jnp.tanh(h @ w)
            emit("h", h)
            return h

        return jnp.sum(jax.checkpoint(block)(jax.checkpoint(block, prevent_cse=False)(x)) ** 2)

    def g(w):  # the same, emitting under two names, by hand
        h1 = jnp.tanh(x @ w)
        h2 = jnp.tanh(h1 @ w)
        return jnp.sum(h2**2), (h1, h2)

    with pytest.raises(ValueError, match=r"emit\('h'\): this name is emitted twice"):
        collect(jax.grad(f))(w)

    def f_scoped(w):
        def block(h):
            h = jnp.tanh(h @ w)
            emit("h", h)
            return h

        with scope("one"):
            h = jax.checkpoint(block)(x)
        with scope("two"):
            h = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)(h)
        return jnp.sum(h**2)

    (_, (h1, h2)), ref_grads = jax.value_and_grad(g, has_aux=True)(w)
    grads, logs = jax.jit(collect(jax.grad(f_scoped)))(w)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-5)
    assert_logs(logs, {"one.h": h1, "two.h": h2}, rtol=1e-5)
    grads, logs = jax.jit(jax.grad(collect(f_scoped), has_aux=True))(w)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-5)
    assert_logs(logs, {"one.h": h1, "two.h": h2}, rtol=1e-5)


# ----------------------------------------------------------------------------- custom rules


@jax.custom_vjp
def clipped_sin(x):
    emit("clipped_sin.in_norm", jnp.linalg.norm(x))
    return jnp.sin(x)


def _clipped_sin_fwd(x):
    return clipped_sin(x), x  # calls the function: its emits run under grad too


def _clipped_sin_bwd(x, g):
    return (jnp.clip(g * jnp.cos(x), -0.1, 0.1),)


clipped_sin.defvjp(_clipped_sin_fwd, _clipped_sin_bwd)


@jax.custom_jvp
def scaled_tanh(x):
    emit("scaled_tanh.max", jnp.max(x))
    return jnp.tanh(x)


@scaled_tanh.defjvp
def _scaled_tanh_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return scaled_tanh(x), 3.0 * t  # a deliberately different derivative


def custom_loss(x):
    return jnp.sum(clipped_sin(x) * scaled_tanh(2 * x))


def test_custom_vjp_and_custom_jvp_keep_their_rules_and_emit(rng):
    x = rng.normal(size=5).astype(np.float32) * 2
    expected = {"clipped_sin.in_norm": np.linalg.norm(x), "scaled_tanh.max": 2 * x.max()}
    out, logs = jax.jit(collect(custom_loss))(x)
    np.testing.assert_allclose(out, np.sum(np.sin(x) * np.tanh(2 * x)), rtol=1e-5)
    assert_logs(logs, expected, rtol=1e-5)
    # The custom derivative, written out: clip(tanh(2x) cos x) + sin(x) * 3 * 2.
    ref = np.clip(np.tanh(2 * x) * np.cos(x), -0.1, 0.1) + np.sin(x) * 6
    grads, logs = jax.jit(jax.grad(collect(custom_loss), has_aux=True))(x)
    np.testing.assert_allclose(grads, ref, rtol=1e-5, atol=1e-6)
    assert_logs(logs, expected, rtol=1e-5)
    grads, logs = jax.jit(collect(jax.grad(custom_loss)))(x)
    np.testing.assert_allclose(grads, ref, rtol=1e-5, atol=1e-6)
    assert_logs(logs, expected, rtol=1e-5)


# ----------------------------------------------------------------------------- shard_map


def test_shard_map_stacks_one_value_per_device(rng):
    shard_map = shard_map_fn()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
    spec = jax.sharding.PartitionSpec("d")
    x = rng.normal(size=(4, 3)).astype(np.float32)

    def body(v):
        emit("local_sum", jnp.sum(v))
        return 2 * v

    def body_by_hand(v):
        return 2 * v, jnp.sum(v)[None]

    out, logs = jax.jit(collect(shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec)))(x)
    ref_out, local = shard_map(body_by_hand, mesh=mesh, in_specs=spec, out_specs=spec)(x)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6)
    assert_logs(logs, {"local_sum": local}, rtol=1e-5)


_TWO_DEVICES = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxmodules.logstate import collect, emit
try:
    from jax import shard_map
except ImportError:
    from jax.experimental.shard_map import shard_map
mesh = Mesh(np.array(jax.devices()[:2]), ("d",))
x = jax.device_put(np.arange(12.0, dtype=np.float32).reshape(4, 3), NamedSharding(mesh, P("d")))

def body(v):
    emit("local_sum", jnp.sum(v))
    return 2 * v

def f(v):
    emit("row_norms", jnp.linalg.norm(v, axis=1))
    return shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d"))(v)

out, logs = jax.jit(collect(f))(x)
local = logs["local_sum"].data
assert local.shape == (2,), local.shape
np.testing.assert_allclose(local, [np.arange(6.0).sum(), np.arange(6.0, 12.0).sum()])
assert [s.data.shape for s in local.addressable_shards] == [(1,), (1,)]
np.testing.assert_allclose(out, 2 * np.asarray(x))
norms = logs["row_norms"].data
np.testing.assert_allclose(norms, np.linalg.norm(np.asarray(x), axis=1), rtol=1e-6)
print("ok", norms.sharding)
"""


def test_shard_map_on_two_devices_keeps_each_device_value_on_its_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_TWO_DEVICES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok"), result.stdout


# ----------------------------------------------------------------------------- errors


def test_while_loop_is_a_value_error_that_suggests_scan(rng):
    x = rng.normal(size=3).astype(np.float32)

    def f(v):
        def body(c):
            emit("c", c)
            return c * 2

        return lax.while_loop(lambda c: jnp.sum(c) < 100.0, body, v)

    with pytest.raises(ValueError, match=r"emit\('c'\) is inside a lax.while_loop.*lax.scan"):
        collect(f)(x)
    traced_bounds = lambda v, n: lax.fori_loop(0, n, lambda i, c: (emit("i", i), c)[1], v)  # noqa: E731
    with pytest.raises(ValueError, match=r"emit\('i'\) is inside a lax.while_loop"):
        collect(traced_bounds)(x, jnp.int32(3))
    # Without an emit inside, while loops run as usual.
    out, logs = collect(lambda v: lax.while_loop(lambda c: c[0] < 10, lambda c: c + 1, v))(x)
    assert logs == {} and out[0] >= 10


def test_duplicate_names_at_one_level_are_a_value_error(rng):
    x = rng.normal(size=3).astype(np.float32)

    def twice(v):
        emit("x", v)
        emit("x", 2 * v)
        return v

    with pytest.raises(ValueError, match=r"emit\('x'\): this name is emitted twice"):
        collect(twice)(x)

    def inside_and_outside_scan(v):
        emit("x", v)
        return lax.scan(lambda c, _: (c, emit("x", c)), v, None, length=2)[0]

    with pytest.raises(ValueError, match=r"emit\('x'\)"):
        collect(inside_and_outside_scan)(x)


def test_bad_names_and_values_are_refused_naming_the_emit():
    x = jnp.ones(2)
    with pytest.raises(TypeError, match=r"emit: the name must be a str, got int 3"):
        collect(lambda v: emit(3, v))(x)
    with pytest.raises(ValueError, match=r"emit: the name must be a non-empty string"):
        collect(lambda v: emit("", v))(x)
    with pytest.raises(TypeError, match=r"emit\('tag'\): data must be arrays.*'str' value"):
        collect(lambda v: emit("tag", "warmup"))(x)
    with pytest.raises(TypeError, match=r"emit\('obj'\): data must be arrays.*'object' value"):
        collect(lambda v: emit("obj", {"a": object()}))(x)
    with pytest.raises(TypeError, match=r"emit\('log'\): data is already a Log"):
        collect(lambda v: emit("log", Log(v)))(x)
    with pytest.raises(TypeError, match=r"emit\('none'\): the value holds no arrays"):
        collect(lambda v: emit("none", None))(x)
    with pytest.raises(TypeError, match=r"scope: the prefix must be a str, got int"), scope(1):
        pass
    with pytest.raises(TypeError, match=r"collect: fn must be callable, got int"):
        collect(3)  # type: ignore[arg-type]
    # Outside collect the same checks apply, so mistakes show up without logging on.
    with pytest.raises(TypeError, match=r"emit: the name must be a str"):
        emit(None, x)  # type: ignore[arg-type]


def test_an_unknown_higher_order_primitive_is_named_in_the_error(rng):
    x = rng.normal(size=3).astype(np.float32)
    custom_vmap = pytest.importorskip("jax.custom_batching").custom_vmap

    @custom_vmap
    def f(v):
        emit("inside", v)
        return v * 2

    @f.def_vmap
    def _rule(axis_size, in_batched, v):
        return v * 2, in_batched[0]

    with pytest.raises(ValueError, match=r"emit\('inside'\) is inside a 'custom_vmap_call'"):
        collect(f)(x)


# ----------------------------------------------------------------------------- nesting


def test_a_nested_collect_keeps_its_own_emits(rng):
    x = rng.normal(size=3).astype(np.float32)

    def inner(v):
        emit("shared_name", jnp.sum(v))
        return v * 2

    def outer(v):
        y, inner_logs = collect(inner)(v)
        emit("shared_name", jnp.max(y))  # no clash: the inner collect took its emit
        return y, inner_logs

    (y, inner_logs), logs = jax.jit(collect(outer))(x)
    np.testing.assert_allclose(y, 2 * x, rtol=1e-6)
    assert_logs(inner_logs, {"shared_name": x.sum()}, rtol=1e-5)
    assert_logs(logs, {"shared_name": 2 * x.max()}, rtol=1e-6)


def test_collect_of_a_closure_over_values_traced_outside_it(rng):
    # Parameters closed over (the flax/equinox style) rather than passed as arguments.
    w = rng.normal(size=(3, 2)).astype(np.float32)
    x = rng.normal(size=3).astype(np.float32)

    def loss(w):
        def inner(v):
            h = jnp.tanh(v @ w)
            emit("h", h)
            return jnp.sum(h**2)

        return collect(inner)(x)

    grads, logs = jax.jit(jax.grad(loss, has_aux=True))(w)
    ref_grads, h = jax.grad(
        lambda w: (jnp.sum(jnp.tanh(x @ w) ** 2), jnp.tanh(x @ w)), has_aux=True
    )(w)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-5)
    assert_logs(logs, {"h": h}, rtol=1e-5)
    scales = rng.normal(size=4).astype(np.float32)
    _, logs = jax.vmap(lambda s: collect(lambda v: (emit("m", jnp.max(v * s)), v)[1])(x))(scales)
    assert_logs(logs, {"m": np.max(x[None] * scales[:, None], axis=1)}, rtol=1e-6)
