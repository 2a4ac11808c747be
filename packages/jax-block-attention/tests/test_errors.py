"""Bad input gets a ValueError or TypeError that names the argument and the shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import masked_attention_via_map

# Also run on the older jax versions: cheap, and the checks meet each version's tracers.
pytestmark = pytest.mark.compat

Q = jnp.ones((2, 10, 4, 8))
K = jnp.ones((2, 12, 2, 8))
V = jnp.ones((2, 12, 2, 6))


@pytest.mark.parametrize(
    ("q", "k", "v", "error", "pattern"),
    [
        (jnp.ones((10, 8)), K[0], V[0], ValueError, r"Q must have rank 4 .* got rank 2"),
        (Q, K[0], V, ValueError, r"K must have the same rank as Q \(4\), got rank 3"),
        (Q, K, V[0], ValueError, r"V must have the same rank as Q"),
        (Q, K[:1], V[:1], ValueError, r"same batch size.*Q \(2, 10, 4, 8\), K \(1, 12, 2, 8\)"),
        (Q, K, V[:, :11], ValueError, r"K and V must have the same length.*V \(2, 11, 2, 6\)"),
        (Q, K, V[:, :, :1], ValueError, r"K and V must have the same number of heads"),
        (Q, K[..., :7], V, ValueError, r"Q and K must have the same head dimension"),
        (Q[:, :, :3], K, V, ValueError, r"Hq=3 must be a multiple of .* Hkv=2"),
        (Q.astype(jnp.int32), K, V, TypeError, r"Q must have a floating dtype.*int32"),
        (Q, K, V.astype(jnp.bool_), TypeError, r"V must have a floating dtype.*bool"),
        (Q, "keys", V, TypeError, r"K must have a floating dtype|K must be an array"),
    ],
)
def test_bad_arrays(q, k, v, error, pattern):
    with pytest.raises(error, match=pattern):
        masked_attention_via_map(q, k, v)


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        ({"block_size": 0}, ValueError, r"block_size must be a positive int, got 0"),
        ({"block_size": -8}, ValueError, r"block_size must be a positive int, got -8"),
        ({"block_size": 16.0}, TypeError, r"block_size must be a positive int, got 16.0"),
        ({"block_size": True}, TypeError, r"block_size must be a positive int"),
        ({"block_size": (8, 0)}, ValueError, r"block_size\[1\] must be a positive int"),
        ({"block_size": (8, 8, 8)}, ValueError, r"block_size must be an int or a pair"),
        ({"window_size": (-1, 3)}, ValueError, r"window_size\[0\] \(left\) must be a non-neg"),
        ({"window_size": (2, 1.5)}, TypeError, r"window_size\[1\] \(right\) must be a non-neg"),
        ({"window_size": (1, 2, 3)}, ValueError, r"window_size must be a pair"),
        ({"window_size": -4}, ValueError, r"window_size must be a non-negative int"),
        ({"window_size": "wide"}, TypeError, r"window_size must be a non-negative int"),
        ({"scale": "big"}, TypeError, r"scale must be a real number or a floating scalar array"),
        ({"scale": float("nan")}, ValueError, r"scale must be finite"),
        ({"scale": np.ones(2)}, TypeError, r"scale must be a scalar"),
        ({"is_causal": "yes"}, TypeError, r"is_causal must be a bool"),
        ({"mask_fn": 3}, TypeError, r"mask_fn must be callable or None, got int"),
    ],
)
def test_bad_options(options, error, pattern):
    with pytest.raises(error, match=pattern):
        masked_attention_via_map(Q, K, V, **options)


def test_mask_fn_with_wrong_arity():
    with pytest.raises(TypeError, match=r"mask_fn must take 4 .* or 3 .* \(q, k\)"):
        masked_attention_via_map(Q, K, V, mask_fn=lambda q, k: q >= k)
    with pytest.raises(TypeError, match=r"mask_fn must take 4"):
        masked_attention_via_map(Q, K, V, mask_fn=lambda a, b, c, d, e: a)


def test_mask_fn_with_non_boolean_result():
    with pytest.raises(TypeError, match=r"mask_fn must return booleans.*int32"):
        masked_attention_via_map(Q, K, V, mask_fn=lambda b, h, q, k: q - k)


def test_mask_fn_with_wrong_result_shape():
    with pytest.raises(ValueError, match=r"mask_fn must be element-wise: .* returned shape \(3,\)"):
        masked_attention_via_map(
            Q, K, V, block_size=8, mask_fn=lambda b, h, q, k: jnp.ones(3, bool)
        )
    with pytest.raises(ValueError, match=r"element-wise: .* returned shape \(1,\) instead"):
        masked_attention_via_map(
            Q, K, V, block_size=8, mask_fn=lambda b, h, q, k: (q >= k + b + h)[..., None]
        )


def test_mask_fn_that_branches_in_python():
    def branching(b, h, q, k):
        return True if q > k else False  # noqa: SIM210 - the mistake under test

    with pytest.raises(TypeError, match=r"may not branch on them in Python.*scalar int32"):
        masked_attention_via_map(Q, K, V, mask_fn=branching)
    with pytest.raises(TypeError, match=r"mask_fn must be written with JAX array operations"):
        masked_attention_via_map(Q, K, V, mask_fn=lambda b, h, q, k: q >= int(k.max()))


def test_mask_fn_that_indexes_numpy_arrays():
    ids = np.arange(12) // 4
    with pytest.raises(TypeError, match=r"TracerArrayConversionError"):
        masked_attention_via_map(Q, K, V, mask_fn=lambda b, h, q, k: ids[q] == ids[k])


def test_errors_are_raised_under_jit_too():
    with pytest.raises(ValueError, match=r"Hq=4 must be a multiple of .* Hkv=3"):
        jax.jit(masked_attention_via_map)(Q, K[:, :, :1].repeat(3, 2), V[:, :, :1].repeat(3, 2))
