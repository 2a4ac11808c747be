"""Gradients of the custom VJP against float64 gradients and against ``jax.grad`` of
dense attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import masked_attention_via_map

GRADIENT_CASES = {
    "causal_gqa_odd": ((2, 37, 45, 4, 2, 8, 8), {"is_causal": True, "block_size": (8, 16)}),
    "window_dv": ((1, 40, 40, 2, 2, 8, 4), {"window_size": (5, 2), "block_size": 16}),
    "mask_fn_mqa": (
        (1, 33, 29, 3, 1, 8, 8),
        {"mask_fn": lambda b, h, q, k: (q * 3 + k + h) % 4 != 0, "block_size": 8},
    ),
    "prefix_lm_and_window": (
        (2, 48, 48, 2, 1, 8, 8),
        {"window_size": (12, None), "mask_fn": lambda b, h, q, k: (k <= q) | (k < 6)},
    ),
}


def _loss_and_cotangent(ref, shape, seed):
    batch, q_len, _, q_heads, _, _, dv = shape
    (weights,) = ref.qkv(seed, batch, q_len, 1, q_heads, 1, dv)[:1]
    return weights


@pytest.mark.parametrize("case", GRADIENT_CASES)
@pytest.mark.compat("case")
def test_gradients_match_float64_reference(ref, case):
    shape, options = GRADIENT_CASES[case]
    q, k, v = ref.qkv(20, *shape)
    weights = _loss_and_cotangent(ref, shape, 21)

    def loss(q, k, v):
        return jnp.sum(masked_attention_via_map(q, k, v, **options) * weights)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    expected = ref.gradients(q, k, v, ref.mask_for(shape, options), weights)
    for name, got, want in zip("QKV", grads, expected, strict=True):
        assert got.shape == want.shape and got.dtype == jnp.float32, name
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=f"d{name}")


def test_gradients_match_jax_grad_of_dense_attention(ref):
    q, k, v = ref.qkv(22, 2, 64, 64, 4, 2, 16)
    weights = ref.qkv(23, 2, 64, 64, 4, 2, 16)[0]

    def loss(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v) * weights)

    ours = jax.grad(
        loss(lambda q, k, v: masked_attention_via_map(q, k, v, is_causal=True, block_size=16)),
        argnums=(0, 1, 2),
    )(q, k, v)
    dense = jax.grad(
        loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)),
        argnums=(0, 1, 2),
    )(q, k, v)
    for got, want in zip(ours, dense, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_rows_without_visible_keys_get_zero_gradients(ref):
    q, k, v = ref.qkv(24, 1, 24, 24, 2, 2, 8)

    def mask_fn(b, h, q, k):
        return (q % 3 != 0) & (k >= q)

    def loss(q, k, v):
        return jnp.sum(masked_attention_via_map(q, k, v, mask_fn=mask_fn, block_size=8) ** 2)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(grads[0][:, ::3], 0.0)
    out = masked_attention_via_map(q, k, v, mask_fn=mask_fn, block_size=8)
    expected = ref.gradients(q, k, v, ref.mask(1, 2, 24, 24, mask_fn=mask_fn), 2 * out)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_low_precision_gradients(ref, dtype):
    q, k, v = ref.qkv(25, 1, 40, 40, 2, 1, 16, dtype=dtype)
    weights = ref.qkv(26, 1, 40, 40, 2, 1, 16)[0]

    def loss(q, k, v):
        out = masked_attention_via_map(q, k, v, is_causal=True, block_size=16)
        return jnp.sum(out.astype(jnp.float32) * weights)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    expected = ref.gradients(q, k, v, ref.mask(1, 2, 40, 40, is_causal=True), weights)
    tolerance = 5e-2 if dtype == jnp.bfloat16 else 5e-3
    for got, want, x in zip(grads, expected, (q, k, v), strict=True):
        assert got.dtype == x.dtype
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tolerance)


def test_large_logit_gradients_are_finite(ref):
    q, k, v = ref.qkv(27, 1, 32, 32, 2, 2, 16)
    q, k = q * 100.0, k * 100.0

    def loss(q, k, v):
        return jnp.sum(masked_attention_via_map(q, k, v, is_causal=True, block_size=8) ** 2)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    out = masked_attention_via_map(q, k, v, is_causal=True, block_size=8)
    expected = ref.gradients(q, k, v, ref.mask(1, 2, 32, 32, is_causal=True), 2 * out)
    for got, want in zip(grads, expected, strict=True):
        assert np.isfinite(np.asarray(got)).all()
        scale = np.abs(want).max() + 1.0
        np.testing.assert_allclose(got, want, atol=2e-3 * scale)
