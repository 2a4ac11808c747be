"""What the Mosaic GPU kernels walk (``_mosaic_gpu/_blocks``): the tables handed to the
kernels stay O(blocks) for a band and for documents, and the walk each row reads from its
table (``row_walk``, the function the kernels call) visits exactly the non-empty blocks,
partial ones first, each with its class computed independently from the dense mask."""

from __future__ import annotations

import numpy as np
import pytest

from jaxmodules.attention import create_block_mask
from jaxmodules.attention._config import BlockConfig, block_fields
from jaxmodules.attention._mosaic_gpu._blocks import row_walk, table_row, walk_tables


def _config(bm):
    _, _, q_len, k_len = bm.shape
    return BlockConfig(**block_fields(bm, q_len=q_len, k_len=k_len, scale=1.0))


def _documents(size):
    return lambda b, h, q, k: q // size == k // size


@pytest.mark.parametrize(
    "options",
    [{"is_causal": True}, {"window_size": (4096, 0)}, {"is_causal": True, "q_offset": 100}],
)
def test_a_band_hands_the_kernels_one_row_per_batch_row(options):
    # L = 1,048,576: 8192 blocks per side, no list and no per-block row.
    n = 1 << 20
    bm = create_block_mask(None, 1, 1, n, n, block_size=128, **options)
    assert bm.walk == "band"
    for table in walk_tables(bm):
        assert table.shape == (1, 1, 1, 4)
        assert int(table[0, 0, 0, 0]) == options.get("q_offset", 0)


def test_documents_hand_the_kernels_eight_numbers_per_block_row():
    n, block = 1 << 15, 128
    bm = create_block_mask(_documents(1000), None, None, n, n, is_causal=True, block_size=block)
    assert bm.walk == "ranges"
    blocks = n // block
    for table in walk_tables(bm):
        assert table.shape == (1, 1, blocks, 8)  # a list per row would be blocks wide


def _reference_classes(q_len, k_len, block, offset, visible):
    """Block classes from the dense mask: empty 0, partial 1, full 2 (a block with
    padded keys is never full)."""
    q = np.arange(q_len)[:, None] + offset
    k = np.arange(k_len)[None, :]
    dense = np.broadcast_to(visible(q, k), (q_len, k_len))
    n_q, n_k = -(-q_len // block), -(-k_len // block)
    classes = np.zeros((n_q, n_k), np.int8)
    for i in range(n_q):
        for j in range(n_k):
            tile = dense[i * block : (i + 1) * block, j * block : (j + 1) * block]
            if tile.any():
                whole = tile.all() and (j + 1) * block <= k_len
                classes[i, j] = 2 if whole else 1
    return classes


def _walked_classes(config, table, n_rows, n_cols, side):
    classes = np.zeros((n_rows, n_cols), np.int8)
    for row in range(n_rows):
        count, n_partial, block = row_walk(config, table[table_row(config, row)], row, side)
        blocks = [int(block(t)) for t in range(int(count))]
        partial, full = blocks[: int(n_partial)], blocks[int(n_partial) :]
        assert partial == sorted(set(partial)) and full == sorted(set(full))
        classes[row, partial] = 1
        classes[row, full] = 2
        assert len(set(blocks)) == len(blocks)
    return classes


WALKS = {
    "band_causal_offset": (
        {"is_causal": True, "q_offset": 37},
        "band",
        lambda q, k: k <= q,
    ),
    "band_window": ({"window_size": (40, 9)}, "band", lambda q, k: (q - k <= 40) & (k - q <= 9)),
    "ranges_documents": (
        {"is_causal": True, "mask_fn": _documents(50)},
        "ranges",
        lambda q, k: (k <= q) & (q // 50 == k // 50),
    ),
    "lists_holes": (
        {"mask_fn": lambda b, h, q, k: (k // 16) % 3 != 1},
        "lists",
        lambda q, k: (k // 16) % 3 != 1 + 0 * q,
    ),
}


@pytest.mark.parametrize("case", list(WALKS))
def test_the_walk_visits_the_reference_block_classes(case):
    options, walk, visible = WALKS[case]
    options = dict(options)
    mask_fn = options.pop("mask_fn", None)
    q_len, k_len, block = 150, 180, 16
    bm = create_block_mask(mask_fn, None, None, q_len, k_len, block_size=block, **options)
    assert bm.walk == walk
    config = _config(bm)
    want = _reference_classes(q_len, k_len, block, options.get("q_offset", 0), visible)
    np.testing.assert_array_equal(np.asarray(bm.block_classes())[0, 0], want)
    by_query, by_key = (np.asarray(t)[0, 0] for t in walk_tables(bm))
    n_q, n_k = want.shape
    np.testing.assert_array_equal(_walked_classes(config, by_query, n_q, n_k, "kv"), want)
    np.testing.assert_array_equal(_walked_classes(config, by_key, n_k, n_q, "q"), want.T)
