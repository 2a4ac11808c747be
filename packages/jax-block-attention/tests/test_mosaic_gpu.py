"""The Mosaic GPU backend (``implementation="mosaic_gpu"``) in Mosaic GPU interpret mode
on CPU: its kernels (forward with the lse, dQ, dK/dV) against the block loop on the same
bfloat16 inputs (dropout with the same keep decisions), and its refusals. Interpret mode
simulates every warpgroup and barrier, so the shapes stay within one or two blocks of
128."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import _registry, masked_attention_via_map
from jaxmodules.attention._mosaic_gpu._rules import mosaic_gpu_problem

pytest.importorskip("absl", reason="Mosaic GPU interpret mode needs absl-py")
_NO_MOSAIC_GPU = mosaic_gpu_problem()
needs_mosaic_gpu = pytest.mark.skipif(bool(_NO_MOSAIC_GPU), reason=str(_NO_MOSAIC_GPU))

# (B, Lq, Lk, Hq, Hkv, d), mask keywords
CASES = {
    "causal_gqa_two_key_blocks_dropout": (
        (1, 40, 150, 2, 1, 32),
        {"is_causal": True, "q_offset": 110, "dropout_rate": 0.25, "dropout_rng": 3},
    ),
    # Documents from a mask_fn over positions alone: the plan's stored ranges.
    "documents_ranges": (
        (1, 40, 150, 2, 1, 32),
        {"is_causal": True, "q_offset": 110, "mask_fn": lambda b, h, q, k: q // 100 == k // 100},
    ),
    "window_offset_empty_rows_soft_cap_score_mod": (
        (1, 45, 53, 2, 2, 24),
        {
            "window_size": (10, 5),
            "q_offset": -8,
            "logits_soft_cap": 3.0,
            "score_mod": lambda s, b, h, q, k: s - 0.25 * (h + 1) * jnp.abs(q - k),
        },
    ),
}


def _inputs(shape, seed):
    b, lq, lk, hq, hkv, d = shape
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, lq, hq, d))
    k = jax.random.normal(keys[1], (b, lk, hkv, d))
    v = jax.random.normal(keys[2], (b, lk, hkv, d))
    w = jax.random.normal(keys[3], (b, lq, hq, d))
    return [x.astype(jnp.bfloat16) for x in (q, k, v)], w


@needs_mosaic_gpu
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_the_block_loop(case):
    # Output, lse (-inf on rows without a visible key) and the gradients of a loss of
    # both, against the block loop in float32 on the same bfloat16 values.
    shape, options = CASES[case]
    if "dropout_rng" in options:  # the same keep decisions as the block loop's
        options = {**options, "dropout_rng": jax.random.key(options["dropout_rng"])}
    (q, k, v), w = _inputs(shape, len(case))

    def loss(implementation, q, k, v):
        out, lse = masked_attention_via_map(
            q, k, v, return_lse=True, implementation=implementation, **options
        )
        finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * w) + 0.1 * jnp.sum(finite), (out, lse)

    grad = jax.grad(loss, (1, 2, 3), has_aux=True)
    grads, (out, lse) = jax.jit(grad, static_argnums=0)("mosaic_gpu", q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want_grads, (want_out, want_lse) = jax.jit(grad, static_argnums=0)("xla", *f32)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float32), want_out, atol=2e-2)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    finite = np.isfinite(np.asarray(want_lse))
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(want_lse)[finite], atol=2e-2)
    for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads, strict=True):
        got = np.asarray(got, np.float32)
        scale = np.abs(np.asarray(want)).max()
        assert np.abs(got - np.asarray(want)).max() <= 2e-2 * scale, name


SLOPES = jnp.asarray([0.5])


def _segment_mask(ids):
    return lambda b, h, q, k: ids[q] == ids[k]


@pytest.mark.parametrize(
    ("dtype", "options", "words"),
    [
        (jnp.float32, {}, "float32 runs on triton or xla"),
        (jnp.bfloat16, {"bias": jnp.zeros((1, 1, 16, 16))}, "bias"),
        (
            jnp.bfloat16,
            {"score_mod": lambda s, b, h, q, k: s + SLOPES[h] * (q - k)},
            "closes over arrays",
        ),
        (jnp.bfloat16, {"mask_fn": _segment_mask(jnp.arange(16) // 4)}, "closes over arrays"),
    ],
)
@needs_mosaic_gpu
def test_refusals_name_the_backends_that_can(dtype, options, words):
    q = jnp.zeros((1, 16, 1, 16), dtype)
    with pytest.raises(ValueError, match="mosaic_gpu") as err:
        masked_attention_via_map(q, q, q, implementation="mosaic_gpu", **options)
    assert words in str(err.value)


def test_order_on_cuda_keeps_triton_first():
    # Until a GPU's numbers decide, Triton precedes Mosaic GPU for implementation=None.
    names = [b.name for b in _registry.candidates("cuda")]
    assert names.index("triton") < names.index("mosaic_gpu") < names.index("xla")
    assert _registry.backend("mosaic_gpu").native("cuda")
    assert not _registry.backend("mosaic_gpu").native("rocm")
