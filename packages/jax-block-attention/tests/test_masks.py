"""Property tests: block classification and results for random windows and masks."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxmodules.attention import masked_attention_via_map
from jaxmodules.attention._masks import (
    EMPTY,
    FULL,
    PARTIAL,
    static_mask_classes,
    structural_classes,
)

window_side = st.one_of(st.none(), st.integers(0, 40))


def _brute_force_classes(visible, q_block, k_block):
    """EMPTY / PARTIAL / FULL per block, straight from the dense mask (B, H, Lq, Lk)."""
    *_, q_len, k_len = visible.shape
    n_q, n_k = -(-q_len // q_block), -(-k_len // k_block)
    classes = np.empty((n_q, n_k), np.int8)
    for i in range(n_q):
        for j in range(n_k):
            # Key padding counts as masked; query padding is ignored.
            block = np.zeros((*visible.shape[:2], q_block, k_block), bool)
            part = visible[..., i * q_block : (i + 1) * q_block, j * k_block : (j + 1) * k_block]
            block[..., : part.shape[-2], : part.shape[-1]] = part
            block = block[..., : part.shape[-2], :]
            classes[i, j] = FULL if block.all() else PARTIAL if block.any() else EMPTY
    return classes


@settings(max_examples=150, deadline=None)
@given(
    q_len=st.integers(1, 70),
    k_len=st.integers(1, 70),
    q_block=st.integers(1, 32),
    k_block=st.integers(1, 32),
    is_causal=st.booleans(),
    left=window_side,
    right=window_side,
)
def test_structural_classes_match_brute_force(
    ref, q_len, k_len, q_block, k_block, is_causal, left, right
):
    visible = ref.mask(1, 1, q_len, k_len, is_causal=is_causal, window=(left, right))
    got = structural_classes(q_len, k_len, q_block, k_block, is_causal, (left, right))
    np.testing.assert_array_equal(got, _brute_force_classes(visible, q_block, k_block))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    q_len=st.integers(1, 48),
    k_len=st.integers(1, 48),
    q_block=st.integers(1, 20),
    k_block=st.integers(1, 20),
    is_causal=st.booleans(),
    left=window_side,
    period=st.integers(1, 40),
    cut=st.integers(0, 40),
)
def test_mask_fn_classes_match_brute_force(
    ref, q_len, k_len, q_block, k_block, is_causal, left, period, cut
):
    def mask_fn(b, h, q, k):
        return ((q // period) == (k // period)) | (k < cut - h)

    visible = ref.mask(
        2, 2, q_len, k_len, is_causal=is_causal, window=(left, None), mask_fn=mask_fn
    )
    structural = structural_classes(q_len, k_len, q_block, k_block, is_causal, (left, None))
    got = static_mask_classes(
        mask_fn,
        structural,
        batch=2,
        heads=2,
        q_len=q_len,
        k_len=k_len,
        q_block=q_block,
        k_block=k_block,
        is_causal=is_causal,
        window=(left, None),
    )
    np.testing.assert_array_equal(got, _brute_force_classes(visible, q_block, k_block))


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    q_len=st.integers(1, 40),
    k_len=st.integers(1, 40),
    block=st.integers(4, 24),
    is_causal=st.booleans(),
    left=window_side,
    right=window_side,
    modulus=st.integers(2, 5),
    seed=st.integers(0, 1000),
)
def test_random_masks_match_reference(
    ref, q_len, k_len, block, is_causal, left, right, modulus, seed
):
    q, k, v = ref.qkv(seed, 1, q_len, k_len, 2, 1, 4)

    def mask_fn(b, h, q, k):
        return (q + k * (h + 1)) % modulus != 0

    options = {"is_causal": is_causal, "window_size": (left, right), "mask_fn": mask_fn}
    out = masked_attention_via_map(q, k, v, block_size=block, **options)
    visible = ref.mask(
        1, 2, q_len, k_len, is_causal=is_causal, window=(left, right), mask_fn=mask_fn
    )
    np.testing.assert_allclose(out, ref.attention(q, k, v, visible), atol=2e-6, rtol=2e-5)
