"""Each bad argument gets a TypeError or ValueError that names it and says what was
expected and what came; unknown flex ``kernel_options`` get a warning naming them."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import create_block_mask, flex, masked_attention_via_map, ring_attention

Q = jnp.ones((2, 16, 4, 8))
K = jnp.ones((2, 16, 2, 8))


@pytest.mark.compat
@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (lambda: masked_attention_via_map(None, K, K), TypeError, r"Q must be an array.*NoneType"),
        (lambda: masked_attention_via_map(Q, K, "v"), TypeError, r"V must be an array.*str"),
        (lambda: flex.flex_attention(None, K, K), TypeError, r"query must be an array.*NoneType"),
        (lambda: flex.flex_attention("abc", K, K), TypeError, r"query must be an array.*str"),
        (
            lambda: flex.flex_attention(Q, K.astype(jnp.int32), K),
            TypeError,
            r"key must have a floating dtype.*int32",
        ),
        (
            lambda: masked_attention_via_map(
                Q, K, K, dropout_rate=0.1, dropout_rng=jnp.zeros(3, jnp.uint32)
            ),
            ValueError,
            r"dropout_rng must be a single PRNG key.*\(2,\).*got a uint32 array of shape \(3,\)",
        ),
    ],
)
def test_bad_argument_is_named(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


@pytest.mark.parametrize(
    ("mesh", "pattern"),
    [(None, r"mesh must be a jax.sharding.Mesh.*NoneType"), ("seq", r"got str.*seq_axis=")],
)
def test_ring_mesh_that_is_not_a_mesh(mesh, pattern):
    with pytest.raises(TypeError, match=pattern):
        ring_attention(Q, K, K, mesh=mesh, seq_axis="seq")


def test_ring_sinks_of_the_wrong_length():
    mesh = jax.make_mesh((1,), ("seq",))
    with pytest.raises(ValueError, match=r"sinks must have shape \(Hq,\) = \(4,\), got \(3,\)"):
        ring_attention(Q, K, K, mesh=mesh, seq_axis="seq", sinks=jnp.zeros(3))


def test_raw_keys_of_the_default_shape_still_work(ref):
    """A raw ``PRNGKey`` and a typed key draw the same decisions."""
    q, k, v = ref.qkv(0, 1, 16, 16, 2, 2, 8)
    options = {"dropout_rate": 0.5, "block_size": 16}
    raw = masked_attention_via_map(q, k, v, dropout_rng=jax.random.PRNGKey(3), **options)
    typed = masked_attention_via_map(
        q, k, v, dropout_rng=jax.random.wrap_key_data(jax.random.PRNGKey(3)), **options
    )
    np.testing.assert_array_equal(raw, typed)


def test_unknown_kernel_options_are_named(ref):
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in ref.qkv(1, 1, 32, 32, 2, 2, 8))
    known = {"BLOCK_M": 16, "fwd_num_warps": 4, "bwd_BLOCK_N1": 32, "PRESCALE_QK": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = flex.flex_attention(q, k, v, kernel_options=known)
    with pytest.warns(UserWarning, match=r"unknown key\(s\) 'BLOCKM', 'blockm', ignored"):
        out = flex.flex_attention(q, k, v, kernel_options={**known, "BLOCKM": 1, "blockm": 2})
    np.testing.assert_array_equal(out, expected)


def test_layout_hint_for_pytorch_layout_in_the_core():
    """(B, H, L, E) given to masked_attention_via_map: shapes that fit swapped."""
    q, k = jnp.ones((2, 4, 16, 8)), jnp.ones((2, 2, 12, 8))
    with pytest.raises(ValueError, match=r"Hq=16 .* Hkv=12.*axes swapped.*flex_attention"):
        masked_attention_via_map(q, k, k)


def test_layout_hint_for_core_layout_in_flex():
    """(B, L, H, E) given to flex: a shape error, or a block mask built for the lengths."""
    q, k = jnp.ones((2, 16, 4, 8)), jnp.ones((2, 12, 2, 8))
    with pytest.raises(ValueError, match=r"number of heads.*axes swapped.*\(B, H, L, E\)"):
        flex.flex_attention(q, k, k)
    block_mask = flex.create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 16, 16)
    square = jnp.ones((2, 16, 4, 8))
    with pytest.raises(ValueError, match=r"block_mask.*head counts.*\(B, L, H, E\)"):
        flex.flex_attention(square, square, square, block_mask=block_mask)


def test_core_block_mask_hint_names_the_layouts():
    block_mask = create_block_mask(None, 1, 1, 16, 16, is_causal=True)
    x = jnp.swapaxes(jnp.ones((1, 16, 4, 8)), 1, 2)  # (B, H, L, E)
    with pytest.raises(ValueError, match=r"heads axis has the block mask's lengths"):
        masked_attention_via_map(x, x, x, block_mask=block_mask)


def test_create_block_mask_takes_none_as_broadcast(ref):
    """``None`` for ``B`` and ``H`` means 1, as in PyTorch and in flex.create_block_mask."""

    def mask_fn(b, h, q, k):
        return (k <= q) & (q - k < 20)

    with_none = create_block_mask(mask_fn, None, None, 48, 48, block_size=16)
    with_one = create_block_mask(mask_fn, 1, 1, 48, 48, block_size=16)
    assert with_none.shape == (1, 1, 48, 48)
    np.testing.assert_array_equal(with_none.to_dense(), ref.mask(1, 1, 48, 48, mask_fn=mask_fn))
    np.testing.assert_array_equal(with_none.to_dense(), with_one.to_dense())
