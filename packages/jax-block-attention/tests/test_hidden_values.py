"""A value a query cannot see never reaches its row (SPEC 4.10): NaN or inf in the ``K``
or ``V`` of a hidden key leaves the visible rows, and their gradients, as if those
entries were zero, on every backend and for every block size; a NaN a row does see
still gives NaN there."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import dot_product_attention, flex, masked_attention_via_map

# Both block loops: "pallas" runs the Triton kernels in interpret mode off a GPU, where
# each case costs tens of seconds, so it takes fewer of them.
IMPLEMENTATIONS = ("xla", "pallas")
BAD = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
BLOCKS = [
    pytest.param("xla", 16, id="xla-16"),
    pytest.param("xla", 32, id="xla-32"),
    pytest.param("pallas", 16, id="pallas-16"),
]


def _zeroed(x):
    """``x`` with its non-finite entries 0: what a hidden entry must count as."""
    x = np.asarray(x)
    return np.where(np.isfinite(x), x, 0.0).astype(x.dtype)


def _check_rows(actual, expected, atol):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=atol, rtol=0)


def _gradients(fn, q, k, v, d_out):
    _, pullback = jax.vjp(fn, q, k, v)
    return pullback(d_out)


@pytest.mark.parametrize(
    ("implementation", "block", "bad"),
    [("xla", block, bad) for block in (16, 32) for bad in BAD]
    + [("pallas", 16, "nan"), ("pallas", 32, "inf")],
)
def test_causal_future_value_stays_out(ref, implementation, block, bad):
    """``V[0, 20]`` non-finite under ``is_causal``: rows 16-19 share its partial tile
    (block 16) or the whole tile (block 32) and must not see it; rows 20 on do see it
    and give what ``jax.nn`` gives."""
    q, k, v = ref.qkv(0, 2, 32, 32, 2, 2, 16)
    v = v.at[0, 20].set(BAD[bad])
    out = masked_attention_via_map(
        q, k, v, is_causal=True, block_size=block, implementation=implementation
    )
    mask = ref.mask(2, 2, 32, 32, is_causal=True)
    expected = ref.attention(q, k, _zeroed(v), mask)
    atol = ref.float32_atol(implementation)
    _check_rows(out[0, :20], expected[0, :20], atol)
    _check_rows(out[1], expected[1], atol)
    # The rows that see it: NaN (or the inf) as in jax.nn, whatever the block size.
    seen = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    assert not np.isfinite(np.asarray(out[0, 20:])).any()
    np.testing.assert_array_equal(np.isnan(out[0, 20:]), np.isnan(seen[0, 20:]))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("block", [16, 32])
def test_keys_hidden_from_every_row_forward_and_gradients(ref, implementation, block):
    """Keys 24-31 hidden from every row by ``mask_fn`` but sharing partial tiles with
    visible ones: NaN in their ``V``, inf in a ``K``. Output and gradients match the
    reference on zeroed inputs; the hidden keys get zero ``dK`` and ``dV``."""
    q, k, v = ref.qkv(1, 1, 32, 32, 4, 2, 16)

    def mask_fn(b, h, qi, ki):
        return (ki <= qi) & (ki < 24)

    k, v = k.at[0, 27].set(jnp.inf), v.at[0, 24:].set(jnp.nan)
    mask = ref.mask(1, 4, 32, 32, mask_fn=mask_fn)

    def attend(q, k, v):
        return masked_attention_via_map(
            q, k, v, mask_fn=mask_fn, block_size=block, implementation=implementation
        )

    atol = ref.float32_atol(implementation)
    _check_rows(attend(q, k, v), ref.attention(q, _zeroed(k), _zeroed(v), mask), atol)
    d_out = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)
    grads = _gradients(attend, q, k, v, d_out)
    expected = ref.gradients(q, _zeroed(k), _zeroed(v), mask, d_out)
    for got, want in zip(grads, expected, strict=True):
        _check_rows(got, want, 10 * atol)
    assert not np.asarray(grads[1][0, 24:]).any()
    assert not np.asarray(grads[2][0, 24:]).any()


@pytest.mark.parametrize(("implementation", "block"), BLOCKS)
def test_padded_cache_past_its_length(ref, implementation, block):
    """A KV cache holding garbage (NaN values, inf keys) past ``key_value_seq_lengths``."""
    q, k, v = ref.qkv(3, 2, 32, 32, 2, 2, 16)
    lengths = np.array([20, 27])
    for b, n in enumerate(lengths):
        k, v = k.at[b, n:].set(-jnp.inf), v.at[b, n:].set(jnp.nan)

    def attend(q, k, v):
        return masked_attention_via_map(
            q,
            k,
            v,
            key_value_seq_lengths=lengths,
            block_size=block,
            implementation=implementation,
        )

    mask = ref.mask(2, 2, 32, 32, mask_fn=lambda b, h, qi, ki: ki < lengths[b])
    atol = ref.float32_atol(implementation)
    _check_rows(attend(q, k, v), ref.attention(q, _zeroed(k), _zeroed(v), mask), atol)
    d_out = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)
    grads = _gradients(attend, q, k, v, d_out)
    expected = ref.gradients(q, _zeroed(k), _zeroed(v), mask, d_out)
    for got, want in zip(grads, expected, strict=True):
        _check_rows(got, want, 10 * atol)


def test_drop_in_with_sequence_lengths(ref):
    """The case as a ``jax.nn`` user meets it: ``dot_product_attention`` with
    ``key_value_seq_lengths=[20, 20]`` and NaN past position 20 (32 of 32 rows were NaN)."""
    q, k, v = ref.qkv(5, 2, 32, 32, 4, 2, 16)
    v = v.at[:, 20:].set(jnp.nan)
    out = dot_product_attention(q, k, v, key_value_seq_lengths=jnp.array([20, 20]))
    mask = ref.mask(2, 4, 32, 32, mask_fn=lambda b, h, qi, ki: ki < 20)
    _check_rows(out, ref.attention(q, k, _zeroed(v), mask), ref.float32_atol(None))


@pytest.mark.parametrize(("implementation", "block"), BLOCKS)
def test_flex_causal_block_mask(ref, implementation, block):
    """flex with a causal block mask: ``V`` row 31 NaN reaches row 31 only; and keys
    28-31 hidden from every row leave output and gradients as if they were zero."""

    def causal(b, h, qi, ki):
        return qi >= ki

    q, k, v = (jnp.swapaxes(x, 1, 2) for x in ref.qkv(6, 1, 32, 32, 2, 2, 16))
    options = {"implementation": implementation}
    block_mask = flex.create_block_mask(causal, None, None, 32, 32, BLOCK_SIZE=block)
    out = flex.flex_attention(
        q, k, v.at[:, :, 31].set(jnp.nan), block_mask=block_mask, kernel_options=options
    )
    as_blhe = [jnp.swapaxes(x, 1, 2) for x in (q, k, v)]
    mask = ref.mask(1, 2, 32, 32, is_causal=True)
    expected = np.swapaxes(ref.attention(*as_blhe, mask), 1, 2)
    atol = ref.float32_atol(implementation)
    _check_rows(out[:, :, :31], expected[:, :, :31], atol)
    assert np.isnan(np.asarray(out[:, :, 31])).all()

    def first_28(b, h, qi, ki):
        return (qi >= ki) & (ki < 28)

    block_mask = flex.create_block_mask(first_28, None, None, 32, 32, BLOCK_SIZE=block)
    hidden_v = v.at[:, :, 28:].set(jnp.nan)

    def attend(q, k, v):
        return flex.flex_attention(q, k, v, block_mask=block_mask, kernel_options=options)

    d_out = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape), jnp.float32)
    mask = ref.mask(1, 2, 32, 32, mask_fn=first_28)
    got = _gradients(attend, q, k, hidden_v, d_out)
    expected = ref.gradients(*as_blhe, mask, jnp.swapaxes(d_out, 1, 2))
    for g, want in zip(got, expected, strict=True):
        _check_rows(g, np.swapaxes(want, 1, 2), 10 * atol)


@pytest.mark.parametrize("window", [None, 6])
def test_cudnn_path_with_hidden_and_seen_values(ref, window):
    """The cuDNN route (run here through ``jax.nn``'s XLA attention, which has the same
    leak): causal band, GQA, key lengths; non-finite values hidden from some rows and
    seen by others, and a non-finite key."""
    from jaxmodules.attention._cudnn import cudnn_attention

    q, k, v = ref.qkv(8, 2, 32, 32, 4, 2, 16)
    lengths = np.array([32, 25])
    v = v.at[0, 20, 0].set(jnp.nan).at[0, 9, 1, 3].set(jnp.inf).at[0, 9, 1, 4].set(-jnp.inf)
    k = k.at[0, 14, 1].set(jnp.inf).at[1, 25:].set(jnp.nan)
    v = v.at[1, 25:].set(jnp.inf)
    out = cudnn_attention(
        q,
        k,
        v,
        is_causal=True,
        window=(window, 0) if window else (None, None),
        scale=None,
        bias=None,
        query_seq_lengths=None,
        key_value_seq_lengths=lengths,
        implementation="xla",
    )
    mask = ref.mask(
        2,
        4,
        32,
        32,
        is_causal=True,
        window=(window, 0) if window else None,
        mask_fn=lambda b, h, qi, ki: ki < lengths[b],
    )
    expected = ref.attention(q, _zeroed(k), _zeroed(v), mask)
    # What each row sees: rows whose band holds the NaN key or value (kv head 0 is
    # query heads 0-1, kv head 1 is 2-3), and the inf pair of column 3/4.
    lo = np.arange(32) - (window if window else 32)
    sees = (lo[:, None] <= np.array([[20, 9, 14]])) & (np.arange(32)[:, None] >= [[20, 9, 14]])
    out = np.asarray(out)
    assert np.isnan(out[0, sees[:, 0], :2]).all()
    assert np.isnan(out[0, sees[:, 2], 2:]).all()
    inf_rows = sees[:, 1] & ~sees[:, 2]
    assert (out[0, inf_rows, 2:, 3] == np.inf).all() and (out[0, inf_rows, 2:, 4] == -np.inf).all()
    clean = np.ones((2, 32, 4), bool)
    clean[0, :, :2] &= ~sees[:, 0:1]
    clean[0, :, 2:] &= ~(sees[:, 1:2] | sees[:, 2:3])
    clean &= np.swapaxes(mask.any(axis=-1), 1, 2)  # rows with no visible key: jax.nn's own
    np.testing.assert_allclose(out[clean], expected[clean], atol=1e-5, rtol=0)


def test_ring_steps_keep_hidden_values_out(ref):
    """ring_attention on a one-device mesh: its steps run the block loop per chunk pair."""
    from jaxmodules.attention import ring_attention

    q, k, v = ref.qkv(9, 1, 32, 32, 2, 2, 16)
    v = v.at[0, 20].set(jnp.nan)
    mesh = jax.make_mesh((1,), ("seq",))
    out = ring_attention(q, k, v, mesh=mesh, seq_axis="seq", is_causal=True, block_size=16)
    expected = ref.attention(q, k, _zeroed(v), ref.mask(1, 2, 32, 32, is_causal=True))
    _check_rows(out[0, :20], expected[0, :20], ref.float32_atol("xla"))
    assert np.isnan(np.asarray(out[0, 20:])).all()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_score_mod_gradients_past_hidden_keys(ref, implementation):
    """A ``score_mod`` reading a learnable table, then capping (its derivative is NaN at
    a NaN score): NaN keys and inf values hidden from every row leave the table's
    gradient (and the others) as if they were zero."""
    q, k, v = ref.qkv(10, 1, 32, 32, 2, 2, 16)
    table = jnp.asarray(np.random.default_rng(11).standard_normal((8, 2)), jnp.float32)
    k, v = k.at[0, 26:].set(jnp.nan), v.at[0, 26:].set(jnp.inf)

    def mask_fn(b, h, qi, ki):
        return (ki <= qi) & (ki < 26)

    def capped(table):
        shifted = ref.bucket_table(table)

        def score_mod(score, b, h, qi, ki):
            return 20.0 * jax.numpy.tanh(shifted(score, b, h, qi, ki) / 20.0)

        return score_mod

    def attend(q, k, v, table):
        return masked_attention_via_map(
            q,
            k,
            v,
            mask_fn=mask_fn,
            score_mod=capped(table),
            block_size=16,
            implementation=implementation,
        )

    d_out = jnp.asarray(np.random.default_rng(12).standard_normal(q.shape), jnp.float32)
    out, pullback = jax.vjp(attend, q, k, v, table)
    grads = pullback(d_out)
    mask = ref.mask(1, 2, 32, 32, mask_fn=mask_fn)
    with ref.float64():
        inputs = [
            jnp.asarray(np.asarray(x, np.float64)) for x in (q, _zeroed(k), _zeroed(v), table)
        ]

        def dense(q, k, v, table):
            return ref.dense(q, k, v, mask, score_mod=capped(table))[0]

        expected_out, dense_pullback = jax.vjp(dense, *inputs)
        expected = [np.asarray(g) for g in dense_pullback(jnp.asarray(d_out, jnp.float64))]
    atol = ref.float32_atol(implementation)
    _check_rows(out, np.asarray(expected_out), atol)
    for got, want in zip(grads, expected, strict=True):
        _check_rows(got, want, 10 * atol)


def _reference_values(w, visible, v):
    """``w @ v`` over the visible pairs only, in float64 (0 * inf and inf - inf NaN)."""
    w64, v64 = np.asarray(w, np.float64), np.asarray(v, np.float64)
    with np.errstate(invalid="ignore"):
        terms = w64[:, :, None] * v64[None, :, :]
        return np.where(np.asarray(visible)[:, :, None], terms, 0.0).sum(axis=1)


@pytest.mark.parametrize("keys", [16, 64])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("counts", ["dot", "float16"])
def test_values_through_counts_every_kind(keys, dtype, counts):
    """``add_values_through`` on one tile against float64 sums over the visible pairs:
    NaN and +-inf (and both signs, and an inf under a visible weight 0) where a visible
    pair holds them, the finite sum elsewhere; with the mask given, or read from the
    sign of the weights (``-0.0`` hidden) as the Triton forward passes it, and with the
    kernels' float16 count products."""
    from jaxmodules.attention._hidden import add_values_through, any_non_finite, hide_in_sign
    from jaxmodules.attention._pallas._tile_math import _count

    rng = np.random.default_rng(keys)
    rows, cols = 32, 16
    visible = rng.random((rows, keys)) < 0.6
    w = np.where(visible, rng.random((rows, keys)), 0.0)
    w = np.where(rng.random((rows, keys)) < 0.1, 0.0, w)  # visible weights 0 (dropout)
    v = rng.standard_normal((keys, cols))
    spots = rng.random((keys, cols))
    v = np.where(spots < 0.03, np.nan, np.where(spots < 0.06, np.inf, v))
    v = np.where(spots > 0.97, -np.inf, v)
    w, v = jnp.asarray(w, dtype), jnp.asarray(v, dtype)
    acc = jnp.asarray(rng.standard_normal((rows, cols)), jnp.float32)

    def dot(a, b):
        return jnp.matmul(a, b, precision="highest", preferred_element_type=jnp.float32)

    count = _count if counts == "float16" else None
    expected = _reference_values(w, visible, v) + np.asarray(acc, np.float64)
    kinds = (np.isnan(expected), expected == np.inf, expected == -np.inf)
    assert all(k.any() for k in kinds) and np.isfinite(expected).any()
    for mask, weights in ((visible, w), (None, hide_in_sign(w, visible))):
        out = np.asarray(add_values_through(acc, weights, mask, v, dot, count))
        for kind, want in zip((np.isnan(out), out == np.inf, out == -np.inf), kinds, strict=True):
            np.testing.assert_array_equal(kind, want)
        finite = np.isfinite(expected)
        np.testing.assert_allclose(out[finite], expected[finite], rtol=1e-5, atol=1e-5)
    assert bool(any_non_finite(v)) and not bool(any_non_finite(jnp.where(jnp.isfinite(v), v, 1)))
