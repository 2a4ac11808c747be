"""The two-layer plan: band ranges by arithmetic, mask_fn ranges, lists only for holes,
sizes linear in the blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import _block_mask, create_block_mask, masked_attention_via_map
from jaxmodules.attention._band import kv_range, q_range
from jaxmodules.attention._mosaic_tpu._rules import mosaic_tpu_problem

EMPTY, PARTIAL, FULL = 0, 1, 2


def _dense_classes(visible, q_block, k_block):
    """EMPTY / PARTIAL / FULL per block of a dense ``(Lq, Lk)`` mask (key padding
    counts as masked)."""
    q_len, k_len = visible.shape
    n_q, n_k = -(-q_len // q_block), -(-k_len // k_block)
    pad = np.zeros((n_q * q_block, n_k * k_block), bool)
    pad[:q_len, :k_len] = visible
    valid = np.zeros_like(pad)
    valid[:q_len, :] = True  # padded query rows are ignored
    blocks = pad.reshape(n_q, q_block, n_k, k_block)
    rows_valid = valid.reshape(n_q, q_block, n_k, k_block)
    any_ = blocks.any(axis=(1, 3))
    all_ = (blocks | ~rows_valid).all(axis=(1, 3))
    return np.where(all_ & any_, FULL, np.where(any_, PARTIAL, EMPTY))


def _from_ranges(first, last, full_first, full_last, n):
    j = np.arange(n)
    inside = (j >= first[:, None]) & (j < last[:, None])
    full = (j >= full_first[:, None]) & (j < full_last[:, None])
    return np.where(full, FULL, np.where(inside, PARTIAL, EMPTY))


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax"])
def test_band_ranges_match_dense_reference(xp):
    rng = np.random.default_rng(0)
    for _ in range(150 if xp is np else 40):
        q_len, k_len = (int(x) for x in rng.integers(1, 60, 2))
        q_block, k_block = (
            min(int(rng.integers(1, 20)), q_len),
            min(int(rng.integers(1, 20)), k_len),
        )
        lo = None if rng.random() < 0.3 else -int(rng.integers(0, 30))
        hi = None if rng.random() < 0.3 else int(rng.integers(-5, 30))
        offset = int(rng.integers(-15, 50))
        q = np.arange(q_len)[:, None] + offset
        k = np.arange(k_len)[None, :]
        visible = np.ones((q_len, k_len), bool)
        if lo is not None:
            visible &= k - q >= lo
        if hi is not None:
            visible &= k - q <= hi
        expected = _dense_classes(visible, q_block, k_block)
        n_q, n_k = expected.shape
        sizes = (q_len, k_len, q_block, k_block, lo, hi)
        rows = [np.asarray(r) for r in kv_range(xp, xp.arange(n_q), offset, *sizes)]
        cols = [np.asarray(r) for r in q_range(xp, xp.arange(n_k), offset, *sizes)]
        np.testing.assert_array_equal(_from_ranges(*rows, n_k), expected, err_msg=str(sizes))
        np.testing.assert_array_equal(_from_ranges(*cols, n_q), expected.T, err_msg=str(sizes))


def _documents(seed, length, count):
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, length), count - 1, replace=False))
    return np.searchsorted(cuts, np.arange(length), "right").astype(np.int32)


def test_documents_are_ranges_without_lists():
    length, block = 200, 16
    ids = _documents(1, length, 5)
    ids_j = jnp.asarray(ids)
    bm = create_block_mask(
        lambda b, h, q, k: ids_j[q] == ids_j[k], 1, 1, length, length, is_causal=True,
        block_size=block,
    )  # fmt: skip
    assert bm.walk == "ranges"
    assert bm.kv_ranges.shape == (1, 1, 13, 4) and bm.q_ranges.shape == (1, 1, 13, 4)
    visible = (ids[:, None] == ids[None, :]) & np.tri(length, dtype=bool)
    expected = _dense_classes(visible, block, block)
    np.testing.assert_array_equal(np.asarray(bm.block_classes())[0, 0], expected)
    ranges = np.asarray(bm.kv_ranges)[0, 0]
    # Each query block's range starts at the key block of its first document's start.
    starts = np.searchsorted(ids, ids[np.arange(0, length, block)], "left") // block
    np.testing.assert_array_equal(ranges[:, 0], starts)
    np.testing.assert_array_equal(_from_ranges(*np.asarray(bm.q_ranges)[0, 0].T, 13), expected.T)


def test_rows_with_holes_keep_lists_and_skip_the_holes(ref):
    length, block = 64, 8

    def prefix_and_documents(b, h, q, k):
        return (k < 8) | ((q // 24) == (k // 24))

    bm = create_block_mask(prefix_and_documents, 1, 1, length, length, block_size=block)
    assert bm.walk == "lists"
    visible = ref.mask(1, 1, length, length, mask_fn=prefix_and_documents)[0, 0]
    expected = _dense_classes(visible, block, block)
    np.testing.assert_array_equal(np.asarray(bm.block_classes())[0, 0], expected)
    q, k, v = ref.qkv(3, 1, length, length, 2, 1, 8)
    out = masked_attention_via_map(q, k, v, block_mask=bm)
    np.testing.assert_allclose(out, ref.attention(q, k, v, visible), atol=2e-6, rtol=2e-5)


_MOSAIC_TPU = mosaic_tpu_problem()


@pytest.mark.parametrize(
    "implementation",
    [
        None,
        # The TPU kernels in interpret mode: they walk the stored ranges themselves.
        pytest.param(
            "mosaic_tpu", marks=pytest.mark.skipif(_MOSAIC_TPU is not None, reason=str(_MOSAIC_TPU))
        ),
    ],
)
def test_traced_mask_over_a_large_grid_walks_ranges(ref, monkeypatch, implementation):
    """Above the list threshold a traced mask keeps ranges only; results and
    gradients are unchanged."""
    monkeypatch.setattr(_block_mask, "TRACED_LIST_PAIRS", 0)
    batch, length = 2, 72
    ids = np.stack([_documents(s, length, 4) for s in (5, 6)])
    q, k, v = ref.qkv(7, batch, length, length, 2, 1, 8)
    weights = ref.qkv(8, batch, length, length, 2, 1, 8)[0]

    def loss(q, k, v, ids):
        bm = create_block_mask(
            lambda b, h, qi, ki: ids[b, qi] == ids[b, ki], batch, 1, length, length,
            is_causal=True, block_size=(8, 16),
        )  # fmt: skip
        assert bm.walk == "ranges"
        out = masked_attention_via_map(q, k, v, block_mask=bm, implementation=implementation)
        return jnp.sum(out * weights)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, jnp.asarray(ids))
    mask = ref.mask(batch, 2, length, length, is_causal=True)
    mask = mask & (ids[:, None, :, None] == ids[:, None, None, :])
    expected = ref.gradients(q, k, v, mask, weights)
    for name, got, want in zip("QKV", grads, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-4, err_msg=f"d{name}")


def test_plan_sizes_grow_linearly():
    band = [
        create_block_mask(None, 1, 1, n, n, is_causal=True, block_size=64) for n in (4096, 1 << 20)
    ]
    assert [bm.nbytes for bm in band] == [4, 4]  # the offset alone
    assert band[1].walk == "band" and "plan: band, 4 bytes" in repr(band[1])
    sizes = []
    for length in (1024, 2048, 4096):
        bm = create_block_mask(
            lambda b, h, q, k: (q // 300) == (k // 300), 1, 1, length, length,
            is_causal=True, block_size=64,
        )  # fmt: skip
        assert bm.walk == "ranges"
        sizes.append(bm.nbytes)
    # 4 + 2 x 16 bytes per block row: linear in the blocks, never quadratic.
    assert sizes == [4 + 32 * (n // 64) for n in (1024, 2048, 4096)]
    assert np.isclose(band[0].sparsity(), 1 - (64 * 65 / 2) / 64**2)
