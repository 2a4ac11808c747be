"""Property tests: block classes, lists and dense masks of random block masks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxmodules.attention import create_block_mask, masked_attention_via_map

EMPTY, PARTIAL, FULL = 0, 1, 2
window_side = st.one_of(st.none(), st.integers(0, 40))
fixture_ok = [HealthCheck.function_scoped_fixture]


def _brute_force_classes(visible, q_block, k_block):
    """EMPTY / PARTIAL / FULL per block, straight from a dense mask (..., Lq, Lk)."""
    *lead, q_len, k_len = visible.shape
    n_q, n_k = -(-q_len // q_block), -(-k_len // k_block)
    classes = np.empty((*lead, n_q, n_k), np.int8)
    for i in range(n_q):
        for j in range(n_k):
            # Key padding counts as masked; query padding is ignored.
            part = visible[..., i * q_block : (i + 1) * q_block, j * k_block : (j + 1) * k_block]
            full = part.all(axis=(-1, -2)) & (part.shape[-1] == k_block)
            classes[..., i, j] = np.where(
                full, FULL, np.where(part.any(axis=(-1, -2)), PARTIAL, EMPTY)
            )
    return classes


def _classes(block_mask, batch, heads):
    got = np.asarray(block_mask.block_classes())
    return np.broadcast_to(got, (batch, heads, *got.shape[2:]))


@pytest.mark.compat
@settings(max_examples=80, deadline=None, suppress_health_check=fixture_ok)
@given(
    q_len=st.integers(1, 70),
    k_len=st.integers(1, 70),
    q_block=st.integers(1, 32),
    k_block=st.integers(1, 32),
    is_causal=st.booleans(),
    left=window_side,
    right=window_side,
    offset=st.integers(-20, 60),
)
def test_structural_classes_match_brute_force(
    ref, q_len, k_len, q_block, k_block, is_causal, left, right, offset
):
    window = (left, right)
    bm = create_block_mask(
        None,
        1,
        1,
        q_len,
        k_len,
        is_causal=is_causal,
        window_size=window,
        q_offset=offset,
        block_size=(q_block, k_block),
    )
    visible = ref.mask(1, 1, q_len, k_len, is_causal=is_causal, window=window, q_offset=offset)
    bq, bk = min(q_block, q_len), min(k_block, k_len)
    np.testing.assert_array_equal(_classes(bm, 1, 1), _brute_force_classes(visible, bq, bk))


@settings(max_examples=15, deadline=None, suppress_health_check=fixture_ok)
@given(
    q_len=st.integers(1, 48),
    k_len=st.integers(1, 48),
    q_block=st.integers(1, 20),
    k_block=st.integers(1, 20),
    is_causal=st.booleans(),
    left=window_side,
    period=st.integers(1, 40),
    cut=st.integers(0, 40),
    offsets=st.lists(st.integers(-10, 30), min_size=2, max_size=2),
)
def test_mask_fn_classes_and_dense_match_brute_force(
    ref, q_len, k_len, q_block, k_block, is_causal, left, period, cut, offsets
):
    def mask_fn(b, h, q, k):
        return ((q // period) == (k // period)) | (k < cut - h - 3 * b)

    offset = np.asarray(offsets, np.int32)
    options = {"is_causal": is_causal, "window_size": (left, None), "q_offset": offset}
    bm = create_block_mask(mask_fn, 2, 2, q_len, k_len, block_size=(q_block, k_block), **options)
    visible = ref.mask(
        2,
        2,
        q_len,
        k_len,
        is_causal=is_causal,
        window=(left, None),
        mask_fn=mask_fn,
        q_offset=offset,
    )
    bq, bk = min(q_block, q_len), min(k_block, k_len)
    expected = _brute_force_classes(visible, bq, bk)
    np.testing.assert_array_equal(_classes(bm, 2, 2), expected)
    np.testing.assert_array_equal(np.asarray(bm.to_dense()), visible)
    assert np.isclose(bm.sparsity(), np.mean(expected == EMPTY))


@settings(max_examples=20, deadline=None)
@given(
    q_len=st.integers(1, 60),
    k_len=st.integers(1, 60),
    block=st.integers(1, 16),
    is_causal=st.booleans(),
    left=window_side,
    modulus=st.integers(2, 6),
)
def test_lists_are_sorted_padded_and_transposes_of_each_other(
    q_len, k_len, block, is_causal, left, modulus
):
    bm = create_block_mask(
        lambda b, h, q, k: (q * 7 + k) % modulus != 0,
        1,
        1,
        q_len,
        k_len,
        is_causal=is_causal,
        window_size=(left, 3),
        block_size=block,
    )
    n_q, n_k = bm.num_blocks
    kv = np.zeros((n_q, n_k), np.int8)
    qs = np.zeros((n_k, n_q), np.int8)
    for count, index, value, grid in (
        (bm.kv_num_blocks, bm.kv_indices, PARTIAL, kv),
        (bm.full_kv_num_blocks, bm.full_kv_indices, FULL, kv),
        (bm.q_num_blocks, bm.q_indices, PARTIAL, qs),
        (bm.full_q_num_blocks, bm.full_q_indices, FULL, qs),
    ):
        count, index = np.asarray(count)[0, 0], np.asarray(index)[0, 0]
        for row, (n, entries) in enumerate(zip(count, index, strict=True)):
            listed = entries[:n]
            assert np.all(np.diff(listed) > 0), (listed, "not ascending")
            if n:
                assert np.all(entries[n:] == listed[-1]), "padding must repeat the last index"
            assert np.all(grid[row, listed] == 0), "a block listed twice"
            grid[row, listed] = value
    np.testing.assert_array_equal(kv, qs.T)
    np.testing.assert_array_equal(kv, np.asarray(bm.block_classes())[0, 0])


@settings(max_examples=12, deadline=None, suppress_health_check=fixture_ok)
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
