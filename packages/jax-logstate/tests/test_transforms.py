"""Logs through jit, vmap, scan, grad (has_aux), remat; tracing and jaxpr costs."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.logstate import Log, clear_logs, list_of_logs, named_logs, reset_logs


@pytest.fixture
def rng():
    return np.random.default_rng(3)


def tol(x):
    return {"rtol": 2e-5, "atol": 2e-6} if x.dtype == np.float32 else {}


def test_jit_returns_logs_with_the_values_computed_inside(rng):
    x = rng.normal(size=(5, 3)).astype(np.float32)

    @jax.jit
    def f(v):
        return {"out": v * 2, "norm": Log(jnp.sqrt(jnp.sum(v**2))), "max": Log(jnp.max(v))}

    out = f(x)
    np.testing.assert_allclose(out["norm"].data, np.linalg.norm(x.astype(np.float64)), rtol=1e-6)
    assert float(out["max"].data) == x.max()


def test_vmap_batches_the_log_data(rng):
    xs = rng.normal(size=(6, 4)).astype(np.float32)

    def per_example(v):
        return v.sum(), Log(jnp.dot(v, v), name="sq")

    _, log = jax.vmap(per_example)(xs)
    assert log.name == "sq" and log.data.shape == (6,)
    np.testing.assert_allclose(log.data, (xs.astype(np.float64) ** 2).sum(1), rtol=1e-5)
    # A Log can also be an input with its own axis spec.
    doubled = jax.vmap(lambda s: s.data * 2, in_axes=(Log(1),))(Log(xs.T))
    np.testing.assert_array_equal(doubled, 2 * xs)


def test_scan_stacks_logs_emitted_by_the_body_over_the_steps(rng):
    xs = rng.normal(size=(7, 3)).astype(np.float32)
    w0 = rng.normal(size=3).astype(np.float32)

    def body(w, x):
        loss = jnp.dot(w, x) ** 2
        grad = 2 * jnp.dot(w, x) * x
        return w - 0.05 * grad, {"loss": Log(loss), "x": {"norm": Log(jnp.linalg.norm(x))}}

    w_final, logs = jax.lax.scan(body, w0, xs)
    # Reference: the same loop in float64 NumPy.
    w, losses = w0.astype(np.float64), []
    for x in xs.astype(np.float64):
        losses.append(np.dot(w, x) ** 2)
        w = w - 0.05 * 2 * np.dot(w, x) * x
    named = named_logs(logs)
    assert list(named) == ["loss", "x.norm"]
    assert named["loss"].shape == (7,)
    np.testing.assert_allclose(named["loss"], losses, rtol=1e-4)
    np.testing.assert_allclose(named["x.norm"], np.linalg.norm(xs, axis=1), rtol=1e-5)
    np.testing.assert_allclose(w_final, w, rtol=1e-4)


def test_logs_in_a_scan_carry_need_the_structure_kept_by_reset(rng):
    xs = rng.normal(size=(5, 2)).astype(np.float32)

    def body(carry, x):
        total, count = carry["total"].data, carry["count"].data
        return {"total": Log(total + x.sum()), "count": Log(count + 1)}, None

    filled = {"total": Log(jnp.float32(123.0)), "count": Log(jnp.int32(9))}
    final, _ = jax.lax.scan(body, reset_logs(filled), xs)
    np.testing.assert_allclose(final["total"].data, xs.astype(np.float64).sum(), rtol=1e-5)
    assert int(final["count"].data) == 5

    def overwrite(carry, x):  # writes fresh logs, never reads the old ones
        return {"total": Log(x.sum()), "count": Log(jnp.int32(1))}, None

    last, _ = jax.lax.scan(overwrite, reset_logs(filled), xs)
    np.testing.assert_allclose(last["total"].data, xs[-1].sum(), rtol=1e-6)
    # A cleared carry has another structure than what the body returns: scan refuses it.
    with pytest.raises(TypeError, match="structure"):
        jax.lax.scan(overwrite, clear_logs(filled), xs)


def loss_with_logs(w, x, y):
    pred = jnp.tanh(x @ w)
    err = pred - y
    return jnp.mean(err**2), {"pred_norm": Log(jnp.linalg.norm(pred)), "err": Log(err)}


def reference_loss_grad(w, x, y):
    w, x, y = (a.astype(np.float64) for a in (w, x, y))
    pred = np.tanh(x @ w)
    err = pred - y
    grad = x.T @ (2 * err / err.size * (1 - pred**2))
    return np.mean(err**2), grad, np.linalg.norm(pred), err


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_grad_with_aux_logs_and_remat(rng, remat):
    w = rng.normal(size=3).astype(np.float32)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    y = rng.normal(size=8).astype(np.float32)
    fn = jax.checkpoint(loss_with_logs) if remat else loss_with_logs
    (loss, aux), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(w, x, y)
    ref_loss, ref_grad, ref_norm, ref_err = reference_loss_grad(w, x, y)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(aux["pred_norm"].data, ref_norm, rtol=1e-5)
    np.testing.assert_allclose(aux["err"].data, ref_err, rtol=1e-5, atol=1e-6)


def test_equinox_filter_jit_carries_logs_in_module_fields(rng):
    class Probe(eqx.Module):
        weight: jax.Array
        activation: Log

    w = rng.normal(size=(3, 3)).astype(np.float32)
    x = rng.normal(size=3).astype(np.float32)

    @eqx.filter_jit
    def forward(probe, v):
        h = probe.weight @ v
        return eqx.tree_at(lambda p: p.activation, probe, Log(jnp.abs(h).mean()))

    out = forward(Probe(jnp.asarray(w), Log(None)), x)
    np.testing.assert_allclose(list_of_logs(out)[0], np.abs(w @ x).mean(), rtol=1e-5)


def make_step(counter):
    @jax.jit
    def step(state):
        counter.append(1)  # runs once per trace, never at execution
        w, x = state["w"], state["x"]
        grad = 2 * (x @ w) * x
        return {
            "w": w - 0.1 * grad,
            "x": x,
            "logs": {"loss": Log((x @ w) ** 2), "grad": Log(grad, name="grad")},
        }

    return step


def initial_state(rng):
    return {
        "w": jnp.asarray(rng.normal(size=3), jnp.float32),
        "x": jnp.asarray(rng.normal(size=3), jnp.float32),
        "logs": {"loss": Log(jnp.zeros((), jnp.float32)), "grad": Log(jnp.zeros(3), name="grad")},
    }


def test_a_step_fed_its_own_reset_state_traces_once(rng):
    traces = []
    step = make_step(traces)
    state = initial_state(rng)
    w, x = np.asarray(state["w"], np.float64), np.asarray(state["x"], np.float64)
    for _ in range(4):
        state = step(reset_logs(state))
        np.testing.assert_allclose(state["logs"]["loss"].data, (x @ w) ** 2, rtol=1e-4)
        w = w - 0.1 * 2 * (x @ w) * x
    assert len(traces) == 1


def test_alternating_filled_and_cleared_inputs_trace_twice(rng):
    traces = []
    step = make_step(traces)
    state = step(initial_state(rng))
    state = step(clear_logs(state))
    state = step(clear_logs(state))
    assert len(traces) == 2


def canonical(jaxpr):
    """Equations and outputs with variables numbered by first appearance, for comparison."""
    numbers: dict = {}

    def name(v):
        if hasattr(v, "val"):  # a literal
            return repr(v.val)
        return numbers.setdefault(v, len(numbers))

    for v in jaxpr.invars:
        name(v)

    def param(value):
        # Sub-jaxprs print self-contained; other callables print with an address.
        bare = callable(value) and not hasattr(value, "eqns") and not hasattr(value, "jaxpr")
        return type(value).__name__ if bare else str(value)

    eqns = [
        (
            e.primitive.name,
            tuple(sorted((k, param(v)) for k, v in e.params.items())),
            tuple(map(name, e.invars)),
            tuple(map(name, e.outvars)),
        )
        for e in jaxpr.eqns
    ]
    return eqns, [name(v) for v in jaxpr.outvars]


def test_logs_add_nothing_to_the_jaxpr_but_outputs(rng):
    w = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)

    def body(w, x):
        h = jnp.tanh(x @ w)
        loss = jnp.mean(h**2)
        grad = jax.grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))(w)
        return w - 0.1 * grad, loss, jnp.max(jnp.abs(h))

    def without_logs(w, x):
        new_w, _, _ = body(w, x)
        return new_w

    def with_raw_outputs(w, x):
        new_w, loss, peak = body(w, x)
        return new_w, {"loss": loss, "peak": peak}

    def with_logs(w, x):
        new_w, loss, peak = body(w, x)
        return new_w, {"loss": Log(loss), "peak": Log(peak, name="act/peak")}

    plain = jax.make_jaxpr(without_logs)(w, x).jaxpr
    raw = jax.make_jaxpr(with_raw_outputs)(w, x).jaxpr
    logged = jax.make_jaxpr(with_logs)(w, x).jaxpr
    logged_eqns, logged_outs = canonical(logged)
    plain_eqns, plain_outs = canonical(plain)
    assert logged_eqns == plain_eqns
    assert logged_outs[:1] == plain_outs and len(logged_outs) == 3
    # Wrapping outputs in Logs is exactly returning them.
    assert str(logged) == str(raw)
