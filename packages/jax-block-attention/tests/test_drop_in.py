"""``dot_product_attention`` against ``jax.nn.dot_product_attention`` for every argument."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import dot_product_attention

B, T, S, N, K, H = 2, 33, 41, 4, 2, 16


def _inputs(seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(keys[0], (B, T, N, H))
    k = jax.random.normal(keys[1], (B, S, K, H))
    v = jax.random.normal(keys[2], (B, S, K, H))
    bias = jax.random.normal(keys[3], (B, N, T, S))
    mask = jax.random.bernoulli(keys[4], 0.8, (B, 1, T, S))
    return q, k, v, bias, mask


CASES = {
    "plain": {},
    "bias": {"bias": "full"},
    "bias_broadcast": {"bias": "per_key"},
    "mask": {"mask": True},
    "causal": {"is_causal": True},
    "scale": {"scale": 0.3},
    "lengths": {
        "query_seq_lengths": jnp.array([T, 20]),
        "key_value_seq_lengths": jnp.array([30, S]),
        "is_causal": True,
    },
    "window": {"local_window_size": (6, 2)},
    "window_int": {"local_window_size": 5},
    "causal_window_bias_mask": {
        "is_causal": True,
        "local_window_size": (9, 0),
        "bias": "full",
        "mask": True,
    },
}


def _arguments(case, bias, mask):
    options = dict(CASES[case])
    if options.get("bias") == "full":
        options["bias"] = bias
    elif options.get("bias") == "per_key":
        options["bias"] = bias[:1, :, :1]
    if options.get("mask"):
        # Keep every row's first visible key so no row is empty (the documented difference).
        options["mask"] = mask.at[..., 0].set(True)
    return options


def _visible_rows(options):
    """Query rows that see at least one key (jax.nn differs only on the others)."""
    rows = np.ones((B, T), bool)
    if "query_seq_lengths" in options:
        rows &= np.arange(T)[None] < np.asarray(options["query_seq_lengths"])[:, None]
    return rows


def _jax_nn_ignores_windows() -> bool:
    """Older jax.nn.dot_product_attention accepts local_window_size but its XLA path
    ignores it; those cases are then checked against the float64 reference elsewhere."""
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 1, 4))
    windowed = jax.nn.dot_product_attention(q, q, q, local_window_size=(1, 1))
    return bool(jnp.allclose(windowed, jax.nn.dot_product_attention(q, q, q)))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.compat("case")
def test_matches_jax_nn_forward_and_gradients(case):
    if "local_window_size" in CASES[case] and _jax_nn_ignores_windows():
        pytest.skip("this jax.nn.dot_product_attention ignores local_window_size")
    q, k, v, bias, mask = _inputs(sum(map(ord, case)))
    options = _arguments(case, bias, mask)
    rows = _visible_rows(options)
    w = jax.random.normal(jax.random.PRNGKey(7), (B, T, N, H)) * rows[:, :, None, None]

    def loss(fn):
        def run(q, k, v, b):
            kw = dict(options)
            if b is not None:
                kw["bias"] = b
            return jnp.sum(fn(q, k, v, **kw) * w)

        return run

    b = options.pop("bias", None)
    ours = dot_product_attention(q, k, v, bias=b, **options)
    theirs = jax.nn.dot_product_attention(q, k, v, bias=b, **options)
    np.testing.assert_allclose(
        np.asarray(ours)[rows], np.asarray(theirs)[rows], atol=2e-5, rtol=1e-4
    )
    argnums = (0, 1, 2, 3) if b is not None else (0, 1, 2)
    g_ours = jax.grad(loss(dot_product_attention), argnums=argnums)(q, k, v, b)
    g_theirs = jax.grad(loss(jax.nn.dot_product_attention), argnums=argnums)(q, k, v, b)
    for name, got, want in zip("QKVB", g_ours, g_theirs, strict=False):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=2e-4, err_msg=f"d{name}")


def test_three_dimensional_inputs():
    q, k, v, bias, _ = _inputs(3)
    ours = dot_product_attention(q[0], k[0], v[0], bias[0], is_causal=True)
    theirs = jax.nn.dot_product_attention(q[0], k[0], v[0], bias[0], is_causal=True)
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-4)


@pytest.mark.compat
def test_rows_with_nothing_visible_give_zero_where_jax_nn_gives_the_mean():
    q, k, v, _, _ = _inputs(4)
    lengths = jnp.array([T, 10])
    ours = dot_product_attention(q, k, v, query_seq_lengths=lengths)
    assert not np.asarray(ours[1, 10:]).any()


@pytest.mark.compat
def test_same_signature_as_jax_nn():
    ours = inspect.signature(dot_product_attention)
    theirs = inspect.signature(jax.nn.dot_product_attention)
    # Older jax lacks return_residual; every parameter it has, ours has, in order.
    assert [p for p in ours.parameters if p in theirs.parameters] == list(theirs.parameters)
    for name, parameter in theirs.parameters.items():
        assert ours.parameters[name].kind == parameter.kind, name
        assert ours.parameters[name].default == parameter.default, name


@pytest.mark.compat
def test_unknown_implementation_is_an_error():
    q, k, v, _, _ = _inputs(5)
    with pytest.raises(ValueError, match=r"implementation must be .* got 'fast'"):
        dot_product_attention(q, k, v, implementation="fast")


@pytest.mark.compat
def test_residual_is_the_log_sum_exp_like_jax_nn():
    q, k, v, bias, _ = _inputs(6)
    if "return_residual" not in inspect.signature(jax.nn.dot_product_attention).parameters:
        pytest.skip("this jax.nn.dot_product_attention has no return_residual")
    out, lse = dot_product_attention(q, k, v, bias, is_causal=True, return_residual=True)
    ref_out, ref_lse = jax.nn.dot_product_attention(
        q, k, v, bias, is_causal=True, return_residual=True
    )
    assert lse.shape == ref_lse.shape == (B, T, N)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=1e-5)
