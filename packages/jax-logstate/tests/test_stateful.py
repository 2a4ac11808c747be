"""Stateful code under `collect`: every update lands where it would without `collect`.

Each way of placing `collect` in a flax.nnx training loop is run for several steps on
random data next to the same loop without `collect`; losses, parameters, optimizer state
and random streams must agree, and the logs must hold the values the layers also hand
back by hand. Plain Python objects and containers updated in place are refused on the
first call, with a message that says what to do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.logstate import collect, emit, scope

# Skipped only where collect is documented not to run; on a jax >= 0.8 where it does not,
# every test fails (and test_collect_contract says why).
JAX_VERSION = tuple(int(part) for part in jax.__version__.split(".")[:2])
pytestmark = pytest.mark.skipif(JAX_VERSION < (0, 8), reason="collect needs jax 0.8 or newer")

nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")
if not hasattr(nnx, "Optimizer") or not hasattr(nnx, "Pytree"):  # pragma: no cover
    pytest.skip("needs flax 0.12 or newer (nnx.Pytree, Optimizer.update(model, grads))")

STEPS = 3
D = 8

# Values the layers emit are also appended here while a reference step runs, so the
# reference returns them by hand; None when nothing records.
_RECORD: list[list[jax.Array]] = []


def record(name: str, value: jax.Array) -> None:
    emit(name, value)
    if _RECORD:
        _RECORD[-1].append(value)


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.linear = nnx.Linear(D, D, rngs=rngs)
        self.dropout = nnx.Dropout(0.3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.dropout(jax.nn.gelu(self.linear(x)))
        record("out_norm", jnp.mean(jnp.linalg.norm(y, axis=-1)))
        return x + y


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])
        self.head = nnx.Linear(D, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, block in enumerate(self.blocks):
            with scope(f"blocks.{i}"):
                x = block(x)
        return self.head(x)[..., 0]


def make(seed: int = 0) -> tuple[Model, nnx.Optimizer]:
    model = Model(nnx.Rngs(params=seed, dropout=seed + 1))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


def batches(n: int = STEPS) -> list[tuple[jax.Array, jax.Array]]:
    rng = np.random.default_rng(5)
    return [
        (
            jnp.asarray(rng.normal(size=(6, D)), jnp.float32),
            jnp.asarray(rng.normal(size=(6,)), jnp.float32),
        )
        for _ in range(n)
    ]


def mse(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((model(x) - y) ** 2)


def mse_by_hand(model: nnx.Module, x: jax.Array, y: jax.Array) -> tuple[jax.Array, list]:
    _RECORD.append([])
    try:
        return mse(model, x, y), _RECORD[-1]
    finally:
        _RECORD.pop()


def assert_same_state(a: nnx.Module, b: nnx.Module) -> None:
    sa, sb = jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb, strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6)


def assert_logs(logs: dict, by_hand: list) -> None:
    assert list(logs) == ["blocks.0.out_norm", "blocks.1.out_norm"]
    for log, want in zip(logs.values(), by_hand, strict=True):
        np.testing.assert_allclose(log.data, want, rtol=2e-5, atol=1e-6)


def counters(model: Model) -> list[int]:
    return [int(b.dropout.rngs.count[...]) for b in model.blocks]


# ------------------------------------------------------------------- the nnx patterns


def test_value_and_grad_of_collect_inside_nnx_jit_advances_the_dropout_stream():
    @nnx.jit
    def step_ref(model, optimizer, x, y):
        (loss, by_hand), grads = nnx.value_and_grad(mse_by_hand, has_aux=True)(model, x, y)
        optimizer.update(model, grads)
        return loss, by_hand

    @nnx.jit
    def step(model, optimizer, x, y):
        (loss, logs), grads = nnx.value_and_grad(collect(mse), has_aux=True)(model, x, y)
        optimizer.update(model, grads)
        return loss, logs

    (m_ref, o_ref), (m, o) = make(), make()
    for x, y in batches():
        loss_ref, by_hand = step_ref(m_ref, o_ref, x, y)
        loss, logs = step(m, o, x, y)
        np.testing.assert_allclose(loss, loss_ref, rtol=2e-5)
        assert_logs(logs, by_hand)
    assert counters(m) == counters(m_ref) == [STEPS, STEPS]
    assert_same_state(m, m_ref)
    assert_same_state(o, o_ref)


def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(mse)(model, x, y)
    optimizer.update(model, grads)
    return loss


@pytest.mark.parametrize("jit", [True, False], ids=["nnx.jit", "eager"])
def test_a_step_updating_model_and_optimizer_in_place_trains_as_without_collect(jit):
    wrap = nnx.jit if jit else (lambda f: f)
    step_ref, step = wrap(train_step), wrap(collect(train_step))
    (m_ref, o_ref), (m, o) = make(), make()
    before = jax.tree.leaves(nnx.state(m, nnx.Param))
    for x, y in batches(STEPS if jit else 2):
        loss_ref = step_ref(m_ref, o_ref, x, y)
        loss, logs = step(m, o, x, y)
        np.testing.assert_allclose(loss, loss_ref, rtol=2e-5)
        assert list(logs) == ["blocks.0.out_norm", "blocks.1.out_norm"]
    after = jax.tree.leaves(nnx.state(m, nnx.Param))
    assert not any(np.allclose(a, b) for a, b in zip(before, after, strict=True))
    assert int(o.step[...]) == int(o_ref.step[...]) == (STEPS if jit else 2)
    assert_same_state(m, m_ref)
    assert_same_state(o, o_ref)


class ScanBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.linear = nnx.Linear(D, D, rngs=rngs)
        self.dropout = nnx.Dropout(0.3, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        y = self.dropout(jax.nn.gelu(self.linear(x)))
        norm = jnp.mean(jnp.linalg.norm(y, axis=-1))
        emit("out_norm", norm)
        return x + y, norm


class ScanModel(nnx.Module):
    """Layers stacked on a leading axis and run by nnx.scan, each with its dropout stream."""

    def __init__(self, seed: int) -> None:
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs: nnx.Rngs) -> ScanBlock:
            return ScanBlock(rngs)

        self.blocks = create(nnx.Rngs(params=seed, dropout=seed + 1))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
        def forward(block: ScanBlock, x: jax.Array) -> tuple[jax.Array, jax.Array]:
            return block(x)

        with scope("blocks"):
            x, norms = forward(self.blocks, x)
        return jnp.mean(x, axis=-1), norms


def scan_loss(model, x, y):
    pred, norms = model(x)
    return jnp.mean((pred - y) ** 2), norms


def test_nnx_scan_over_stacked_layers_with_emits_in_the_body():
    def step(model, optimizer, x, y):
        (loss, norms), grads = nnx.value_and_grad(scan_loss, has_aux=True)(model, x, y)
        optimizer.update(model, grads)
        return loss, norms

    step_ref, step_collected = nnx.jit(step), nnx.jit(collect(step))
    models = [ScanModel(0), ScanModel(0)]
    opts = [nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param) for m in models]
    for x, y in batches():
        loss_ref, norms = step_ref(models[0], opts[0], x, y)
        (loss, _), logs = step_collected(models[1], opts[1], x, y)
        np.testing.assert_allclose(loss, loss_ref, rtol=2e-5)
        assert list(logs) == ["blocks.out_norm"] and logs["blocks.out_norm"].data.shape == (3,)
        np.testing.assert_allclose(logs["blocks.out_norm"].data, norms, rtol=2e-5)
    count = models[1].blocks.dropout.rngs.count[...]
    np.testing.assert_array_equal(count, models[0].blocks.dropout.rngs.count[...])
    assert np.all(np.asarray(count) == STEPS)
    assert_same_state(models[1], models[0])


def test_split_merge_and_jax_jit_of_a_pure_step():
    graphdef, state = nnx.split(make()[0])

    def pure_step(state, x, y):
        model = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(mse)(model, x, y)
        nnx.update(
            model, jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(model, nnx.Param), grads)
        )
        return nnx.state(model), loss

    step_ref, step = jax.jit(pure_step), jax.jit(collect(pure_step))
    s_ref = s = state
    for x, y in batches():
        s_ref, loss_ref = step_ref(s_ref, x, y)
        (s, loss), logs = step(s, x, y)
        np.testing.assert_allclose(loss, loss_ref, rtol=2e-5)
        assert len(logs) == 2
    assert_same_state(nnx.merge(graphdef, s), nnx.merge(graphdef, s_ref))


def test_jax_jit_of_collect_of_value_and_grad_of_a_functional_loss():
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(D, D)), jnp.float32), "b": jnp.zeros(D)}

    def loss(params, key, x, y):
        h = jnp.tanh(x @ params["w"] + params["b"])
        keep = jax.random.bernoulli(key, 0.7, h.shape)
        h = jnp.where(keep, h / 0.7, 0.0)
        emit("h_norm", jnp.linalg.norm(h))
        return jnp.mean((h.sum(-1) - y) ** 2)

    ref = jax.jit(jax.value_and_grad(loss))
    step = jax.jit(collect(jax.value_and_grad(loss)))
    p_ref = p = params
    key = jax.random.key(0)
    for x, y in batches():
        key, sub = jax.random.split(key)
        loss_ref, g_ref = ref(p_ref, sub, x, y)
        (value, g), logs = step(p, sub, x, y)
        np.testing.assert_allclose(value, loss_ref, rtol=2e-5)
        p_ref = jax.tree.map(lambda a, b: a - 0.1 * b, p_ref, g_ref)
        p = jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
        assert logs["h_norm"].data.shape == ()
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_a_structure_change_of_an_nnx_argument_is_refused():
    model, _ = make()

    def f(model, x):
        model.extra = nnx.Variable(jnp.sum(x))
        return mse(model, x, x[:, 0])

    with pytest.raises(ValueError, match=r"collect\(.*f\): the call changed the structure"):
        collect(f)(model, batches(1)[0][0])
