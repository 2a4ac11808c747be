"""The backends' contract, one suite parametrised over them: the block loop
(``"xla"``), the Triton kernels (``"triton"``, interpret mode off a GPU) and the Mosaic TPU
kernels (``"mosaic_tpu"``, interpret mode off a TPU) each get the
same calls and must match the same float64 reference, through
``masked_attention_via_map(implementation=...)`` and through the backend's own entry
point ``attend(q, k, v, block_mask, scale, scores, operands)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import _mosaic_tpu, _pallas, _xla, masked_attention_via_map
from jaxmodules.attention._mosaic_tpu import _rules as _mosaic_tpu_rules

try:
    from jax.experimental.pallas import triton as _pl_triton  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the installed jax
    _NO_PALLAS = f"this jax has no Pallas Triton backend ({err})"
else:
    _NO_PALLAS = ""

_NO_MOSAIC_TPU = _mosaic_tpu_rules.mosaic_tpu_problem() or ""

BACKENDS = [
    "xla",
    pytest.param("triton", marks=pytest.mark.skipif(bool(_NO_PALLAS), reason=_NO_PALLAS)),
    pytest.param(
        "mosaic_tpu", marks=pytest.mark.skipif(bool(_NO_MOSAIC_TPU), reason=_NO_MOSAIC_TPU)
    ),
]
ENTRY = {"xla": _xla, "triton": _pallas, "mosaic_tpu": _mosaic_tpu}

# Segment ids of two batch rows: documents of 9 and of 6 tokens.
IDS = jnp.asarray(np.stack([np.arange(48) // 9, np.arange(48) // 6]), jnp.int32)
LENGTHS = jnp.asarray([40, 0], jnp.int32)
KEEP = jnp.arange(48) % 5 != 2


def same_segment(b, h, q, k):
    return IDS[b, q] == IDS[b, k]


def head_window(h, q, k):
    # Head h sees the 6 * (h + 1) most recent keys, every other one for odd heads.
    return (q - k < 6 * (h + 1)) & ((h % 2 == 0) | (k % 2 == 0))


def within_length(b, h, q, k):
    return k < LENGTHS[b]


# (B, Lq, Lk, Hq, Hkv, d, dv), block_size, mask keywords
CASES = {
    "causal_gqa": ((1, 64, 64, 4, 2, 16, 16), 16, {"is_causal": True}),
    "window_odd_lengths_head_dims": ((1, 45, 53, 2, 1, 24, 8), (16, 32), {"window_size": (10, 5)}),
    "q_offset_per_batch": (
        (2, 20, 50, 2, 2, 16, 16),
        16,
        {"is_causal": True, "q_offset": np.array([30, 3])},
    ),
    "segment_ids_causal": (
        (2, 48, 48, 2, 1, 16, 16),
        16,
        {"mask_fn": same_segment, "is_causal": True},
    ),
    "head_mask_gqa": ((1, 40, 40, 4, 2, 16, 16), 16, {"mask_fn": head_window, "is_causal": True}),
    "empty_rows": (
        (2, 32, 48, 2, 1, 16, 16),
        16,
        {"mask_fn": within_length, "is_causal": True, "q_offset": -5},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.compat("case")
def test_entry_point_matches_reference(ref, backend, case):
    # Every backend's attend: output, lse (-inf on rows without a visible key) and the
    # gradients, zero on those rows.
    shape, block, options = CASES[case]
    q, k, v = ref.qkv(1, *shape)
    block_mask = ref.block_mask_for(shape, block, options)
    mask = ref.mask_for(shape, options)
    d_out = ref.qkv(2, *shape)[0][..., : shape[-1]]
    scale = 1.0 / math.sqrt(shape[5])

    @jax.jit
    def run(q, k, v, block_mask, d_out):
        attend = ENTRY[backend].attend
        (out, lse), vjp = jax.vjp(lambda *a: attend(*a, block_mask, scale), q, k, v)
        return out, lse, vjp((d_out, jnp.zeros_like(lse)))

    out, lse, grads = run(q, k, v, block_mask, d_out)
    np.testing.assert_allclose(out, ref.attention(q, k, v, mask), atol=2e-5, rtol=1e-4)
    expected_lse = ref.lse(q, k, v, mask)
    assert lse.dtype == jnp.float32 and lse.shape == expected_lse.shape
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected_lse))
    finite = np.isfinite(expected_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], expected_lse[finite], atol=2e-5)
    for name, actual, expected in zip(
        ("dq", "dk", "dv"), grads, ref.gradients(q, k, v, mask, d_out), strict=True
    ):
        assert ref.relative_error(actual, expected) < 5e-5, name
    empty = ~mask.any(axis=-1)  # (B, H, Lq)
    out_rows = np.asarray(out).transpose(0, 2, 1, 3)[empty]
    dq_rows = np.asarray(grads[0]).transpose(0, 2, 1, 3)[empty]
    assert not out_rows.any() and not dq_rows.any()
    assert np.isfinite(np.asarray(grads[1])).all()
    if case == "empty_rows":
        assert empty[1].all() and empty[0, :, :5].all() and not empty[0, :, 5:].any()


# ------------------------------------------------------ through masked_attention_via_map


def _compare_api(ref, backend, shape, options, **arrays):
    """``masked_attention_via_map(implementation=backend)`` against the float64
    reference (``ref.compare_variants``), jitted: outputs, lse and every gradient."""
    options = {**options, "implementation": backend}
    return ref.compare_variants(shape, options, jit=True, **arrays)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_soft_cap_sinks_gqa_odd_lengths(ref, backend):
    # Full bias, soft-cap and sinks together, the backend's default block sizes.
    shape = (2, 37, 45, 4, 2, 16)
    rng = np.random.default_rng(20)
    bias = jnp.asarray(rng.standard_normal((2, 4, 37, 45)), jnp.float32)
    sinks = jnp.asarray([0.5, -1.0, 2.0, 0.0], jnp.float32)
    options = {"is_causal": True, "logits_soft_cap": 2.0}
    _compare_api(ref, backend, shape, options, bias=bias, sinks=sinks, seed=21)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_bias_alibi_score_mod_q_offset(ref, backend):
    shape = (2, 20, 50, 4, 1, 16)
    bias = jnp.asarray(np.random.default_rng(22).standard_normal((1, 4, 1, 50)), jnp.float32)
    slopes = jnp.asarray(2.0 ** -np.arange(1, 5), jnp.float32)  # concrete: no gradient
    options = {
        "window_size": (12, 3),
        "q_offset": np.array([30, 3]),
        "mask_fn": same_segment,
        "block_size": 16,
    }
    alibi = ref.alibi(slopes)
    _compare_api(ref, backend, shape, options, bias=bias, make_mod=lambda _: alibi, seed=23)


@pytest.mark.parametrize(
    "bias_shape",
    [(2, 1, 37, 1), (1, 1, 1, 1), (2, 1, 1, 45), (1, 4, 37, 45), (2, 4, 1, 45), (1, 4, 37, 1)],
    ids=["rows", "scalar", "key_padding", "tiles_over_batch", "keys_per_head", "queries"],
)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.compat("bias_shape")
def test_bias_gradient_for_every_broadcast(ref, backend, bias_shape):
    # Each way a bias can broadcast takes its own route for the gradient (tiles, row
    # sums or column sums); all must sum back to the bias's shape.
    rng = np.random.default_rng(sum(bias_shape))
    bias = jnp.asarray(rng.standard_normal(bias_shape), jnp.float32)
    options = {"is_causal": True, "mask_fn": same_segment, "block_size": 16}
    _compare_api(ref, backend, (2, 37, 45, 4, 2, 16), options, bias=bias, seed=len(bias_shape))


@pytest.mark.parametrize(
    "name", ["alibi_slopes", "bucket_table", "relative_table", "temperature", "two_reads"]
)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.compat("name")
def test_gradients_of_traced_score_mod_arrays(ref, backend, name):
    # Learnable arrays score_mod closes over: read at the head only (one sum per tile),
    # at an index that varies across the tile (walked entry by entry), 0-d, and two
    # reads of one array; with GQA, a mask and backward slices of the blocks.
    rng = np.random.default_rng(40)
    slopes = jnp.asarray(2.0 ** -np.arange(1, 5), jnp.float32)
    cases = {
        "alibi_slopes": (slopes, ref.alibi),
        "bucket_table": (jnp.asarray(rng.standard_normal((8, 4)), jnp.float32), ref.bucket_table),
        "relative_table": (jnp.asarray(rng.standard_normal(21), jnp.float32), ref.relative_table),
        "temperature": (
            jnp.asarray(0.7, jnp.float32),
            lambda t: lambda score, b, h, q, k: score * t,
        ),
        "two_reads": (
            jnp.stack([slopes, jnp.asarray(rng.standard_normal(4), jnp.float32)]),
            lambda a: (
                lambda score, b, h, q, k: score - a[0, h] * jnp.abs(q - k) + a[1, h] * (k % 2)
            ),
        ),
    }
    extra, make_mod = cases[name]
    options = {"is_causal": True, "mask_fn": same_segment, "block_size": 16}
    shape = (2, 37, 45, 4, 2, 16)
    if backend == "mosaic_tpu":
        # Not computed by these kernels yet: refused, saying why, never a wrong gradient.
        with pytest.raises(ValueError, match=r'traced floating arrays.*implementation="xla" can'):
            _compare_api(ref, backend, shape, options, extra=extra, make_mod=make_mod, seed=41)
        return
    _compare_api(ref, backend, shape, options, extra=extra, make_mod=make_mod, seed=41)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_on_empty_rows(ref, backend):
    sinks = jnp.asarray([0.5, -1.0], jnp.float32)
    options = {"mask_fn": lambda b, h, q, k: k >= q + 5, "block_size": 16}
    out = _compare_api(ref, backend, (1, 20, 24, 2, 2, 16), options, sinks=sinks, seed=24)
    assert not np.asarray(out[0, 19:]).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.compat
def test_rows_without_keys_pass_no_gradient_through_their_lse(ref, backend):
    # Rows 0-4 see no key, so their lse is -inf and a loss of lse ** 2 sends them an
    # infinite cotangent: they have no gradient, and the other rows' gradients are those
    # of the float64 reference on the finite rows alone.
    shape = (1, 32, 32, 2, 1, 16, 16)
    options = {"is_causal": True, "q_offset": -5, "block_size": 16}
    q, k, v = ref.qkv(3, *shape)
    mask = ref.mask_for(shape, options)

    def lse_squared(q, k, v):
        _, lse = masked_attention_via_map(
            q, k, v, return_lse=True, implementation=backend, **options
        )
        return jnp.sum(lse**2)

    grads = jax.jit(jax.grad(lse_squared, (0, 1, 2)))(q, k, v)
    with ref.float64():

        def finite_rows(q, k, v):
            _, lse = ref.dense(q, k, v, mask)
            return jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) ** 2)

        qkv64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        expected = [np.asarray(g) for g in jax.grad(finite_rows, (0, 1, 2))(*qkv64)]
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected, strict=True):
        assert np.isfinite(np.asarray(got)).all(), name
        assert ref.relative_error(got, want) < 1e-4, name
