"""emit/collect inside a jitted training step: block-wise attention (a custom VJP),
layers under ``lax.scan``, per-token code under ``fancy_vmap``, all emitting from inside.

The reference is the same step with every value threaded out by hand: the per-token
function returns its statistic next to its output, the layer returns both as scan
outputs, the loss returns them as auxiliary output.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import masked_attention_via_map
from jaxmodules.logstate import collect, emit, fetch_logs, scope
from jaxmodules.vectorize import fancy_vmap

# Skipped only where collect is documented not to run: on a jax >= 0.8 where it does not,
# these fail.
JAX_VERSION = tuple(int(part) for part in jax.__version__.split(".")[:2])
pytestmark = pytest.mark.skipif(JAX_VERSION < (0, 8), reason="collect needs jax 0.8 or newer")

B, T, D, H, LAYERS, VOCAB = 3, 16, 16, 2, 3, 11


def init(key: jax.Array) -> dict[str, jax.Array]:
    k = jax.random.split(key, 4)
    return {
        "embed": 0.3 * jax.random.normal(k[0], (VOCAB, D)),
        # Layer parameters stacked on a leading axis: the scan runs over it.
        "wqkv": jax.random.normal(k[1], (LAYERS, D, 3, H, D // H)) / math.sqrt(D),
        "wo": jax.random.normal(k[2], (LAYERS, H, D // H, D)) / math.sqrt(D),
        "w_tok": jax.random.normal(k[3], (LAYERS, D, D)) / math.sqrt(D),
    }


def token_mlp(x: jax.Array, w: jax.Array) -> jax.Array:
    """One token: (D,) -> (D,), and its hidden norm is worth watching."""
    h = jax.nn.gelu(x @ w)
    emit("token_hidden_norm", jnp.linalg.norm(h))
    return h


def token_mlp_by_hand(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = jax.nn.gelu(x @ w)
    return h, jnp.linalg.norm(h)


per_token = fancy_vmap(token_mlp, "b t :, : : -> b t :")
per_token_by_hand = fancy_vmap(token_mlp_by_hand, "b t :, : : -> b t :, b t")


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    picked = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return jax.nn.logsumexp(logits, -1) - picked


def attention(x: jax.Array, wqkv: jax.Array, wo: jax.Array) -> jax.Array:
    q, k, v = jnp.einsum("btd,dshe->sbthe", x, wqkv)
    out = masked_attention_via_map(q, k, v, is_causal=True, block_size=8)
    return jnp.einsum("bthe,hed->btd", out, wo)


def loss_emitting(params: dict[str, jax.Array], tokens: jax.Array) -> jax.Array:
    def layer(x: jax.Array, p: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        wqkv, wo, w_tok = p
        a = attention(x, wqkv, wo)
        emit("attn_out_norm", jnp.mean(jnp.linalg.norm(a, axis=-1)))
        x = x + a
        x = x + per_token(x, w_tok)
        return x, None

    x = params["embed"][tokens[:, :-1]]
    with scope("layers"):
        x, _ = jax.lax.scan(layer, x, (params["wqkv"], params["wo"], params["w_tok"]))
    logits = x @ params["embed"].T
    nll = token_nll(logits, tokens[:, 1:])
    emit("per_example_loss", jnp.mean(nll, axis=1))
    return jnp.mean(nll)


def loss_by_hand(
    params: dict[str, jax.Array], tokens: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    def layer(x: jax.Array, p: tuple[jax.Array, ...]) -> tuple[jax.Array, Any]:
        wqkv, wo, w_tok = p
        a = attention(x, wqkv, wo)
        norm = jnp.mean(jnp.linalg.norm(a, axis=-1))
        x = x + a
        h, token_norms = per_token_by_hand(x, w_tok)
        return x + h, (norm, token_norms)

    x = params["embed"][tokens[:, :-1]]
    x, (norms, token_norms) = jax.lax.scan(
        layer, x, (params["wqkv"], params["wo"], params["w_tok"])
    )
    logits = x @ params["embed"].T
    nll = token_nll(logits, tokens[:, 1:])
    aux = {
        "layers.attn_out_norm": norms,
        "layers.token_hidden_norm": token_norms,
        "per_example_loss": jnp.mean(nll, axis=1),
    }
    return jnp.mean(nll), aux


def sgd_step(params: Any, grads: Any) -> Any:
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)


def test_a_jitted_step_collects_per_layer_values_from_inside_the_layers() -> None:
    params = init(jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (B, T + 1)), jnp.int32)

    traces = []

    @jax.jit
    def step(params: Any, tokens: jax.Array) -> Any:
        traces.append(1)
        (loss, logs), grads = jax.value_and_grad(collect(loss_emitting), has_aux=True)(
            params, tokens
        )
        return sgd_step(params, grads), loss, logs

    @jax.jit
    def step_by_hand(params: Any, tokens: jax.Array) -> Any:
        (loss, aux), grads = jax.value_and_grad(loss_by_hand, has_aux=True)(params, tokens)
        return sgd_step(params, grads), loss, aux

    state, state_ref = params, params
    for _ in range(2):
        state, loss, logs = step(state, tokens)
        state_ref, loss_ref, aux = step_by_hand(state_ref, tokens)
        np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
        for name in state:
            np.testing.assert_allclose(state[name], state_ref[name], rtol=1e-5, atol=1e-7)
        assert list(logs) == [
            "layers.attn_out_norm",
            "layers.token_hidden_norm",
            "per_example_loss",
        ]
        # One value per layer; per layer, example and token for the per-token function.
        assert logs["layers.attn_out_norm"].data.shape == (LAYERS,)
        assert logs["layers.token_hidden_norm"].data.shape == (LAYERS, B, T)
        assert logs["per_example_loss"].data.shape == (B,)
        for name, want in aux.items():
            np.testing.assert_allclose(logs[name].data, want, rtol=1e-5, err_msg=name)
    assert len(traces) == 1
    fetched = fetch_logs(logs)
    assert set(fetched) == set(aux)
    assert all(np.all(np.isfinite(v)) for v in fetched.values())

    # collect outside the gradient: the forward values, and the same update.
    @jax.jit
    def step_outside(params: Any, tokens: jax.Array) -> Any:
        (loss, grads), logs = collect(jax.value_and_grad(loss_emitting))(params, tokens)
        return sgd_step(params, grads), loss, logs

    new, loss, logs = step_outside(params, tokens)
    new_ref, loss_ref, aux = step_by_hand(params, tokens)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    for name in new:
        np.testing.assert_allclose(new[name], new_ref[name], rtol=1e-5, atol=1e-7)
    for name, want in aux.items():
        np.testing.assert_allclose(logs[name].data, want, rtol=1e-5, err_msg=name)


def test_the_demo_step_reports_through_emit_and_collect(tiny_lm: Any) -> None:
    config = tiny_lm.Config(vocab_size=11, seq_len=16, d_model=16, n_heads=2, block_size=8)
    params = tiny_lm.init_params(config, jax.random.key(1))
    batch = jnp.asarray(np.random.default_rng(1).integers(0, 11, (2, 17)), jnp.int32)
    (loss, _), logs = jax.jit(collect(lambda p, b: tiny_lm.loss_fn(p, b, config)))(params, batch)
    assert list(logs) == [
        f"model.layers.{i}.attn.{stat}" for i in range(2) for stat in ("out_norm", "entropy")
    ]
    # Outside collect the model's emits do nothing: the same loss, no logs anywhere.
    plain, extras = jax.jit(lambda p, b: tiny_lm.loss_fn(p, b, config))(params, batch)
    np.testing.assert_allclose(loss, plain, rtol=1e-6)
    assert extras == {"layers": [{"attn": {}}, {"attn": {}}]}
    assert all(np.isfinite(float(log.data)) for log in logs.values())
