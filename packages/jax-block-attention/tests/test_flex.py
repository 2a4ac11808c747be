"""``jaxmodules.attention.flex`` without PyTorch: its mapping onto the core, against the
float64 reference and the core itself. (The comparison with PyTorch is in flex_torch/.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import BlockMask, flex, masked_attention_via_map


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _bhle(ref, batch=2, q_len=48, k_len=64, q_heads=4, kv_heads=2, d=16, seed=0):
    q, k, v = ref.qkv(seed, batch, q_len, k_len, q_heads, kv_heads, d)
    return q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2)


def _reference(ref, q, k, v, visible, **kw):
    """``dense_variants`` in float64 in the (B, H, L, E) layout: ``(out, lse)``."""
    with ref.float64():
        out, lse = ref.dense(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), visible, **kw)
    return np.asarray(out).swapaxes(1, 2), np.asarray(lse)


def test_block_mask_is_the_package_block_mask(ref):
    bm = flex.create_block_mask(causal, None, None, 48, 64, BLOCK_SIZE=(16, 32))
    assert isinstance(bm, BlockMask) and flex.BlockMask is BlockMask
    assert bm.shape == (1, 1, 48, 64) and bm.block_size == (16, 32)
    np.testing.assert_array_equal(bm.to_dense()[0, 0], np.tril(np.ones((48, 64), bool)))
    # It drives the core's entry point as well as flex_attention.
    q, k, v = _bhle(ref)
    core = masked_attention_via_map(
        q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), block_mask=bm
    )
    ours = flex.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    np.testing.assert_array_equal(ours, core.swapaxes(1, 2))


def test_forward_lse_and_gradients_against_float64(ref):
    q, k, v = _bhle(ref)
    slopes = jnp.asarray(2.0 ** -np.arange(1, 5), jnp.float32)
    doc = jnp.asarray(np.repeat(np.arange(3), [20, 30, 14])[None].repeat(2, 0), jnp.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) | (doc[b, q_idx] == doc[b, kv_idx])

    bm = flex.create_block_mask(mask_mod, 2, None, 48, 64, BLOCK_SIZE=16)
    visible = np.broadcast_to(
        np.asarray(flex.create_mask(mask_mod, 2, None, 48, 64)), (2, 4, 48, 64)
    )
    arrays = {"q": q.swapaxes(1, 2), "k": k.swapaxes(1, 2), "v": v.swapaxes(1, 2), "slopes": slopes}

    def attend(a, score_mod):
        out, lse = flex.flex_attention(
            a["q"].swapaxes(1, 2),
            a["k"].swapaxes(1, 2),
            a["v"].swapaxes(1, 2),
            score_mod=score_mod,
            block_mask=bm,
            scale=0.3,
            enable_gqa=True,
            return_lse=True,
        )
        return out.swapaxes(1, 2), lse

    (_, out, lse, grads), (_, out64, lse64, grads64) = ref.against_reference(
        attend,
        arrays,
        visible,
        np.random.default_rng(1),
        scale=0.3,
        make_mod=lambda a: ref.alibi(a["slopes"]),
        jit=True,
    )
    np.testing.assert_allclose(out, out64, atol=3e-5, rtol=1e-4)
    np.testing.assert_allclose(lse, lse64, atol=3e-5, rtol=1e-5)
    for name, got in grads.items():
        np.testing.assert_allclose(got, grads64[name], atol=1e-4, rtol=2e-4, err_msg=name)


@pytest.mark.compat
def test_return_aux_and_return_lse_agree(ref):
    q, k, v = _bhle(ref)
    out, lse = flex.flex_attention(q, k, v, enable_gqa=True, return_lse=True)
    out_aux, aux = flex.flex_attention(
        q, k, v, enable_gqa=True, return_aux=flex.AuxRequest(lse=True)
    )
    np.testing.assert_array_equal(out, out_aux)
    np.testing.assert_array_equal(lse, aux.lse)
    assert aux.max_scores is None
    _, no_lse = flex.flex_attention(q, k, v, enable_gqa=True, return_aux=flex.AuxRequest())
    assert no_lse == flex.AuxOutput()


def test_key_value_batch_of_one_broadcasts(ref):
    q, k, v = _bhle(ref, q_heads=2, kv_heads=2)
    out = flex.flex_attention(q, k[:1], v[:1])
    visible = np.ones((2, 2, 48, 64), bool)
    expected, _ = _reference(ref, q, jnp.repeat(k[:1], 2, 0), jnp.repeat(v[:1], 2, 0), visible)
    np.testing.assert_allclose(out, expected, atol=3e-5, rtol=1e-4)


def test_kernel_options_block_sizes_and_implementation(ref):
    q, k, v = _bhle(ref)
    visible = np.ones((2, 4, 48, 64), bool)
    expected, _ = _reference(ref, q, k, v, visible)
    options = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "PRESCALE_QK": True}
    for implementation in ("xla", "triton"):
        out = flex.flex_attention(
            q, k, v, enable_gqa=True, kernel_options={**options, "implementation": implementation}
        )
        np.testing.assert_allclose(out, expected, atol=3e-5, rtol=1e-4)
    # The block sizes reach the core: the Pallas kernel names the pair it refuses.
    with pytest.raises(ValueError, match=r"block_size=\(24, 32\)"):
        flex.flex_attention(
            q,
            k,
            v,
            enable_gqa=True,
            kernel_options={"BLOCK_M": 24, "fwd_BLOCK_N": 32, "implementation": "pallas"},
        )
    with pytest.raises(ValueError, match="fwd_BLOCK_M"):
        flex.flex_attention(q, k, v, enable_gqa=True, kernel_options={"fwd_BLOCK_M": 0})
    with pytest.raises(ValueError, match="implementation"):
        flex.flex_attention(q, k, v, enable_gqa=True, kernel_options={"implementation": "tpu"})
    # With a block mask, its BLOCK_SIZE is the block size and BLOCK_M/BLOCK_N are ignored.
    bm = flex.create_block_mask(causal, None, None, 48, 64, BLOCK_SIZE=16)
    with_options = flex.flex_attention(
        q, k, v, block_mask=bm, enable_gqa=True, kernel_options={"BLOCK_M": 64}
    )
    np.testing.assert_array_equal(
        with_options, flex.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    )


def test_block_mask_inside_jit_from_traced_documents(ref):
    q, k, v = _bhle(ref, q_len=64, k_len=64)
    doc = jnp.asarray(np.sort(np.random.default_rng(2).integers(0, 3, (2, 64)), axis=1), jnp.int32)

    @jax.jit
    def attend(q, k, v, doc):
        def same_doc(b, h, q_idx, kv_idx):
            return doc[b, q_idx] == doc[b, kv_idx]

        bm = flex.create_block_mask(
            flex.and_masks(causal, same_doc), 2, None, 64, 64, BLOCK_SIZE=16
        )
        return flex.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)

    d = np.asarray(doc)
    visible = (d[:, None, :, None] == d[:, None, None, :]) & np.tril(np.ones((64, 64), bool))
    expected, _ = _reference(ref, q, k, v, np.broadcast_to(visible, (2, 4, 64, 64)))
    np.testing.assert_allclose(attend(q, k, v, doc), expected, atol=3e-5, rtol=1e-4)


@pytest.mark.compat
def test_mask_helpers_against_numpy():
    q = np.arange(6)[:, None]
    kv = np.arange(6)[None, :]
    window = lambda b, h, q_idx, kv_idx: q_idx - kv_idx <= 2  # noqa: E731
    prefix = lambda b, h, q_idx, kv_idx: kv_idx < 2  # noqa: E731
    cases = {
        "and": (flex.and_masks(causal, window), (q >= kv) & (q - kv <= 2)),
        "or": (flex.or_masks(causal, prefix), (q >= kv) | (kv < 2)),
        "nested": (
            flex.or_masks(flex.and_masks(causal, window), prefix),
            ((q >= kv) & (q - kv <= 2)) | (kv < 2),
        ),
        "and of none": (flex.and_masks(), np.ones((6, 6), bool)),
        "or of none": (flex.or_masks(), np.zeros((6, 6), bool)),
        "noop": (flex.noop_mask, np.ones((6, 6), bool)),
    }
    for name, (mask_mod, expected) in cases.items():
        np.testing.assert_array_equal(
            flex.create_mask(mask_mod, None, None, 6, 6)[0, 0], expected, err_msg=name
        )


def test_create_mask_shapes_and_score_mods():
    def per_batch_head(b, h, q_idx, kv_idx):
        return (q_idx + b) % 3 != h

    mask = np.asarray(flex.create_mask(per_batch_head, 2, 3, 5, 7))
    b, h, q, _ = np.ogrid[:2, :3, :5, :7]
    np.testing.assert_array_equal(mask, np.broadcast_to((q + b) % 3 != h, (2, 3, 5, 7)))

    def masking_score_mod(score, b, h, q_idx, kv_idx):
        return jnp.where(kv_idx <= q_idx, score, -jnp.inf)

    np.testing.assert_array_equal(
        flex.create_mask(masking_score_mod, None, None, 4, 5)[0, 0], np.tril(np.ones((4, 5), bool))
    )


@pytest.mark.compat
def test_create_block_mask_arguments():
    device = jax.devices()[0]
    placed = flex.create_block_mask(causal, None, None, 64, 64, device=device, BLOCK_SIZE=32)
    assert placed.kv_num_blocks.devices() == {device}
    plain = flex.create_block_mask(
        causal, None, None, 64, 64, device="cuda", BLOCK_SIZE=32, _compile=True
    )
    np.testing.assert_array_equal(plain.kv_num_blocks, placed.kv_num_blocks)
    # BLOCK_SIZE defaults to 128, clipped to the lengths.
    assert flex.create_block_mask(causal, 1, 1, 300, 100).block_size == (128, 100)
    with pytest.raises(TypeError, match="device"):
        flex.create_block_mask(causal, None, None, 64, 64, device=0)
    with pytest.raises(TypeError, match="mask_mod"):
        flex.create_block_mask(None, None, None, 64, 64)
    with pytest.raises(TypeError, match="B must be"):
        flex.create_block_mask(causal, 2.0, None, 64, 64)
    with pytest.raises(ValueError, match="Q_LEN"):
        flex.create_block_mask(causal, None, None, 0, 64)


@pytest.mark.compat
def test_errors_name_the_torch_layout(ref):
    q, k, v = _bhle(ref)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        flex.flex_attention(q, k, v)
    with pytest.raises(ValueError, match="multiple"):
        flex.flex_attention(q[:, :3], k, v, enable_gqa=True)
    with pytest.raises(ValueError, match=r"rank 4 \(B, H, L, E\)"):
        flex.flex_attention(q[0], k[0], v[0], enable_gqa=True)
    with pytest.raises(ValueError, match="batch size"):
        flex.flex_attention(
            q, jnp.concatenate([k, k, k]), jnp.concatenate([v, v, v]), enable_gqa=True
        )
    with pytest.raises(ValueError, match="head dimension"):
        flex.flex_attention(q, k[..., :8], v, enable_gqa=True)
    with pytest.raises(TypeError, match="enable_gqa"):
        flex.flex_attention(q, k, v, enable_gqa="yes")
    with pytest.raises(TypeError, match="kernel_options"):
        flex.flex_attention(q, k, v, enable_gqa=True, kernel_options=[("BLOCK_M", 16)])
    with pytest.raises(ValueError, match="max_scores"):
        flex.flex_attention(q, k, v, enable_gqa=True, return_aux=flex.AuxRequest(max_scores=True))
    with pytest.raises(ValueError, match="either"):
        flex.flex_attention(
            q, k, v, enable_gqa=True, return_lse=True, return_aux=flex.AuxRequest(lse=True)
        )
    with pytest.raises(TypeError, match="and_masks"):
        flex.and_masks(causal, 3)
    # A block mask built for other lengths, or with B=None for a mask_mod reading b.
    with pytest.raises(ValueError, match="does not fit"):
        flex.flex_attention(
            q, k, v, block_mask=flex.create_block_mask(causal, None, None, 64, 64), enable_gqa=True
        )
    starts = jnp.asarray([0, 9])
    reads_b = flex.create_block_mask(
        lambda b, h, q_idx, kv_idx: kv_idx >= starts[b], None, None, 48, 64
    )
    with pytest.raises(ValueError, match="depends on b"):
        flex.flex_attention(q, k, v, block_mask=reads_b, enable_gqa=True)
