"""Forward values against the dense float64 reference, for every kind of mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import masked_attention_via_map

SEGMENTS = jnp.asarray(np.repeat(np.arange(5), [9, 14, 3, 20, 30])[:64])


def _document(b, h, q, k):
    return SEGMENTS[q] == SEGMENTS[k]


MASKS = {
    "none": {},
    "causal": {"is_causal": True},
    "window": {"window_size": (5, 3)},
    "window_int": {"window_size": 4},
    "window_left_only": {"window_size": (7, None)},
    "window_right_only": {"window_size": (None, 2)},
    "causal_window": {"is_causal": True, "window_size": (6, 0)},
    "mask_fn": {"mask_fn": lambda b, h, q, k: (q + 2 * k + h + b) % 5 != 1},
    "mask_fn_3_args": {"mask_fn": lambda h, q, k: (q - k + h) % 3 != 2},
    "mask_fn_and_causal": {"is_causal": True, "mask_fn": lambda b, h, q, k: (k % 4) != b},
    "mask_fn_and_window": {"window_size": (9, 9), "mask_fn": lambda b, h, q, k: (q + k) % 2 == 0},
    "prefix_lm": {"mask_fn": lambda b, h, q, k: (k <= q) | (k < 11)},
    "document": {"is_causal": True, "mask_fn": _document},
}

SHAPES = {
    # batch, Lq, Lk, Hq, Hkv, d, dv, block_size
    "gqa_odd_lengths": (2, 37, 53, 4, 2, 8, 8, (8, 16)),
    "square_dv": (1, 64, 64, 3, 3, 16, 8, None),
    "mqa_long_keys": (1, 21, 64, 6, 1, 8, 8, 16),
}


# Every mask once, the shapes taking turns, keeps the number of compilations small.
CASES = [(mask, list(SHAPES)[n % len(SHAPES)]) for n, mask in enumerate(MASKS)]
CASES += [("causal", "square_dv"), ("mask_fn", "mqa_long_keys"), ("window", "mqa_long_keys")]


@pytest.mark.parametrize(("mask_name", "shape_name"), CASES)
@pytest.mark.compat("mask_name")
def test_matches_dense_reference(ref, mask_name, shape_name):
    batch, q_len, k_len, q_heads, kv_heads, d, dv, block = SHAPES[shape_name]
    options = MASKS[mask_name]
    q, k, v = ref.qkv(1, batch, q_len, k_len, q_heads, kv_heads, d, dv)
    out = masked_attention_via_map(q, k, v, block_size=block, **options)
    assert out.shape == (batch, q_len, q_heads, dv) and out.dtype == q.dtype
    expected = ref.attention(q, k, v, ref.mask_for(SHAPES[shape_name], options))
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("mask_name", ["causal", "mask_fn_and_window", "document"])
def test_result_does_not_depend_on_block_size(ref, mask_name):
    options = MASKS[mask_name]
    q, k, v = ref.qkv(2, 2, 64, 50, 4, 2, 8)
    outputs = [
        np.asarray(masked_attention_via_map(q, k, v, block_size=block, **options))
        for block in (None, 13, (8, 32), 1000)
    ]
    shape = (2, 64, 50, 4)
    expected = ref.attention(q, k, v, ref.mask_for(shape, options))
    for out in outputs:
        np.testing.assert_allclose(out, expected, atol=2e-6, rtol=2e-5)
        np.testing.assert_allclose(out, outputs[0], atol=1e-6, rtol=1e-5)


@pytest.mark.compat
def test_agrees_with_jax_dot_product_attention(ref):
    q, k, v = ref.qkv(3, 2, 96, 96, 8, 2, 16)
    for causal in (False, True):
        out = masked_attention_via_map(q, k, v, is_causal=causal, block_size=32)
        dense = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
        np.testing.assert_allclose(out, dense, atol=1e-5, rtol=1e-5)


def test_three_dimensional_inputs(ref):
    q, k, v = ref.qkv(4, 1, 30, 41, 4, 2, 8, 5)
    out = masked_attention_via_map(q[0], k[0], v[0], is_causal=True, block_size=16)
    assert out.shape == (30, 4, 5)
    expected = ref.attention(q, k, v, ref.mask(1, 4, 30, 41, is_causal=True))[0]
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=2e-5)


def test_explicit_scale(ref):
    q, k, v = ref.qkv(5, 1, 24, 24, 2, 2, 8)
    out = masked_attention_via_map(q, k, v, scale=0.7, window_size=(3, 3), block_size=8)
    expected = ref.attention(q, k, v, ref.mask(1, 2, 24, 24, window=(3, 3)), scale=0.7)
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)], ids=["bf16", "fp16"]
)
@pytest.mark.compat("dtype")
def test_low_precision_inputs(ref, dtype, tolerance):
    q, k, v = ref.qkv(6, 2, 70, 70, 4, 2, 16, dtype=dtype)
    for options in ({"is_causal": True}, {"mask_fn": MASKS["mask_fn"]["mask_fn"]}):
        out = masked_attention_via_map(q, k, v, block_size=32, **options)
        assert out.dtype == dtype
        mask = ref.mask_for((2, 70, 70, 4), options)
        # The reference sees the same rounded inputs, so only the output rounding and
        # float32 accumulation separate the two.
        expected = ref.attention(q, k, v, mask)
        np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=tolerance)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_large_logits_stay_finite(ref, dtype):
    q, k, v = ref.qkv(7, 1, 48, 48, 2, 2, 16)
    q, k = q * 100.0, k * 100.0
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    out = masked_attention_via_map(q, k, v, is_causal=True, block_size=16)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    expected = ref.attention(q, k, v, ref.mask(1, 2, 48, 48, is_causal=True))
    # Scores of order 1e4: the softmax is nearly one-hot and float32 scores round at
    # about 1e-3, so allow the output a little more than input rounding.
    tolerance = 2e-3 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=tolerance)


def test_rows_without_visible_keys_are_zero(ref):
    q, k, v = ref.qkv(8, 2, 40, 40, 2, 2, 8)

    def mask_fn(b, h, q, k):
        return (q % 4 != 1) & (k <= q)

    out = np.asarray(masked_attention_via_map(q, k, v, mask_fn=mask_fn, block_size=8))
    expected = ref.attention(q, k, v, ref.mask(2, 2, 40, 40, mask_fn=mask_fn))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[:, 1::4], 0.0)
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=2e-5)
    # jax.nn.dot_product_attention gives the mean of V there instead (documented).
    dense = jax.nn.dot_product_attention(q, k, v, mask=ref.mask(2, 2, 40, 40, mask_fn=mask_fn))
    np.testing.assert_allclose(
        dense[:, 1::4], np.broadcast_to(v.mean(1, keepdims=True), dense[:, 1::4].shape), atol=1e-5
    )


def test_more_queries_than_keys_with_causal_window(ref):
    # Queries 12.. see no key at all: k <= q and k >= q - 2 leaves none below Lk = 10.
    q, k, v = ref.qkv(9, 1, 30, 10, 2, 1, 8)
    out = np.asarray(
        masked_attention_via_map(q, k, v, is_causal=True, window_size=(2, 0), block_size=8)
    )
    np.testing.assert_array_equal(out[:, 12:], 0.0)
    expected = ref.attention(q, k, v, ref.mask(1, 2, 30, 10, is_causal=True, window=(2, 0)))
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=2e-5)


def test_everything_masked_gives_zeros(ref):
    q, k, v = ref.qkv(10, 1, 20, 20, 2, 2, 8)
    out = masked_attention_via_map(q, k, v, mask_fn=lambda b, h, q, k: q < 0, block_size=8)
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize(("q_len", "k_len"), [(0, 5), (5, 0), (1, 1)])
@pytest.mark.compat
def test_degenerate_lengths(ref, q_len, k_len):
    q, k, v = ref.qkv(11, 2, q_len, k_len, 2, 1, 4)
    out = masked_attention_via_map(q, k, v, is_causal=True)
    assert out.shape == (2, q_len, 2, 4)
    expected = ref.attention(q, k, v, ref.mask(2, 2, q_len, k_len, is_causal=True))
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_original_readme_example(ref):
    B, L, H, d = 2, 128, 8, 64
    Q, K, V = ref.qkv(12, B, L, L, H, H, d)
    output = masked_attention_via_map(Q, K, V, is_causal=True)
    np.testing.assert_allclose(
        output, ref.attention(Q, K, V, ref.mask(B, H, L, L, is_causal=True)), atol=2e-6
    )

    def window_mask(b, h, q, k):
        return jnp.abs(q - k) <= 10

    output = masked_attention_via_map(
        Q, K, V, mask_fn=window_mask, block_size=32, window_size=(10, 10)
    )
    expected = ref.attention(Q, K, V, ref.mask(B, H, L, L, window=(10, 10)))
    np.testing.assert_allclose(output, expected, atol=2e-6)
