"""Score changes, sinks, log-sum-exp, mask arrays and lengths against a float64 dense
reference, forward and every gradient (Q, K, V, bias, sinks, closed-over arrays, lse)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import create_block_mask, masked_attention_via_map

SHAPE = (2, 37, 45, 4, 2, 8)


@pytest.mark.compat
def test_bias_full_and_broadcast(ref):
    rng = np.random.default_rng(3)
    full = jnp.asarray(rng.standard_normal((2, 4, 37, 45)), jnp.float32)
    ref.compare_variants(SHAPE, {"is_causal": True, "block_size": 16}, bias=full, seed=4)
    per_key = jnp.asarray(rng.standard_normal((1, 4, 1, 45)), jnp.float32)
    ref.compare_variants(
        SHAPE, {"window_size": (9, 3), "block_size": (8, 16)}, bias=per_key, seed=5
    )


def test_soft_cap(ref):
    ref.compare_variants(
        SHAPE, {"is_causal": True, "logits_soft_cap": 2.0, "block_size": 16}, seed=6
    )


def test_alibi_score_mod_gets_slope_gradients(ref):
    slopes = jnp.asarray(2.0 ** -np.arange(1, 5), jnp.float32)
    ref.compare_variants(
        SHAPE, {"is_causal": True, "block_size": 16}, extra=slopes, make_mod=ref.alibi, seed=7
    )


def test_relative_position_table_gets_gradients(ref):
    table = jnp.asarray(np.random.default_rng(8).standard_normal(21) * 0.5, jnp.float32)
    ref.compare_variants(
        SHAPE,
        {"window_size": (12, 12), "block_size": 8},
        extra=table,
        make_mod=ref.relative_table,
        seed=9,
    )


def test_sinks_and_lse_with_empty_rows(ref):
    sinks = jnp.asarray([0.5, -1.0, 2.0, 0.0], jnp.float32)
    # Rows 0..4 see no key (keys start 5 positions after them): sinks alone.
    options = {"mask_fn": lambda b, h, q, k: k >= q + 5, "block_size": 8}
    out = ref.compare_variants((1, 20, 24, 4, 4, 8), options, sinks=sinks, seed=10)
    assert not np.asarray(out[0, 19:]).any()


def test_lse_without_sinks_is_minus_inf_on_empty_rows(ref):
    q, k, v = ref.qkv(11, 1, 10, 12, 2, 2, 4)
    _, lse = masked_attention_via_map(
        q, k, v, mask_fn=lambda b, h, q, k: k > q + 3, return_lse=True, block_size=4
    )
    assert np.isneginf(np.asarray(lse[:, :, 8:])).all()
    assert np.isfinite(np.asarray(lse[:, :, :8])).all()


def test_mask_array_and_lengths(ref):
    rng = np.random.default_rng(12)
    mask = rng.random((2, 1, 37, 45)) < 0.7
    mask[:, :, :, 16:32] = False  # a whole key block empty: skipped
    q_lengths, kv_lengths = np.array([30, 37]), np.array([45, 21])
    positions_q = np.arange(37)[None, None, :, None]
    positions_k = np.arange(45)[None, None, None, :]
    lengths = (positions_q < q_lengths[:, None, None, None]) & (
        positions_k < kv_lengths[:, None, None, None]
    )
    options = {
        "mask": jnp.asarray(mask),
        "query_seq_lengths": jnp.asarray(q_lengths),
        "key_value_seq_lengths": jnp.asarray(kv_lengths),
        "block_size": 16,
    }
    ref.compare_variants(SHAPE, options, visible_extra=mask & lengths, seed=13)


def test_masked_blocks_of_a_mask_array_are_skipped(ref):
    q, k, v = ref.qkv(14, 1, 32, 48, 2, 2, 8)
    mask = np.ones((1, 1, 32, 48), bool)
    mask[..., 16:32] = False
    k = k.at[:, 16:32].set(jnp.nan)
    v = v.at[:, 16:32].set(jnp.nan)

    def loss(q, k, v):
        return jnp.sum(masked_attention_via_map(q, k, v, mask=jnp.asarray(mask), block_size=16))

    out = masked_attention_via_map(q, k, v, mask=jnp.asarray(mask), block_size=16)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert np.isfinite(np.asarray(out)).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.compat("traced")
def test_decoding_one_query_against_a_cache(ref, traced):
    batch, k_len = 2, 50
    q, k, v = ref.qkv(15, batch, 1, k_len, 4, 2, 8)
    offsets = np.array([k_len - 1, 30], np.int32)  # rows with shorter caches
    options = {"is_causal": True, "block_size": 16}
    expected = ref.attention(
        q, k, v, ref.mask(batch, 4, 1, k_len, is_causal=True, q_offset=offsets)
    )
    if traced:
        out = jax.jit(lambda q, k, v, o: masked_attention_via_map(q, k, v, q_offset=o, **options))(
            q, k, v, jnp.asarray(offsets)
        )
    else:
        out = masked_attention_via_map(q, k, v, q_offset=offsets, **options)
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=2e-5)


def test_everything_together_with_a_block_mask(ref):
    rng = np.random.default_rng(16)
    batch, length = 2, 40
    ids = np.sort(rng.integers(0, 3, (batch, length)), axis=1)
    ids_j = jnp.asarray(ids)
    bm = create_block_mask(
        lambda b, h, q, k: ids_j[b, q] == ids_j[b, k],
        batch,
        1,
        length,
        length,
        is_causal=True,
        block_size=8,
    )
    bias = jnp.asarray(rng.standard_normal((batch, 1, length, length)), jnp.float32)
    sinks = jnp.asarray(rng.standard_normal(6), jnp.float32)
    slopes = jnp.asarray(2.0 ** -np.arange(1, 7), jnp.float32)
    documents = ids[:, None, :, None] == ids[:, None, None, :]
    ref.compare_variants(
        (batch, length, length, 6, 2, 8),
        {"block_mask": bm, "logits_soft_cap": 3.0},
        bias=bias,
        sinks=sinks,
        extra=slopes,
        make_mod=ref.alibi,
        visible_extra=documents & np.tril(np.ones((length, length), bool)),
        seed=17,
    )


def test_everything_together_with_offsets_and_gqa(ref):
    rng = np.random.default_rng(18)
    bias = jnp.asarray(rng.standard_normal((1, 6, 12, 30)), jnp.float32)
    sinks = jnp.asarray(rng.standard_normal(6), jnp.float32)
    slopes = jnp.asarray(rng.random(6), jnp.float32)
    options = {
        "is_causal": True,
        "q_offset": np.array([18, 9]),
        "window_size": (10, None),
        "block_size": (4, 8),
    }
    ref.compare_variants(
        (2, 12, 30, 6, 3, 8),
        options,
        bias=bias,
        sinks=sinks,
        extra=slopes,
        make_mod=ref.alibi,
        seed=19,
    )


def test_bfloat16_with_every_change(ref):
    rng = np.random.default_rng(20)
    q, k, v = ref.qkv(21, 2, 64, 64, 4, 2, 16, dtype=jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal((2, 4, 64, 64)), jnp.bfloat16)
    sinks = jnp.asarray(rng.standard_normal(4), jnp.float32)
    slopes = jnp.asarray(2.0 ** -np.arange(1, 5), jnp.float32)
    options = {"is_causal": True, "logits_soft_cap": 4.0, "block_size": 16}
    out, lse = masked_attention_via_map(
        q, k, v, bias=bias, sinks=sinks, score_mod=ref.alibi(slopes), return_lse=True, **options
    )
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    with ref.float64():
        out64, lse64 = ref.dense(
            q,
            k,
            v,
            ref.mask(2, 4, 64, 64, is_causal=True),
            bias=bias,
            soft_cap=4.0,
            sinks=sinks,
            score_mod=ref.alibi(jnp.asarray(slopes, jnp.float64)),
        )
    np.testing.assert_allclose(np.asarray(out, np.float32), out64, atol=3e-2, rtol=3e-2)
    np.testing.assert_allclose(lse, lse64, atol=2e-2, rtol=1e-2)


def test_three_dimensional_inputs(ref):
    q, k, v = ref.qkv(22, 1, 20, 20, 2, 1, 8)
    rng = np.random.default_rng(23)
    bias = jnp.asarray(rng.standard_normal((2, 20, 20)), jnp.float32)
    sinks = jnp.asarray(rng.standard_normal(2), jnp.float32)
    out, lse = masked_attention_via_map(
        q[0], k[0], v[0], bias=bias, sinks=sinks, is_causal=True, return_lse=True, block_size=8
    )
    assert out.shape == (20, 2, 8) and lse.shape == (2, 20)
    with ref.float64():
        out64, lse64 = ref.dense(
            q, k, v, ref.mask(1, 2, 20, 20, is_causal=True), bias=bias[None], sinks=sinks
        )
    np.testing.assert_allclose(out, np.asarray(out64)[0], atol=2e-6, rtol=2e-5)
    np.testing.assert_allclose(lse, np.asarray(lse64)[0], atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        ({"bias": jnp.ones((3, 1, 1))}, ValueError, r"bias of shape \(3, 1, 1\) does not broad"),
        ({"bias": jnp.ones((2, 4, 10, 12), jnp.int32)}, TypeError, r"bias must be a floating"),
        ({"mask": jnp.ones((1, 1, 10, 12))}, TypeError, r"mask must be a boolean array"),
        ({"mask": jnp.ones((5, 12), bool)}, ValueError, r"mask of shape \(5, 12\) does not"),
        ({"sinks": jnp.ones(3)}, ValueError, r"sinks must have shape \(Hq,\) = \(4,\)"),
        ({"sinks": jnp.ones(4, jnp.int32)}, TypeError, r"sinks must have a floating dtype"),
        ({"logits_soft_cap": 0.0}, ValueError, r"logits_soft_cap must be a positive"),
        ({"logits_soft_cap": -1}, ValueError, r"logits_soft_cap must be a positive"),
        ({"logits_soft_cap": "big"}, TypeError, r"logits_soft_cap must be a positive float"),
        ({"q_offset": 1.5}, TypeError, r"q_offset must be an int"),
        ({"q_offset": jnp.zeros(2)}, TypeError, r"q_offset must have an integer dtype"),
        (
            {"query_seq_lengths": jnp.ones(3, jnp.int32)},
            ValueError,
            r"query_seq_lengths must "
            r"have shape \(B,\) = \(2,\)",
        ),
        (
            {"key_value_seq_lengths": jnp.ones(2)},
            TypeError,
            r"key_value_seq_lengths must have "
            r"an integer dtype",
        ),
        (
            {"score_mod": lambda s, b, h, q, k: jnp.stack([s, s])},
            ValueError,
            r"score_mod must be element-wise: .* returned shape \(2,\)",
        ),
        (
            {"score_mod": lambda s, b, h, q, k: q - k},
            TypeError,
            r"score_mod must return a floating score, got dtype int32",
        ),
        ({"score_mod": lambda s, h, q, k: s}, TypeError, r"score_mod must take 5 positional"),
        ({"return_lse": "yes"}, TypeError, r"return_lse must be a bool"),
    ],
)
@pytest.mark.compat
def test_bad_variant_arguments(options, error, pattern):
    q = jnp.ones((2, 10, 4, 8))
    k = jnp.ones((2, 12, 2, 8))
    with pytest.raises(error, match=pattern):
        masked_attention_via_map(q, k, k, **options)
