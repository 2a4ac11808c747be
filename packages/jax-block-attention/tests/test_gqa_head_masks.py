"""Head-dependent masks with real grouped-query attention, in float32 at tight tolerance.

With ``Hq = 6`` query heads on ``Hkv = 2`` key/value heads, query head ``h`` reads
key/value head ``h // 3``, and ``mask_fn`` sees the query head ``h``. Each head gets a
different mask here, so mixing up which query head pairs with which key/value head or
which mask (kv-head major against group major) changes the result well past rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import masked_attention_via_map

BATCH, Q_LEN, K_LEN, Q_HEADS, KV_HEADS, DIM = 2, 40, 56, 6, 2, 8
FORWARD = {"atol": 2e-6, "rtol": 2e-5}
BACKWARD = {"atol": 2e-5, "rtol": 1e-4}


def reach(h, q, k):
    """Head ``h`` sees the ``4 * h + 3`` keys up to its query, and only even keys if
    ``h`` is odd: no two heads share a mask."""
    window = (k <= q) & (q - k <= 4 * h + 3)
    return window & ((h % 2 == 0) | (k % 2 == 0))


def reach_b(b, h, q, k):
    """``reach`` plus a batch row that also hides the first keys."""
    return reach(h, q, k) & ((b == 0) | (k >= 5))


def check(ref, q, k, v, mask, out, grads):
    np.testing.assert_allclose(out, ref.attention(q, k, v, mask), **FORWARD)
    expected = ref.gradients(q, k, v, mask, np.ones(out.shape))
    for name, got, want in zip("QKV", grads, expected, strict=True):
        np.testing.assert_allclose(got, want, err_msg=f"d{name}", **BACKWARD)


@pytest.mark.parametrize("block_size", [16, (8, 16)])
@pytest.mark.parametrize("mask_fn", [reach, reach_b], ids=["h_q_k", "b_h_q_k"])
def test_head_dependent_mask_fn_with_gqa_in_float32(ref, mask_fn, block_size):
    q, k, v = ref.qkv(11, BATCH, Q_LEN, K_LEN, Q_HEADS, KV_HEADS, DIM)
    mask = ref.mask(BATCH, Q_HEADS, Q_LEN, K_LEN, mask_fn=mask_fn)
    # Every head's mask differs from every other's, so a head mix-up cannot cancel out.
    assert len({mask[:, h].tobytes() for h in range(Q_HEADS)}) == Q_HEADS

    def attend(q, k, v):
        return masked_attention_via_map(q, k, v, mask_fn=mask_fn, block_size=block_size)

    out = attend(q, k, v)
    grads = jax.grad(lambda *a: attend(*a).sum(), argnums=(0, 1, 2))(q, k, v)
    check(ref, q, k, v, mask, out, grads)


def test_head_dependent_mask_closing_over_a_traced_array_with_gqa(ref):
    """The per-head reach comes from a traced array, so the mask is built on device."""
    q, k, v = ref.qkv(12, BATCH, Q_LEN, K_LEN, Q_HEADS, KV_HEADS, DIM)
    reaches = np.array([3, 17, 5, 40, 0, 9], np.int32)

    def attend(q, k, v, reaches):
        def mask_fn(h, q_pos, k_pos):
            return (k_pos <= q_pos) & (q_pos - k_pos <= reaches[h])

        return masked_attention_via_map(q, k, v, mask_fn=mask_fn, block_size=16)

    out = jax.jit(attend)(q, k, v, jnp.asarray(reaches))
    grads = jax.jit(jax.grad(lambda *a: attend(*a).sum(), argnums=(0, 1, 2)))(
        q, k, v, jnp.asarray(reaches)
    )
    mask = ref.mask(
        BATCH,
        Q_HEADS,
        Q_LEN,
        K_LEN,
        mask_fn=lambda h, q_pos, k_pos: (k_pos <= q_pos) & (q_pos - k_pos <= reaches[h]),
    )
    check(ref, q, k, v, mask, out, grads)
