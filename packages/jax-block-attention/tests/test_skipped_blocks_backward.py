"""Skipped blocks stay skipped in the backward pass too.

NaN is written into the keys and values of a key block that the mask hides from every
query. A block that is really skipped never touches them; one that is computed and then
masked turns them into NaN (``0 * NaN`` is NaN). The output and all three gradients must
be finite and equal to a float64 reference computed on clean inputs, with zero
gradients for the hidden keys and values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import masked_attention_via_map

# Also run on the older jax versions: the compiled program they read changes form.
pytestmark = pytest.mark.compat

BLOCK = 16
BATCH, LENGTH, Q_HEADS, KV_HEADS, DIM = 2, 64, 4, 2, 8
HIDDEN = slice(32, 48)  # key block 2 at BLOCK = 16


def poisoned(k, v, hidden):
    return k.at[:, hidden].set(jnp.nan), v.at[:, hidden].set(jnp.nan)


def check(ref, q, k, v, mask, out, grads, d_out):
    """Finite and equal to the reference computed on the clean ``k`` and ``v``."""
    for name, x in zip(["out", "dQ", "dK", "dV"], (out, *grads), strict=True):
        assert np.isfinite(np.asarray(x)).all(), f"{name} holds NaN or inf"
    np.testing.assert_allclose(out, ref.attention(q, k, v, mask), atol=2e-6, rtol=2e-5)
    expected = ref.gradients(q, k, v, mask, d_out)
    for name, got, want in zip("QKV", grads, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=f"d{name}")


def value_and_grads(attend, q, k, v, d_out):
    out, pullback = jax.vjp(attend, q, k, v)
    return out, pullback(jnp.asarray(d_out, out.dtype))


def hide_block(b, h, q, k):
    return (k < HIDDEN.start) | (k >= HIDDEN.stop)


@pytest.mark.parametrize("where", ["trace_time", "on_device"])
def test_a_block_hidden_by_mask_fn_is_skipped_in_both_passes(ref, where):
    q, k, v = ref.qkv(21, BATCH, LENGTH, LENGTH, Q_HEADS, KV_HEADS, DIM)
    d_out = np.random.default_rng(3).standard_normal((*q.shape[:3], DIM))
    mask = ref.mask(BATCH, Q_HEADS, LENGTH, LENGTH, mask_fn=hide_block)
    if where == "trace_time":

        def attend(q, k, v):
            return masked_attention_via_map(q, k, v, mask_fn=hide_block, block_size=BLOCK)

        out, grads = value_and_grads(attend, q, *poisoned(k, v, HIDDEN), d_out)
    else:  # the bound is traced, so which blocks are empty is found on the device

        @jax.jit
        def run(q, k, v, start):
            def attend(q, k, v):
                return masked_attention_via_map(
                    q,
                    k,
                    v,
                    mask_fn=lambda b, h, qi, ki: (ki < start) | (ki >= start + BLOCK),
                    block_size=BLOCK,
                )

            return value_and_grads(attend, q, k, v, d_out)

        out, grads = run(q, *poisoned(k, v, HIDDEN), HIDDEN.start)
    check(ref, q, k, v, mask, out, grads, d_out)
    # The hidden keys and values get exactly zero gradient, not NaN.
    assert not np.asarray(grads[1][:, HIDDEN]).any()
    assert not np.asarray(grads[2][:, HIDDEN]).any()


def test_future_blocks_of_a_causal_mask_are_skipped_in_both_passes(ref):
    """16 queries against 64 keys, causal: key blocks 1 to 3 lie wholly in the future."""
    q, k, v = ref.qkv(22, BATCH, BLOCK, LENGTH, Q_HEADS, KV_HEADS, DIM)
    d_out = np.random.default_rng(4).standard_normal((*q.shape[:3], DIM))
    mask = ref.mask(BATCH, Q_HEADS, BLOCK, LENGTH, is_causal=True)

    def attend(q, k, v):
        return masked_attention_via_map(q, k, v, is_causal=True, block_size=BLOCK)

    out, grads = value_and_grads(attend, q, *poisoned(k, v, slice(BLOCK, None)), d_out)
    check(ref, q, k, v, mask, out, grads, d_out)
