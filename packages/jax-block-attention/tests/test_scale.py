"""``scale`` as an array: concrete or traced, on every entry point and both backends,
with the gradient ``jax.nn.dot_product_attention`` and a float64 reference give it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import (
    dot_product_attention,
    flex,
    masked_attention_via_map,
    ring_attention,
)

IMPLEMENTATIONS = ["xla", "triton"]


def _qkv(ref, dtype=jnp.float32):
    return ref.qkv(0, 2, 32, 48, 4, 2, 16, dtype=dtype)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.compat
def test_concrete_array_scale_equals_the_float(ref, implementation):
    q, k, v = _qkv(ref)
    kw = {"is_causal": True, "block_size": 16, "implementation": implementation}
    as_float = masked_attention_via_map(q, k, v, scale=0.3, **kw)
    for scale in (jnp.float32(0.3), jnp.asarray(0.3, jnp.bfloat16).astype(jnp.float32)):
        out = masked_attention_via_map(q, k, v, scale=scale, **kw)
        expected = masked_attention_via_map(q, k, v, scale=float(scale), **kw)
        np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(
        masked_attention_via_map(q, k, v, scale=jnp.float32(0.3), **kw), as_float
    )


@pytest.mark.compat
def test_the_usual_spelling_inside_jit(ref):
    """``scale=1 / jnp.sqrt(d)`` is traced inside ``jit``; d = 16 makes it exact."""
    q, k, v = _qkv(ref)

    @jax.jit
    def attend(q, k, v):
        return masked_attention_via_map(q, k, v, is_causal=True, scale=1 / jnp.sqrt(16.0))

    expected = masked_attention_via_map(q, k, v, is_causal=True)
    np.testing.assert_allclose(attend(q, k, v), expected, atol=1e-6, rtol=1e-6)


def _loss_weights(ref, shape):
    return jnp.asarray(np.random.default_rng(5).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_traced_scale_gradient_matches_jax_nn(ref, implementation):
    q, k, v = _qkv(ref)
    w = _loss_weights(ref, q.shape)

    def ours(scale, q, k, v):
        out = masked_attention_via_map(
            q, k, v, is_causal=True, scale=scale, block_size=16, implementation=implementation
        )
        return jnp.sum(out * w)

    def theirs(scale, q, k, v):
        return jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale) * w)

    scale = jnp.float32(0.41)
    got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2, 3)))(scale, q, k, v)
    expected = jax.value_and_grad(theirs, argnums=(0, 1, 2, 3))(scale, q, k, v)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
    for name, a, b in zip(("scale", "q", "k", "v"), got[1], expected[1], strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=f"d{name}")


def test_drop_in_traced_scale_gradient_matches_jax_nn(ref):
    q, k, v = _qkv(ref)
    bias = jnp.asarray(np.random.default_rng(3).standard_normal((1, 4, 32, 48)), jnp.float32)
    w = _loss_weights(ref, q.shape)

    # Older jax.nn ignores local_window_size: its reference gets the window as a mask.
    qi, ki = np.arange(q.shape[1])[:, None], np.arange(k.shape[1])[None, :]
    window = jnp.asarray((ki >= qi - 8) & (ki <= qi + 4))[None, None]

    def loss(scale, **options):
        return jnp.sum(options.pop("attention")(q, k, v, bias, scale=scale, **options) * w)

    scale = jnp.float32(0.2)
    got = jax.grad(lambda s: loss(s, attention=dot_product_attention, local_window_size=(8, 4)))(
        scale
    )
    expected = jax.grad(lambda s: loss(s, attention=jax.nn.dot_product_attention, mask=window))(
        scale
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_traced_scale_gradient_matches_float64(ref, implementation):
    """Scale, Q, K, V and ALiBi slopes together, against ``dense_variants`` in float64."""
    q, k, v = _qkv(ref)
    slopes = jnp.asarray(2.0 ** -np.arange(1, 5), jnp.float32)
    mask = ref.mask(2, 4, 32, 48, is_causal=True, window=(None, 3))
    w = _loss_weights(ref, q.shape)
    arrays = {"scale": jnp.float32(0.33), "q": q, "k": k, "v": v, "slopes": slopes}

    def ours(a):
        out = masked_attention_via_map(
            a["q"],
            a["k"],
            a["v"],
            is_causal=True,
            scale=a["scale"],
            score_mod=ref.alibi(a["slopes"]),
            block_size=16,
            implementation=implementation,
        )
        return jnp.sum(out * w)

    def theirs(a):
        out, _ = ref.dense(
            a["q"], a["k"], a["v"], mask, scale=a["scale"], score_mod=ref.alibi(a["slopes"])
        )
        return jnp.sum(out * w)

    grads = jax.grad(ours)(arrays)
    with ref.float64():
        grads64 = jax.grad(theirs)({n: jnp.asarray(x, jnp.float64) for n, x in arrays.items()})
    for name in arrays:
        np.testing.assert_allclose(
            grads[name], np.asarray(grads64[name]), atol=5e-5, rtol=1e-4, err_msg=f"d{name}"
        )


def test_bfloat16_traced_scale_within_the_bfloat16_tolerance(ref):
    """Folding a traced scale into bfloat16 queries rounds ``q * scale`` once more; the
    result stays as close to float64 as the float scale's and within the bfloat16
    tolerance of the other tests."""
    q, k, v = _qkv(ref, jnp.bfloat16)
    mask = ref.mask(2, 4, 32, 48, is_causal=True)
    scale = 0.3

    def run(s):
        return masked_attention_via_map(q, k, v, is_causal=True, scale=s, return_lse=True)

    static = run(scale)
    traced = jax.jit(run)(jnp.float32(scale))
    with ref.float64():
        out64, lse64 = (np.asarray(x) for x in ref.dense(q, k, v, mask, scale=scale))
    errors = {}
    for name, (out, lse) in (("static", static), ("traced", traced)):
        assert out.dtype == jnp.bfloat16
        errors[name] = float(np.abs(np.asarray(out, np.float32) - out64).max())
        np.testing.assert_allclose(np.asarray(out, np.float32), out64, atol=3e-2, rtol=3e-2)
        np.testing.assert_allclose(lse, lse64, atol=2e-2, rtol=1e-2)
    assert errors["traced"] <= 2 * errors["static"] + 1e-2, errors

    w = _loss_weights(ref, q.shape)
    d_scale = jax.grad(lambda s: jnp.sum(run(s)[0].astype(jnp.float32) * w))(jnp.float32(scale))

    def dense_loss(s):
        return jnp.sum(ref.dense(q, k, v, mask, scale=s)[0] * w)

    with ref.float64():
        d_scale64 = jax.grad(dense_loss)(jnp.float64(scale))
    np.testing.assert_allclose(d_scale, d_scale64, rtol=3e-2)


def test_vmapped_scale(ref):
    """A per-example temperature under ``vmap`` is a batched traced scale."""
    q, k, v = _qkv(ref)
    scales = jnp.asarray([0.1, 0.25, 0.6], jnp.float32)
    batched = jax.vmap(lambda s: masked_attention_via_map(q, k, v, is_causal=True, scale=s))(scales)
    for i, s in enumerate(scales):
        expected = masked_attention_via_map(q, k, v, is_causal=True, scale=float(s))
        np.testing.assert_allclose(batched[i], expected, atol=1e-6, rtol=1e-5)


def test_flex_traced_scale_gradient_matches_jax_nn(ref):
    q, k, v = (x.swapaxes(1, 2) for x in _qkv(ref))  # (B, H, L, E)
    block_mask = flex.create_block_mask(
        lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 32, 48, BLOCK_SIZE=16
    )

    def ours(scale):
        out = flex.flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
        return jnp.sum(jnp.sin(out))

    def theirs(scale):
        out = jax.nn.dot_product_attention(
            q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), is_causal=True, scale=scale
        )
        return jnp.sum(jnp.sin(out.swapaxes(1, 2)))

    scale = jnp.float32(0.27)
    np.testing.assert_allclose(jax.grad(ours)(scale), jax.grad(theirs)(scale), rtol=1e-4)


def test_ring_traced_scale_gradient_matches_jax_nn(ref):
    """One device: the ring's entry, shard_map and VJP, with natural order = zigzag."""
    q, k, v = ref.qkv(1, 1, 32, 32, 4, 2, 16)
    mesh = jax.make_mesh((1,), ("seq",))

    def ours(scale, q):
        out = ring_attention(q, k, v, mesh=mesh, seq_axis="seq", is_causal=True, scale=scale)
        return jnp.sum(jnp.sin(out))

    def theirs(scale, q):
        return jnp.sum(jnp.sin(jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale)))

    scale = jnp.float32(0.3)
    got = jax.grad(ours, argnums=(0, 1))(scale, q)
    expected = jax.grad(theirs, argnums=(0, 1))(scale, q)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-4)
    np.testing.assert_allclose(got[1], expected[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "scale, error, words",
    [
        (jnp.ones(2), TypeError, "scalar"),
        (np.ones((1,)), TypeError, "scalar"),
        (jnp.int32(2), TypeError, "floating"),
        (True, TypeError, "real number"),
        ("0.5", TypeError, "real number"),
        (jnp.float32(np.inf), ValueError, "finite"),
    ],
)
@pytest.mark.compat
def test_bad_scales(ref, scale, error, words):
    q, k, v = _qkv(ref)
    with pytest.raises(error, match=words):
        masked_attention_via_map(q, k, v, scale=scale)
    with pytest.raises(error, match=words):
        dot_product_attention(q, k, v, scale=scale)


@pytest.mark.compat
def test_bad_traced_scales(ref):
    q, k, v = _qkv(ref)
    with pytest.raises(TypeError, match="floating"):
        jax.jit(lambda s: masked_attention_via_map(q, k, v, scale=s))(jnp.int32(2))
    with pytest.raises(TypeError, match="scalar"):
        jax.jit(lambda s: masked_attention_via_map(q, k, v, scale=s))(jnp.ones(3))
