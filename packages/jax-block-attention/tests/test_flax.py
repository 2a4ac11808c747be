"""``flax_dot_product_attention`` as flax's ``attention_fn``: nnx ``MultiHeadAttention``
and linen ``MultiHeadDotProductAttention`` against flax's own attention, forward and
parameter gradients; dropout; what it refuses. Skipped where flax is not installed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _flax_version() -> tuple[int, ...]:
    """The installed flax's (major, minor), read without importing it (an old flax
    installed next to an old jax is skipped, not imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("flax")
    except PackageNotFoundError:
        pytest.skip("flax is not installed", allow_module_level=True)
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


if _flax_version() < (0, 12):
    pytest.skip("the flax tests need flax 0.12 or newer", allow_module_level=True)
nnx = pytest.importorskip("flax.nnx")
nn = pytest.importorskip("flax.linen")
attention_module = pytest.importorskip("flax.nnx.nn.attention")
dot_product_attention_weights = attention_module.dot_product_attention_weights

from jaxmodules.attention import dropout_keep_mask, flax_dot_product_attention  # noqa: E402

BATCH, LENGTH, FEATURES, HEADS = 2, 24, 32, 4
VALID = np.array([24, 15])  # tokens per batch row; the rest is padding


def _inputs(seed=0):
    return jax.random.normal(jax.random.key(seed), (BATCH, LENGTH, FEATURES))


def _padding_mask():
    valid = jnp.arange(LENGTH)[None, :] < jnp.asarray(VALID)[:, None]
    return nnx.make_attention_mask(valid, valid), valid


def _close(a, b, atol=2e-5):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4)


def _nnx_pair(**kwargs):
    def make(attention_fn=None):
        extra = {} if attention_fn is None else {"attention_fn": attention_fn}
        return nnx.MultiHeadAttention(
            num_heads=HEADS,
            in_features=FEATURES,
            decode=False,
            rngs=nnx.Rngs(0),
            **kwargs,
            **extra,
        )

    return make(flax_dot_product_attention), make()


@pytest.mark.parametrize("case", ["causal_mask", "padding_mask", "is_causal", "gqa_causal"])
@pytest.mark.compat("case")
def test_nnx_multi_head_attention_matches_flax(case):
    ours, theirs = _nnx_pair(num_kv_heads=2 if case == "gqa_causal" else None)
    x = _inputs(1)
    weights = jnp.ones((BATCH, LENGTH, 1))
    call = {}
    if case in ("causal_mask", "gqa_causal"):
        call["mask"] = nnx.make_causal_mask(jnp.ones((BATCH, LENGTH)))
    elif case == "padding_mask":
        call["mask"], valid = _padding_mask()
        # Padded query rows see no key: flax gives them the mean of the values, this
        # function 0; the loss leaves them out.
        weights = valid[..., None].astype(jnp.float32)
    else:
        call["is_causal"] = True
    target = jax.random.normal(jax.random.key(2), (BATCH, LENGTH, FEATURES))

    def loss(module, x):
        return jnp.sum(module(x, **call) * target * weights)

    value_ours, grads_ours = nnx.value_and_grad(loss, argnums=(0, 1))(ours, x)
    value_theirs, grads_theirs = nnx.value_and_grad(loss, argnums=(0, 1))(theirs, x)
    np.testing.assert_allclose(value_ours, value_theirs, rtol=1e-5, atol=1e-4)
    _close(grads_ours, grads_theirs)
    _close(ours(x, **call) * weights, theirs(x, **call) * weights)


@pytest.mark.parametrize("case", ["causal_mask", "padding_mask"])
@pytest.mark.compat("case")
def test_linen_multi_head_dot_product_attention_matches_flax(case):
    x = _inputs(3)
    weights = jnp.ones((BATCH, LENGTH, 1))
    if case == "causal_mask":
        mask = nn.make_causal_mask(jnp.ones((BATCH, LENGTH)))
    else:
        mask, valid = _padding_mask()
        weights = valid[..., None].astype(jnp.float32)
    ours = nn.MultiHeadDotProductAttention(num_heads=HEADS, attention_fn=flax_dot_product_attention)
    theirs = nn.MultiHeadDotProductAttention(num_heads=HEADS)
    params = theirs.init(jax.random.key(4), x, mask=mask)
    target = jax.random.normal(jax.random.key(5), (BATCH, LENGTH, FEATURES))

    def loss(module):
        return lambda params, x: jnp.sum(module.apply(params, x, mask=mask) * target * weights)

    grads_ours = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    grads_theirs = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
    _close(grads_ours, grads_theirs)
    _close(ours.apply(params, x, mask=mask) * weights, theirs.apply(params, x, mask=mask) * weights)


@pytest.mark.compat
def test_function_matches_flax_with_bias_mask_and_batch_axes():
    # Two batch axes, a float mask (flax's masks are float32) combined with is_causal,
    # and a bias, against flax.nnx.dot_product_attention (which needs them spelled out
    # along the batch axes); then the same mask and bias broadcast along them.
    keys = jax.random.split(jax.random.key(6), 5)
    q = jax.random.normal(keys[0], (2, 3, 20, 4, 8))
    k = jax.random.normal(keys[1], (2, 3, 20, 4, 8))
    v = jax.random.normal(keys[2], (2, 3, 20, 4, 8))
    bias = jax.random.normal(keys[3], (3, 4, 20, 20))
    mask = (jax.random.uniform(keys[4], (2, 1, 1, 20, 20)) < 0.8).astype(jnp.float32)
    mask = mask.at[..., 0].set(1.0)  # every row keeps a key
    full_bias = jnp.broadcast_to(bias, (2, 3, 4, 20, 20))
    full_mask = jnp.broadcast_to(mask, (2, 3, 1, 20, 20))
    theirs = nnx.dot_product_attention(q, k, v, full_bias, full_mask, is_causal=True)
    for b, m in ((full_bias, full_mask), (bias, mask)):
        ours = flax_dot_product_attention(q, k, v, b, m, is_causal=True)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("broadcast", [True, False])
def test_dropout_is_the_documented_keep_mask(broadcast):
    # With dropout the output is flax's dense attention with the weights dropped where
    # dropout_keep_mask says (shared across batch and heads with broadcast_dropout).
    keys = jax.random.split(jax.random.key(7), 3)
    q, k, v = (jax.random.normal(key, (2, 32, 4, 8)) for key in keys)
    rng, rate = jax.random.key(8), 0.3
    ours = flax_dot_product_attention(
        q, k, v, dropout_rng=rng, dropout_rate=rate, broadcast_dropout=broadcast, is_causal=True
    )
    weights = dot_product_attention_weights(q, k, is_causal=True)  # (B, H, Lq, Lk)
    keep = dropout_keep_mask(rng, rate, (2, 4, 32, 32), shared=broadcast)
    expected = jnp.einsum("bhqk,bkhd->bqhd", jnp.where(keep, weights / (1 - rate), 0.0), v)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), atol=2e-5, rtol=1e-4)
    if broadcast:
        assert (np.asarray(keep) == np.asarray(keep)[:1, :1]).all()
    deterministic = flax_dot_product_attention(
        q, k, v, dropout_rng=rng, dropout_rate=rate, deterministic=True, is_causal=True
    )
    plain = nnx.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(np.asarray(deterministic), np.asarray(plain), atol=2e-5)


def test_nnx_dropout_applied_reproducible_and_finite():
    def make(seed):
        return nnx.MultiHeadAttention(
            num_heads=HEADS,
            in_features=FEATURES,
            decode=False,
            dropout_rate=0.2,
            attention_fn=flax_dot_product_attention,
            rngs=nnx.Rngs(params=0, dropout=seed),
        )

    x = _inputs(9)
    first, again, other = make(1), make(1), make(2)
    out = first(x, is_causal=True, deterministic=False)
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(again(x, is_causal=True, deterministic=False))
    )
    assert not np.allclose(
        np.asarray(out), np.asarray(other(x, is_causal=True, deterministic=False))
    )
    # The stream advances: the next call draws other decisions.
    assert not np.allclose(
        np.asarray(out), np.asarray(first(x, is_causal=True, deterministic=False))
    )
    clean = first(x, is_causal=True, deterministic=True)
    assert not np.allclose(np.asarray(out), np.asarray(clean))
    grads = nnx.grad(lambda m: jnp.sum(m(x, is_causal=True, deterministic=False) ** 2))(first)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert np.isfinite(np.asarray(out)).all()


def test_linen_dropout_reproducible_per_rng():
    x = _inputs(10)
    module = nn.MultiHeadDotProductAttention(
        num_heads=HEADS, dropout_rate=0.2, attention_fn=flax_dot_product_attention
    )
    params = module.init(jax.random.key(0), x, deterministic=True)

    def run(seed):
        return module.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(seed)})

    np.testing.assert_array_equal(np.asarray(run(1)), np.asarray(run(1)))
    assert not np.allclose(np.asarray(run(1)), np.asarray(run(2)))
    assert np.isfinite(np.asarray(run(3))).all()


@pytest.mark.compat
def test_sow_weights_and_other_settings_are_refused():
    ours, _ = _nnx_pair()
    x = _inputs(11)
    with pytest.raises(ValueError, match="never materialised"):
        ours(x, sow_weights=True)
    linen = nn.MultiHeadDotProductAttention(
        num_heads=HEADS, attention_fn=flax_dot_product_attention
    )
    params = linen.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="never materialised"):
        linen.apply(params, x, sow_weights=True)
    precise, _ = _nnx_pair(precision=jax.lax.Precision.HIGHEST)
    with pytest.raises(ValueError, match="precision"):
        precise(x)
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="dropout_rng"):
        flax_dot_product_attention(q, q, q, dropout_rate=0.1)
    with pytest.raises(ValueError, match="dropout_rate"):
        flax_dot_product_attention(q, q, q, dropout_rate=1.0, deterministic=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'blocksize'"):
        flax_dot_product_attention(q, q, q, blocksize=16)


def test_dtype_is_honoured():
    keys = jax.random.split(jax.random.key(12), 3)
    q, k, v = (jax.random.normal(key, (1, 32, 2, 16)) for key in keys)
    ours = flax_dot_product_attention(q, k, v, dtype=jnp.bfloat16, is_causal=True)
    theirs = nnx.dot_product_attention(q, k, v, dtype=jnp.bfloat16, is_causal=True)
    assert ours.dtype == theirs.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(ours, np.float32), np.asarray(theirs, np.float32), atol=3e-2, rtol=3e-2
    )
