"""Attention dropout: the keep decisions' statistics, their independence from the block
size and the backend, forward and gradients against a float64 dense reference that drops
the same weights, finite differences, masks kept hidden, linear memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import (
    create_block_mask,
    dot_product_attention,
    dropout_keep_mask,
    masked_attention_via_map,
    ring_attention,
)

RNG = jax.random.key(7)


def _weights(q, k, *, rate, rng=RNG, **options):
    """The dropped and rescaled attention weights ``(B, Lq, Hq, Lk)``, read off a forward
    pass whose values are the identity: each key's value is its one-hot row."""
    batch, k_len, kv_heads, _ = k.shape
    eye = jnp.broadcast_to(
        jnp.eye(k_len, dtype=q.dtype)[None, :, None, :], (batch, k_len, kv_heads, k_len)
    )
    return masked_attention_via_map(q, k, eye, dropout_rate=rate, dropout_rng=rng, **options)


def _binomial_bound(n, rate):
    return 5.0 * np.sqrt(rate * (1 - rate) / n)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.85])
@pytest.mark.compat("rate")
def test_uniform_weights_dropped_fraction_and_scale(rate):
    # Zero queries make every weight 1 / Lk: each output entry is either 0 (dropped) or
    # 1 / (Lk (1 - rate)) (kept and rescaled), exactly where dropout_keep_mask says.
    batch, length, heads = 2, 96, 3
    q = jnp.zeros((batch, length, heads, 8))
    k = jax.random.normal(jax.random.key(1), (batch, length, heads, 8))
    weights = np.asarray(_weights(q, k, rate=rate, block_size=32))
    keep = np.asarray(dropout_keep_mask(RNG, rate, (batch, heads, length, length)))
    kept_value = 1.0 / (length * (1.0 - rate))
    np.testing.assert_allclose(
        weights, np.where(keep.transpose(0, 2, 1, 3), kept_value, 0.0), rtol=1e-5, atol=1e-7
    )
    dropped = 1.0 - keep.mean()
    assert abs(dropped - rate) < _binomial_bound(keep.size, rate), dropped
    # Each row keeps its expected total: the scale is 1 / (1 - rate).
    assert abs(weights.sum(axis=-1).mean() - 1.0) < _binomial_bound(keep.size, rate) / (1 - rate)


def test_keep_mask_statistics_and_independence():
    rate = 0.3
    keep = np.asarray(dropout_keep_mask(RNG, rate, (2, 4, 128, 128)))
    x = keep.astype(np.float64) - keep.mean()
    bound = 5.0 / np.sqrt(x[..., 1:].size)

    def correlation(a, b):
        return float((a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean()))

    # Neighbouring keys, neighbouring queries, heads and batch rows are uncorrelated.
    assert abs(correlation(x[..., 1:], x[..., :-1])) < bound
    assert abs(correlation(x[:, :, 1:], x[:, :, :-1])) < bound
    assert abs(correlation(x[:, 1:], x[:, :-1])) < bound
    assert abs(correlation(x[1:], x[:-1])) < bound
    # Another key draws other decisions; the same key the same ones; a shared mask is
    # the same for every batch row and head.
    other = np.asarray(dropout_keep_mask(jax.random.key(8), rate, (2, 4, 128, 128)))
    assert abs((other == keep).mean() - (rate**2 + (1 - rate) ** 2)) < 0.01
    again = dropout_keep_mask(jax.random.key(7), rate, (2, 4, 128, 128))
    np.testing.assert_array_equal(np.asarray(again), keep)
    shared = np.asarray(dropout_keep_mask(RNG, rate, (2, 4, 128, 128), shared=True))
    assert (shared == shared[:1, :1]).all()
    # A raw PRNGKey works as well as a typed key, and q_offset shifts the rows.
    raw = dropout_keep_mask(jax.random.PRNGKey(3), rate, (1, 1, 16, 16))
    typed = dropout_keep_mask(jax.random.wrap_key_data(jax.random.PRNGKey(3)), rate, (1, 1, 16, 16))
    np.testing.assert_array_equal(np.asarray(raw), np.asarray(typed))
    shifted = dropout_keep_mask(RNG, rate, (2, 4, 100, 128), q_offset=28)
    np.testing.assert_array_equal(np.asarray(shifted), keep[:, :, 28:])


@pytest.mark.compat
def test_same_rng_same_result_other_rng_other_result(ref):
    q, k, v = ref.qkv(2, 2, 40, 40, 4, 2, 8)
    call = jax.jit(
        lambda rng: masked_attention_via_map(
            q, k, v, is_causal=True, block_size=16, dropout_rate=0.2, dropout_rng=rng
        )
    )
    first, second = call(jax.random.key(1)), call(jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    assert not np.allclose(np.asarray(first), np.asarray(call(jax.random.key(2))))
    plain = masked_attention_via_map(q, k, v, is_causal=True, block_size=16)
    zero = masked_attention_via_map(
        q, k, v, is_causal=True, block_size=16, dropout_rate=0.0, dropout_rng=jax.random.key(1)
    )
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(plain))


def test_decisions_do_not_depend_on_block_size(ref):
    q, k, _ = ref.qkv(3, 2, 45, 53, 4, 2, 8)
    rate = 0.4
    keep = np.asarray(dropout_keep_mask(RNG, rate, (2, 4, 45, 53))).transpose(0, 2, 1, 3)
    results = []
    for block_size in (8, (16, 32), (45, 53), (7, 11)):
        weights = np.asarray(_weights(q, k, rate=rate, window_size=(30, 4), block_size=block_size))
        visible = np.asarray(ref.mask(2, 4, 45, 53, window=(30, 4))).transpose(0, 2, 1, 3)
        np.testing.assert_array_equal(weights != 0, keep & visible)
        results.append(weights)
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-5, atol=1e-7)


def test_value_gradient_is_weights_transposed_times_cotangent(ref):
    # dL/dV = A^T . ct with A read off a forward whose values are the identity: the
    # backward regenerates exactly the forward's decisions.
    q, k, v = ref.qkv(4, 2, 33, 41, 4, 2, 8)
    options = {"is_causal": True, "block_size": (16, 8), "q_offset": 8}
    rate = 0.35
    weights = _weights(q, k, rate=rate, **options)  # (B, Lq, Hq, Lk)
    ct = jax.random.normal(jax.random.key(5), (2, 33, 4, 8))

    def loss(v):
        out = masked_attention_via_map(q, k, v, dropout_rate=rate, dropout_rng=RNG, **options)
        return jnp.sum(out * ct)

    d_v = jax.grad(loss)(v)
    expected = jnp.einsum("bqhk,bqhd->bkhd", weights, ct)  # per query head
    expected = expected.reshape(2, 41, 2, 2, 8).sum(axis=3)  # sum each group's heads
    np.testing.assert_allclose(np.asarray(d_v), np.asarray(expected), rtol=1e-4, atol=1e-5)


def test_finite_differences():
    # Float32 central differences along random directions, against the gradient.
    keys = jax.random.split(jax.random.key(9), 7)
    q = jax.random.normal(keys[0], (1, 24, 2, 8))
    k, v = (jax.random.normal(keys[n], (1, 24, 1, 8)) for n in (1, 2))
    ct = jax.random.normal(keys[3], (1, 24, 2, 8))
    options = {"is_causal": True, "block_size": 8, "dropout_rate": 0.3, "dropout_rng": RNG}

    def loss(q, k, v):
        return jnp.sum(masked_attention_via_map(q, k, v, **options) * ct)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for n, (x, g) in enumerate(zip((q, k, v), grads, strict=True)):
        direction = jax.random.normal(keys[4 + n], x.shape)
        eps = 1e-2
        args = [q, k, v]
        args[n] = x + eps * direction
        up = loss(*args)
        args[n] = x - eps * direction
        down = loss(*args)
        numeric = float(up - down) / (2 * eps)
        analytic = float(jnp.sum(g * direction))
        assert abs(numeric - analytic) < 2e-3 * (1 + abs(analytic)), (n, numeric, analytic)


@pytest.mark.parametrize(
    "options",
    [
        {"is_causal": True, "block_size": 16},
        {"window_size": (9, 3), "block_size": (8, 16), "q_offset": 5},
        {"mask_fn": lambda b, h, q, k: (q + k + h) % 3 != 0, "block_size": 16},
    ],
    ids=["causal", "window_offset", "head_mask_fn"],
)
def test_against_dense_reference_with_every_variant(ref, options):
    # Bias, soft-cap, an ALiBi score_mod with learnable slopes, sinks, lse and GQA, with
    # dropout: outputs, lse and every gradient against float64.
    rng = np.random.default_rng(11)
    bias = jnp.asarray(rng.standard_normal((2, 1, 37, 45)), jnp.float32)
    sinks = jnp.asarray([0.5, -1.0, 2.0, 0.0], jnp.float32)
    slopes = jnp.asarray(2.0 ** -np.arange(1, 5), jnp.float32)
    drop = {"dropout_rate": 0.25, "dropout_rng": jax.random.key(3), "logits_soft_cap": 3.0}
    ref.compare_variants(
        (2, 37, 45, 4, 2, 8),
        {**options, **drop},
        bias=bias,
        sinks=sinks,
        extra=slopes,
        make_mod=ref.alibi,
        seed=12,
        jit=True,
    )


def test_mask_arrays_lengths_and_block_mask(ref):
    rng = np.random.default_rng(13)
    mask = jnp.asarray(rng.random((2, 1, 30, 30)) < 0.7)
    lengths = jnp.asarray([30, 19], jnp.int32)
    visible = np.asarray(mask) & (np.arange(30) < np.asarray(lengths)[:, None, None, None])
    drop = {"dropout_rate": 0.5, "dropout_rng": jax.random.key(4), "block_size": 8}
    ref.compare_variants(
        (2, 30, 30, 2, 2, 8),
        {**drop, "mask": mask, "key_value_seq_lengths": lengths},
        visible_extra=visible,
        seed=14,
        jit=True,
    )
    block_mask = create_block_mask(lambda b, h, q, k: k <= q, 2, 2, 30, 30, block_size=8)
    q, k, v = ref.qkv(15, 2, 30, 30, 2, 2, 8)
    via_block_mask = masked_attention_via_map(
        q, k, v, block_mask=block_mask, dropout_rate=0.5, dropout_rng=jax.random.key(4)
    )
    causal = masked_attention_via_map(
        q, k, v, is_causal=True, block_size=8, dropout_rate=0.5, dropout_rng=jax.random.key(4)
    )
    np.testing.assert_allclose(np.asarray(via_block_mask), np.asarray(causal), atol=1e-6)


def test_causal_positions_stay_hidden(ref):
    q, k, v = ref.qkv(16, 1, 32, 32, 2, 2, 8)
    options = {"is_causal": True, "block_size": 8, "dropout_rate": 0.5, "dropout_rng": RNG}
    weights = np.asarray(_weights(q, k, rate=0.5, is_causal=True, block_size=8))
    future = np.triu(np.ones((32, 32), bool), 1)[None, :, None, :]
    assert not weights[np.broadcast_to(future, weights.shape)].any()
    assert weights[np.broadcast_to(~future, weights.shape)].any()

    def first_rows(v):
        return masked_attention_via_map(q, k, v, **options)[:, :16]

    # Later values neither change the first rows nor get a gradient from them.
    changed = v.at[:, 16:].set(100.0)
    np.testing.assert_array_equal(np.asarray(first_rows(v)), np.asarray(first_rows(changed)))
    d_v = jax.grad(lambda v: jnp.sum(first_rows(v)))(v)
    assert not np.asarray(d_v[:, 16:]).any()


def test_temporary_memory_stays_far_below_one_score_matrix():
    length, heads, dim = 4096, 2, 32
    spec = jax.ShapeDtypeStruct((1, length, heads, dim), jnp.float32)
    options = {"is_causal": True, "dropout_rate": 0.1}

    def forward(q, k, v, rng):
        return masked_attention_via_map(q, k, v, dropout_rng=rng, **options)

    def gradient(q, k, v, rng):
        return jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v, rng)), argnums=(0, 1, 2))(q, k, v)

    scores = length * length * heads * 4  # one float32 L x L matrix per head
    for fn in (forward, gradient):
        compiled = jax.jit(fn).lower(spec, spec, spec, RNG).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp < 0.1 * scores, (fn.__name__, temp, scores)


@pytest.mark.parametrize(
    ("rate", "rng", "error", "words"),
    [
        (-0.1, RNG, ValueError, "dropout_rate"),
        (1.0, RNG, ValueError, "dropout_rate"),
        (0.2, None, ValueError, "dropout_rng"),
        ("0.2", RNG, TypeError, "dropout_rate"),
        (0.2, jnp.zeros(3), TypeError, "dropout_rng"),
        (0.2, jax.random.split(RNG, 2), ValueError, "dropout_rng"),
    ],
)
@pytest.mark.compat
def test_bad_dropout_arguments(ref, rate, rng, error, words):
    q, k, v = ref.qkv(17, 1, 8, 8, 1, 1, 4)
    with pytest.raises(error, match=words):
        masked_attention_via_map(q, k, v, dropout_rate=rate, dropout_rng=rng)


@pytest.mark.compat
def test_cudnn_and_ring_refuse_dropout(ref):
    q, k, v = ref.qkv(18, 1, 16, 16, 2, 2, 8)
    with pytest.raises(ValueError, match="dropout"):
        masked_attention_via_map(
            q, k, v, is_causal=True, implementation="cudnn", dropout_rate=0.1, dropout_rng=RNG
        )
    mesh = jax.make_mesh((1,), ("seq",))
    with pytest.raises(ValueError, match="dropout"):
        ring_attention(q, k, v, mesh=mesh, seq_axis="seq", dropout_rate=0.1, dropout_rng=RNG)
    # dot_product_attention (jax.nn's signature) has no dropout keyword at all.
    with pytest.raises(TypeError):
        dot_product_attention(q, k, v, dropout_rate=0.1)  # type: ignore[call-arg]


# ------------------------------------------------------------------ the Pallas kernels


def _needs_pallas():
    pytest.importorskip("jax.experimental.pallas", reason="this jax has no Pallas")
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the installed jax
        pytest.skip(f"this jax has no Pallas Triton backend ({err})")


@pytest.mark.compat
def test_pallas_draws_the_block_loop_decisions(ref):
    # The kernels (interpret mode here) and the block loop keep the same weights, with
    # GQA, a per-batch q_offset and a window, whatever their block sizes.
    _needs_pallas()
    q, k, _ = ref.qkv(19, 2, 40, 56, 4, 2, 16)
    options = {"window_size": (24, 8), "q_offset": jnp.asarray([16, 3], jnp.int32)}
    xla = _weights(q, k, rate=0.3, implementation="xla", block_size=(8, 24), **options)
    pallas = _weights(q, k, rate=0.3, implementation="pallas", block_size=16, **options)
    np.testing.assert_array_equal(np.asarray(pallas) != 0, np.asarray(xla) != 0)
    np.testing.assert_allclose(np.asarray(pallas), np.asarray(xla), rtol=1e-5, atol=1e-6)


def test_pallas_value_gradient_is_weights_transposed_times_cotangent(ref):
    _needs_pallas()
    q, k, v = ref.qkv(20, 1, 32, 48, 4, 2, 16)
    options = {"is_causal": True, "q_offset": 16, "block_size": 16, "implementation": "pallas"}
    weights = _weights(q, k, rate=0.4, **options)
    ct = jax.random.normal(jax.random.key(6), (1, 32, 4, 16))

    def loss(v):
        out = masked_attention_via_map(q, k, v, dropout_rate=0.4, dropout_rng=RNG, **options)
        return jnp.sum(out * ct)

    d_v = jax.grad(loss)(v)
    expected = jnp.einsum("bqhk,bqhd->bkhd", weights, ct).reshape(1, 48, 2, 2, 16).sum(axis=3)
    np.testing.assert_allclose(np.asarray(d_v), np.asarray(expected), rtol=1e-4, atol=1e-5)


def test_pallas_against_dense_reference_with_every_variant(ref):
    # Forward, lse and the dQ and dK/dV kernels' gradients (Q, K, V, bias, sinks, the
    # slopes score_mod closes over), with backward tiles narrower than the blocks.
    _needs_pallas()
    rng = np.random.default_rng(21)
    bias = jnp.asarray(rng.standard_normal((1, 4, 1, 40)), jnp.float32)
    sinks = jnp.asarray([0.5, -1.0, 2.0, 0.0], jnp.float32)
    slopes = jnp.asarray(2.0 ** -np.arange(1, 5), jnp.float32)
    options = {
        "is_causal": True,
        "block_size": 16,
        "implementation": "pallas",
        "logits_soft_cap": 3.0,
        "dropout_rate": 0.3,
        "dropout_rng": jax.random.key(22),
    }
    ref.compare_variants(
        (1, 40, 40, 4, 2, 16),
        options,
        bias=bias,
        sinks=sinks,
        extra=slopes,
        make_mod=ref.alibi,
        seed=23,
        jit=True,
    )


# --------------------------------------------------- the flax adapter, without flax


def test_flax_adapter_skips_blocks_its_masks_leave_empty(ref):
    # Values of keys in skipped blocks are never read: NaN there leaves the rows that
    # cannot see them finite, with a dense padding mask (float, as flax builds it) and
    # with is_causal=True (no dense mask), dropout on.
    from jaxmodules.attention import flax_dot_product_attention

    q, k, v = ref.qkv(25, 2, 64, 64, 4, 2, 8)
    train = {"dropout_rate": 0.2, "dropout_rng": RNG, "block_size": 16}
    padded = v.at[:, 48:].set(jnp.nan)
    valid = (jnp.arange(64) < 48).astype(jnp.float32)
    mask = jnp.broadcast_to(valid[None, None, None, :], (2, 1, 64, 64))
    out = flax_dot_product_attention(q, k, padded, mask=mask, **train)
    assert np.isfinite(np.asarray(out)).all()
    expected = flax_dot_product_attention(q[:, :, :], k[:, :48], v[:, :48], **train)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)
    future = v.at[:, 16:].set(jnp.nan)
    out = flax_dot_product_attention(q, k, future, is_causal=True, **train)
    assert np.isfinite(np.asarray(out[:, :16])).all()
    assert np.isnan(np.asarray(out[:, 16:])).any()
