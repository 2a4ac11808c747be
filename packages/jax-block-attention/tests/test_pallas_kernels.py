"""The Pallas kernels through the backend's entry point (``_pallas.attend``), in
interpret mode on CPU, against the float64 reference: the tuning only this backend has
(backward slices, split-K), its tile-program evaluator and refusals, and what it lowers
to for CUDA.

Shapes stay small: in interpret mode every grid step is an XLA loop iteration.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jax.experimental.pallas", reason="this jax has no Pallas")
try:
    from jax.experimental.pallas import triton as _pl_triton  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the installed jax
    pytest.skip(f"this jax has no Pallas Triton backend ({err})", allow_module_level=True)

from jaxmodules.attention import _pallas as pallas
from jaxmodules.attention import _platforms, create_block_mask, masked_attention_via_map
from jaxmodules.attention._elementwise import trace_score_mod
from jaxmodules.attention._pallas import PallasUnsupportedError, evaluate_on_tile, kernel_consts
from jaxmodules.attention._pallas._tuning import KernelTiles, Tuning
from jaxmodules.attention._scores import Operands, ScoreConfig, with_sinks

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


def _tiles(forward, dq, dkdv):
    """A kernel tuning of (rows, cols) per kernel, 4 warps and 2 stages."""
    return Tuning(*(KernelTiles(rows, cols, 4, 2) for rows, cols in (forward, dq, dkdv)))


# The kernel's own tuning (backward slices, split-K); the calls every backend takes are in
# test_backends.py. (B, Lq, Lk, Hq, Hkv, d, dv), block_size, mask and tuning keywords.
CASES = {
    # Blocks of 32 that both backward kernels walk in slices of 16.
    "causal_gqa_backward_slices": (
        (1, 64, 64, 4, 2, 16, 16),
        32,
        {"is_causal": True, "backward_tile": 16},
    ),
    "segment_ids_backward_slices": (
        (2, 48, 48, 2, 1, 16, 16),
        32,
        {"mask_fn": same_segment, "window_size": (20, 2), "backward_tile": 16},
    ),
    # Split-K forwards: decoding-like rows of 7 to 13 key blocks in 3 shares, and rows of 1
    # to 3 blocks in 4 shares (some shares empty).
    "decode_kv_splits": (
        (2, 16, 200, 4, 2, 16, 16),
        16,
        {"is_causal": True, "q_offset": np.array([184, 100]), "kv_splits": 3},
    ),
    "segment_ids_kv_splits": (
        (2, 48, 48, 2, 1, 16, 16),
        16,
        {"mask_fn": same_segment, "is_causal": True, "kv_splits": 4},
    ),
    # Tiles cut from blocks of 32 (as compiled at large head dimensions): every kernel's
    # programs own 16 rows of a block and walk its listed blocks in tiles of 16, causal
    # rows run last-first, and the dK/dV programs split each group of 2 query heads.
    "causal_gqa_sub_tiles": (
        (1, 64, 64, 4, 2, 16, 16),
        32,
        {"is_causal": True, "tuning": _tiles((16, 16), (16, 16), (16, 16)), "group_splits": 2},
    ),
    # A band bounded only below (keys from 3 before each query on): the dK/dV key tiles
    # run last-first; rows and slices of different sizes per kernel.
    "segment_ids_lower_band_sub_tiles": (
        (2, 48, 48, 2, 1, 16, 16),
        32,
        {
            "mask_fn": same_segment,
            "window_size": (3, None),
            "tuning": _tiles((16, 32), (32, 16), (16, 32)),
        },
    ),
}


_TUNING_OPTIONS = ("backward_tile", "kv_splits", "tuning", "group_splits")


@partial(jax.jit, static_argnums=(5, 6, 7, 8))
def _run(
    q, k, v, block_mask, d_out, backward_tile=None, kv_splits=None, tuning=None, group_splits=None
):
    """Output, lse and the gradients of ``sum(out * d_out)``, in one program."""
    scale = 1.0 / math.sqrt(q.shape[-1])

    def attend(q, k, v):
        return pallas.attend(
            q,
            k,
            v,
            block_mask,
            scale,
            backward_tile=backward_tile,
            kv_splits=kv_splits,
            tuning=tuning,
            group_splits=group_splits,
        )

    (out, lse), vjp = jax.vjp(attend, q, k, v)
    return out, lse, vjp((d_out, jnp.zeros_like(lse)))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.compat("case")
def test_forward_lse_and_gradients_match_reference(ref, case):
    shape, block, options = CASES[case]
    q, k, v = ref.qkv(1, *shape)
    block_mask = ref.block_mask_for(shape, block, options)
    mask = ref.mask_for(shape, options)
    np.testing.assert_array_equal(np.asarray(block_mask.to_dense()), mask)
    d_out = ref.qkv(2, *shape)[0][..., : shape[-1]]
    tuning = tuple(options.get(name) for name in _TUNING_OPTIONS)
    out, lse, grads = _run(q, k, v, block_mask, d_out, *tuning)

    scale = 1.0 / math.sqrt(shape[5])
    np.testing.assert_allclose(out, ref.attention(q, k, v, mask), atol=2e-5, rtol=1e-4)
    expected_lse = ref.lse(q, k, v, mask, scale)
    assert lse.dtype == jnp.float32 and lse.shape == expected_lse.shape
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected_lse))
    finite = np.isfinite(expected_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], expected_lse[finite], atol=2e-5)
    for name, actual, expected in zip(
        ("dq", "dk", "dv"), grads, ref.gradients(q, k, v, mask, d_out), strict=True
    ):
        assert ref.relative_error(actual, expected) < 5e-5, name
    if case == "empty_rows":
        empty = ~mask.any(axis=-1)  # (B, H, Lq)
        assert empty[1].all() and empty[0, :, :5].all() and not empty[0, :, 5:].any()
        out_rows = np.asarray(out).transpose(0, 2, 1, 3)[empty]
        dq_rows = np.asarray(grads[0]).transpose(0, 2, 1, 3)[empty]
        assert not out_rows.any() and not dq_rows.any()
        assert np.isfinite(np.asarray(grads[1])).all()


def test_block_mask_built_inside_jit_from_traced_segment_ids(ref):
    shape = (2, 48, 48, 2, 1, 16, 16)
    q, k, v = ref.qkv(11, *shape)
    d_out = ref.qkv(12, *shape)[0]

    @jax.jit
    def run(ids, q, k, v, d_out):
        def same(b, h, q, k):
            return ids[b, q] == ids[b, k]

        block_mask = create_block_mask(same, 2, 2, 48, 48, is_causal=True, block_size=16)
        out, vjp = jax.vjp(lambda *a: pallas.attend(*a, block_mask, 0.25)[0], q, k, v)
        return out, vjp(d_out)

    out, grads = run(IDS, q, k, v, d_out)
    mask = ref.mask_for(shape, {"mask_fn": same_segment, "is_causal": True})
    np.testing.assert_allclose(out, ref.attention(q, k, v, mask, 0.25), atol=2e-5, rtol=1e-4)
    expected = ref.gradients(q, k, v, mask, d_out, 0.25)
    for actual, e in zip(grads, expected, strict=True):
        assert ref.relative_error(actual, e) < 5e-5


def test_bfloat16_against_rounded_inputs(ref):
    shape = (1, 48, 48, 2, 1, 32, 32)
    q, k, v = ref.qkv(3, *shape, dtype=jnp.bfloat16)
    block_mask = ref.block_mask_for(shape, 16, {"is_causal": True, "window_size": (20, None)})
    mask = ref.mask_for(shape, {"is_causal": True, "window_size": (20, None)})
    d_out = ref.qkv(4, *shape, dtype=jnp.bfloat16)[0]
    out, lse, grads = _run(q, k, v, block_mask, d_out)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
    f32 = [np.asarray(x, np.float32) for x in (q, k, v, d_out)]
    assert ref.relative_error(out, ref.attention(*f32[:3], mask)) < 2e-2
    for actual, expected in zip(grads, ref.gradients(*f32[:3], mask, f32[3]), strict=True):
        assert ref.relative_error(actual, expected) < 4e-2


def test_lse_is_differentiable(ref):
    shape = (1, 32, 32, 2, 1, 16, 16)
    q, k, v = ref.qkv(5, *shape)
    block_mask = ref.block_mask_for(shape, 16, {"is_causal": True})
    mask = jnp.asarray(ref.mask_for(shape, {"is_causal": True}))
    weights = jax.random.normal(jax.random.PRNGKey(0), (1, 2, 32))
    scale = 0.25

    def loss(attend):
        def f(q, k, v):
            out, lse = attend(q, k, v)
            return jnp.sum(out**2) + jnp.sum(lse * weights)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

    def dense(q, k, v):
        k_, v_ = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        s = jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", q, k_) * scale, -jnp.inf)
        lse = jax.nn.logsumexp(s, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - lse[..., None]), v_)
        return out, lse

    actual = loss(lambda q, k, v: pallas.attend(q, k, v, block_mask, scale))
    for a, e in zip(actual, loss(dense), strict=True):
        assert ref.relative_error(a, e) < 1e-4


@pytest.mark.compat
def test_pallas_call_in_forward_and_gradient(ref):
    shape = (1, 32, 32, 2, 1, 16, 16)
    q, k, v = ref.qkv(6, *shape)
    block_mask = ref.block_mask_for(shape, 16, {"mask_fn": same_segment, "is_causal": True})
    # (interpret=None traced for a platform known when lowered holds a compiled and an
    # interpreted branch; test_dispatch counts those.)
    attend = partial(pallas.attend, interpret=True)
    forward = jax.make_jaxpr(lambda q: attend(q, k, v, block_mask, 0.25)[0])(q)
    gradient = jax.make_jaxpr(
        jax.grad(lambda q, k, v: attend(q, k, v, block_mask, 0.25)[0].sum(), (0, 1, 2))
    )(q, k, v)
    assert str(forward).count("pallas_call") == 1
    # forward (recomputed for the residuals), dQ and dK/dV kernels
    assert str(gradient).count("pallas_call") == 3


def test_tile_evaluation_matches_the_program():
    def mask_fn(b, h, q, k):
        mod = jnp.remainder(q - k, h + 2) != 1
        keep = KEEP[k] | (h == 1)
        return jnp.where(q > 20, same_segment(b, h, q, k), mod) & (k < LENGTHS[b] + 30) & keep

    block_mask = create_block_mask(mask_fn, 2, 3, 48, 48, block_size=16)
    program, consts = block_mask.program, block_mask.mask_consts
    arrays, dtypes = kernel_consts(consts)
    q = jnp.arange(48, dtype=jnp.int32)[:, None]
    k = jnp.arange(48, dtype=jnp.int32)[None, :]
    for b in range(2):
        for h in range(3):
            tile = evaluate_on_tile(program, arrays, dtypes, jnp.int32(b), jnp.int32(h), q, k)
            expected = program.evaluate(consts, b, h, q, k)
            np.testing.assert_array_equal(tile, expected)


@pytest.mark.compat
def test_block_sizes_must_be_triton_tiles(ref):
    shape = (1, 48, 48, 1, 1, 16, 16)
    q, k, v = ref.qkv(7, *shape)
    block_mask = create_block_mask(None, 1, 1, 48, 48, is_causal=True, block_size=24)
    assert "(24, 24)" in pallas.block_mask_problem(block_mask)
    with pytest.raises(ValueError, match=r"block_size=\(24, 24\).*powers of two"):
        pallas.attend(q, k, v, block_mask, 0.25)


@pytest.mark.compat
def test_mask_fn_the_kernel_cannot_evaluate_is_refused(ref):
    shape = (1, 32, 32, 1, 1, 16, 16)
    q, k, v = ref.qkv(8, *shape)

    def below_total(b, h, q, k):
        return k < LENGTHS.sum()  # a whole closed-over array, not one element

    block_mask = create_block_mask(below_total, 1, 1, 32, 32, block_size=16)
    assert "used whole" in pallas.block_mask_problem(block_mask)
    with pytest.raises(PallasUnsupportedError, match='implementation="xla"'):
        pallas.attend(q, k, v, block_mask, 0.25)
    assert issubclass(PallasUnsupportedError, ValueError)

    def branching(b, h, q, k):
        return jax.lax.cond(q > 3, lambda: k < q, lambda: k > q)

    branched = create_block_mask(branching, 1, 1, 32, 32, block_size=16)
    assert "control flow ('cond')" in pallas.block_mask_problem(branched)


@pytest.mark.compat
def test_shapes_that_do_not_fit_the_block_mask(ref):
    q, k, v = ref.qkv(9, 1, 32, 32, 2, 1, 16)
    block_mask = create_block_mask(None, 1, 1, 32, 48, block_size=16)
    with pytest.raises(ValueError, match="k_len=48"):
        pallas.attend(q, k, v, block_mask, 0.25)
    q3 = ref.qkv(9, 1, 32, 32, 3, 2, 16)[0]
    with pytest.raises(ValueError, match="multiple"):
        pallas.attend(
            q3, k[:, :, :1].repeat(2, axis=2), v[:, :, :1].repeat(2, axis=2), block_mask, 1.0
        )


def _abstract_gpu():
    """A context in which Pallas lowers for a GPU that this machine lacks.

    jax 0.12+ asks which GPU to lower Triton kernels for when none is present (an abstract
    device of an abstract mesh, ``jax.sharding.use_abstract_mesh``); older versions
    assume one themselves and need nothing."""
    sharding = jax.sharding
    if not (hasattr(sharding, "AbstractDevice") and hasattr(sharding, "use_abstract_mesh")):
        return contextlib.nullcontext()
    try:
        device = sharding.AbstractDevice(
            device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
        )
        mesh = sharding.AbstractMesh((), (), abstract_device=device)
    except TypeError:  # an AbstractDevice without a platform: a jax that assumes a GPU
        return contextlib.nullcontext()
    return sharding.use_abstract_mesh(mesh)


def _triton_kernels_for_cuda(fn, *args):
    """How many Triton kernels ``jit(fn)`` holds when exported for CUDA from this CPU
    machine (the test is skipped where this jax cannot)."""
    try:
        from jax import export
    except ImportError as err:
        pytest.skip(f"jax.export is unavailable in this jax ({err})")
    if not hasattr(export, "DisabledSafetyCheck"):
        pytest.skip("this jax.export cannot allow Triton custom calls")
    triton = "__gpu$xla.gpu.triton"
    with _abstract_gpu(), warnings.catch_warnings():
        # jax 0.12+ announces, on every Triton lowering, that Pallas Triton will be
        # removed (docs/ring.md says what takes over); here it is expected.
        warnings.filterwarnings(
            "ignore", "The Pallas Triton backend is deprecated", DeprecationWarning
        )
        exported = export.export(
            jax.jit(fn),
            platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)],
        )(*args)
    return exported.mlir_module().count(triton)


@pytest.mark.compat
def test_lowers_for_cuda_without_a_gpu(ref):
    shape = (1, 64, 64, 4, 2, 24, 24)
    q, k, v = ref.qkv(10, *shape, dtype=jnp.bfloat16)
    documents = jnp.arange(64) // 20
    keep = jnp.arange(64) % 7 != 3  # a boolean array travels as int32

    def mask_fn(b, h, q, k):
        return head_window(h, q, k) & (documents[q] == documents[k]) & keep[k]

    block_mask = ref.block_mask_for(shape, (32, 16), {"mask_fn": mask_fn, "is_causal": True})

    def value_and_grads(q, k, v, block_mask):
        def loss(q, k, v):
            out, _ = pallas.attend(q, k, v, block_mask, 0.2, interpret=False)
            return out.astype(jnp.float32).sum()

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    # Forward, dQ and dK/dV kernels, each lowered to Triton.
    assert _triton_kernels_for_cuda(value_and_grads, q, k, v, block_mask) == 3


@pytest.mark.compat
def test_gpu_defaults_lower_for_cuda_without_a_gpu(ref):
    # What a GPU user gets first: 128 x 128 blocks, d=128 (8 warps), the compiled
    # default of 32-wide backward slices, GQA and a key-padding bias (column sums).

    shape = (1, 256, 256, 4, 1, 128, 128)
    q, k, v = ref.qkv(35, *shape, dtype=jnp.bfloat16)
    block_mask = ref.block_mask_for(shape, 128, {"is_causal": True})
    bias = jnp.zeros((1, 1, 1, 256), jnp.bfloat16)

    def value_and_grads(q, k, v, bias):
        def loss(q, k, v, bias):
            operands = Operands(bias, ())
            out, _ = pallas.attend(q, k, v, block_mask, 0.1, interpret=False, operands=operands)
            return out.astype(jnp.float32).sum()

        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)

    assert _triton_kernels_for_cuda(value_and_grads, q, k, v, bias) == 3


@pytest.mark.compat
def test_dropout_lowers_for_cuda_without_a_gpu(ref):
    # The dropout hash's uint32 multiplies, xors, shifts and compares lower to Triton in
    # all three kernels, with the compiled defaults (backward slices, GQA).
    from jaxmodules.attention._dropout import stream_seeds

    shape = (1, 256, 256, 4, 2, 64, 64)
    q, k, v = ref.qkv(24, *shape, dtype=jnp.bfloat16)
    block_mask = ref.block_mask_for(shape, 64, {"is_causal": True})
    scores = ScoreConfig(dropout_rate=0.1)

    def value_and_grads(q, k, v, rng):
        def loss(q, k, v):
            operands = Operands(None, (), stream_seeds(rng, 1, 4))
            out, _ = pallas.attend(q, k, v, block_mask, 0.125, scores, operands, interpret=False)
            return out.astype(jnp.float32).sum()

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    assert _triton_kernels_for_cuda(value_and_grads, q, k, v, jax.random.key(7)) == 3


@pytest.mark.compat
def test_decode_split_lowers_for_cuda_without_a_gpu(ref):
    # Decoding: 4 query heads of 16 rows against 2048 keys are 4 programs, so compiled
    # the forward splits each row's 16 key blocks into 4 shares (a 4-D grid).
    shape = (1, 16, 2048, 4, 1, 128, 128)
    q, k, v = ref.qkv(37, *shape, dtype=jnp.bfloat16)
    block_mask = ref.block_mask_for(shape, (16, 128), {"is_causal": True, "q_offset": 2032})

    def value_and_grads(q, k, v):
        def loss(q, k, v):
            out, _ = pallas.attend(q, k, v, block_mask, 0.1, interpret=False)
            return out.astype(jnp.float32).sum()

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    jaxpr = str(jax.make_jaxpr(value_and_grads)(q, k, v))
    # (query tiles, shares, Hq, B): query tiles on the fastest grid axis.
    assert "GridMapping(grid=(1, 4, 4, 1)" in jaxpr
    # dK/dV: 32 key tiles of 64 rows (d=128) of one key/value head are too few programs,
    # so the 4 query heads of the group go to 4 programs per key tile (partial sums
    # added after).
    assert "GridMapping(grid=(32, 4, 1, 1)" in jaxpr
    assert _triton_kernels_for_cuda(value_and_grads, q, k, v) == 3


@pytest.mark.compat
def test_score_mod_array_gradients_lower_for_cuda_without_a_gpu(ref):
    # Gradients of traced arrays score_mod closes over (a bucket table read at q - k and
    # the head, slopes read at the head) lower to Triton with the compiled defaults.
    from jaxmodules.attention._scores import Operands

    shape = (1, 128, 128, 4, 2, 64, 64)
    q, k, v = ref.qkv(36, *shape, dtype=jnp.bfloat16)
    block_mask = ref.block_mask_for(shape, 64, {"is_causal": True})
    table = jnp.zeros((8, 4), jnp.float32)
    slopes = jnp.ones((4,), jnp.float32)

    def value_and_grads(q, k, v, table, slopes):
        def loss(q, k, v, table, slopes):
            def mod(score, b, h, qp, kp):
                return ref.bucket_table(table)(score, b, h, qp, kp) - slopes[h] * jnp.abs(qp - kp)

            program, consts = trace_score_mod(mod)
            out, _ = pallas.attend(
                q,
                k,
                v,
                block_mask,
                0.125,
                interpret=False,
                scores=ScoreConfig(score=program),
                operands=Operands(None, consts),
            )
            return out.astype(jnp.float32).sum()

        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, table, slopes)

    assert _triton_kernels_for_cuda(value_and_grads, q, k, v, table, slopes) == 3


# ----------------------------------------- what the compiled kernels need, checked on CPU


def _primitive_without_triton_rule():
    """A jnp function on scores whose primitive this jax's Pallas Triton lowering lacks
    (read from its rule table, as the eligibility check does), and that primitive."""
    from jax._src.pallas.triton import lowering

    rules = lowering.triton_lowering_rules
    for fn, primitive in (
        (jax.scipy.special.erf, jax.lax.erf_p),
        (jnp.round, jax.lax.round_p),
        (jax.scipy.special.gammaln, jax.lax.lgamma_p),
    ):
        if primitive not in rules:
            return fn, primitive.name
    pytest.skip("this jax lowers every candidate primitive to Triton")


@pytest.mark.compat
def test_user_program_primitives_need_a_triton_rule(ref, monkeypatch):
    # A score_mod or mask_fn whose primitive Triton cannot lower would pass in interpret
    # mode and fail to compile on a GPU: "triton" refuses it, naming the primitive, and
    # the default implementation falls back to the block loop (here with the dispatcher
    # believing it runs on a GPU, where it would otherwise pick the kernel).
    fn, name = _primitive_without_triton_rule()
    q, k, v = ref.qkv(40, 1, 32, 32, 2, 2, 16)

    def score_mod(score, b, h, qi, ki):
        return score + fn(score * 0.5)

    def mask_fn(b, h, qi, ki):
        return fn(qi.astype(jnp.float32) * 0.25) >= fn(ki.astype(jnp.float32) * 0.25)

    for options in ({"score_mod": score_mod}, {"mask_fn": mask_fn, "is_causal": True}):
        with pytest.raises(ValueError, match=rf'implementation="triton".*{name!r}.*Triton'):
            masked_attention_via_map(q, k, v, implementation="triton", **options)

    def no_kernel(*args, **kwargs):
        raise AssertionError("the Pallas kernel was called for a program it cannot lower")

    monkeypatch.setattr(_platforms, "known_platform", lambda: "cuda")
    monkeypatch.setattr(pallas._plugin, "attend", no_kernel)
    for options in ({"score_mod": score_mod}, {"mask_fn": mask_fn, "is_causal": True}):
        got = masked_attention_via_map(q, k, v, **options)
        want = masked_attention_via_map(q, k, v, implementation="xla", **options)
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    # The fallback computes the right thing, not only the same thing.
    got = masked_attention_via_map(q, k, v, score_mod=score_mod, block_size=16)
    with ref.float64():
        q64, k64, v64 = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
        want, _ = ref.dense(q64, k64, v64, np.ones((32, 32), bool), score_mod=score_mod)
    np.testing.assert_allclose(got, np.asarray(want), atol=3e-5, rtol=1e-4)


def test_compiled_float32_above_head_dim_128_goes_to_the_block_loop(ref, monkeypatch):
    # The compile report finds no float32 tile at d=256 whose dK/dV kernel stays within
    # sm_90's registers: compiled (on a GPU) "triton" refuses such calls and the default
    # sends them to the block loop; interpreted, and for 16-bit inputs, the kernel runs.
    q, k, v = ref.qkv(41, 1, 32, 32, 2, 2, 160)  # d=160 pads to 256
    kernel = masked_attention_via_map(q, k, v, is_causal=True, implementation="triton")
    want = masked_attention_via_map(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(kernel, want, atol=2e-5, rtol=1e-4)

    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].dtype)
        return real_attend(*args, **kwargs)

    real_attend = pallas._plugin.attend
    monkeypatch.setattr(_platforms, "known_platform", lambda: "cuda")
    monkeypatch.setattr(pallas._plugin, "attend", counted)
    with pytest.raises(ValueError, match=r"float32 inputs with head dimension 256 > 128"):
        masked_attention_via_map(q, k, v, is_causal=True, implementation="triton")
    got = masked_attention_via_map(q, k, v, is_causal=True)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    assert calls == []
    # 16-bit inputs at the same head dimension, and float32 at d=128, keep the kernel
    # (the call is traced only: the monkeypatched backend has no GPU to run it on).
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    jax.make_jaxpr(lambda *a: masked_attention_via_map(*a, is_causal=True))(*half)
    small = [x[..., :128] for x in (q, k, v)]
    jax.make_jaxpr(lambda *a: masked_attention_via_map(*a, is_causal=True))(*small)
    assert calls == [jnp.bfloat16, jnp.float32]


@pytest.mark.parametrize("how", ["removed", "deprecation made an error"])
@pytest.mark.compat
def test_without_pallas_triton_the_default_runs_the_block_loop(ref, monkeypatch, how):
    # A jax that has removed Pallas Triton, or turned its deprecation into an error:
    # "triton" says so, and the default implementation on a GPU (cuDNN cannot take
    # float32) runs the block loop instead of failing in the Triton lowering.
    from jaxmodules.attention._pallas import _triton_rules

    if how == "removed":
        monkeypatch.setattr(_triton_rules, "_lowering_rules", lambda: None)
    else:
        from jax._src import deprecations

        accelerated = deprecations.is_accelerated
        monkeypatch.setattr(
            deprecations,
            "is_accelerated",
            lambda name: name == "jax-pallas-triton" or accelerated(name),
        )
    q, k, v = ref.qkv(41, 1, 48, 48, 2, 1, 16)
    with pytest.raises(ValueError, match=r'implementation="triton".*Pallas Triton'):
        masked_attention_via_map(q, k, v, is_causal=True, implementation="triton")

    def no_kernel(*args, **kwargs):
        raise AssertionError("the Pallas kernel was called without Pallas Triton")

    monkeypatch.setattr(_platforms, "known_platform", lambda: "cuda")
    monkeypatch.setattr(pallas._plugin, "attend", no_kernel)
    out = masked_attention_via_map(q, k, v, is_causal=True, block_size=16)
    mask = ref.mask_for((1, 48, 48, 2, 1, 16), {"is_causal": True})
    np.testing.assert_allclose(out, ref.attention(q, k, v, mask), atol=2e-5, rtol=1e-4)


def _kernel_dot_precisions(dtype):
    """The precision of every dot_general inside the Pallas kernels of a forward and
    backward in ``dtype`` (read from the kernels' jaxprs), but the products of float16
    integer codes summed in float16 (counts of non-finite values, exact whatever the
    precision)."""
    q = k = v = jnp.zeros((1, 32, 2, 16), dtype)

    def loss(q, k, v):
        out = masked_attention_via_map(q, k, v, is_causal=True, implementation="triton")
        return out.astype(jnp.float32).sum()

    closed = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    found = []

    def walk(jaxpr, in_kernel):
        for eqn in jaxpr.eqns:
            inside = in_kernel or eqn.primitive.name == "pallas_call"
            counts = eqn.params.get("preferred_element_type") == jnp.float16
            if inside and eqn.primitive.name == "dot_general" and not counts:
                found.append(eqn.params["precision"])
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    body = getattr(sub, "jaxpr", sub)
                    if hasattr(body, "eqns"):
                        walk(body, inside)

    walk(closed.jaxpr, False)
    return found


@pytest.mark.parametrize("compiled", [False, True], ids=["interpreted", "compiled"])
@pytest.mark.compat
def test_float32_kernel_dots_keep_float32_accuracy(monkeypatch, compiled):
    # Triton rounds float32 dot operands to TF32 unless told otherwise. Compiled, the
    # kernels ask for three TF32 products per dot (tf32x3: float32 accuracy on tensor
    # cores); interpreted, the host's float32 products (CPUs have no TF32x3). 16-bit
    # operands keep the default.
    # The kernels as traced for a GPU or for this CPU; nothing is lowered or run here.
    monkeypatch.setattr(_platforms, "known_platform", lambda: "cuda" if compiled else "cpu")
    f32 = _kernel_dot_precisions(jnp.float32)
    bf16 = _kernel_dot_precisions(jnp.bfloat16)
    assert len(f32) >= 6 and len(bf16) == len(f32)  # forward, dQ and dK/dV dots
    if compiled:
        want = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
        assert all(p == want for p in f32), f32
    else:
        highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
        assert all(p == highest for p in f32), f32
    assert all(p is None for p in bf16), bf16


def _array_sizes_outside_kernels(jaxpr):
    """Element counts of every value a jaxpr and its sub-jaxprs make, not looking
    inside ``pallas_call`` kernels (whose refs are views of their operands)."""
    sizes = []
    for eqn in jaxpr.eqns:
        sizes += [math.prod(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        if eqn.primitive.name == "pallas_call":
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    sizes += _array_sizes_outside_kernels(inner)
    return sizes


@pytest.mark.parametrize("bias_shape", [(2, 1, 1, 256), (2, 4, 256, 1)])
def test_gradient_of_a_vector_bias_stays_linear(ref, bias_shape):
    # A key-padding bias is linear in L; its gradient must not pass through a
    # (B, H, Lq, Lk) buffer.
    q, k, v = ref.qkv(27, 2, 256, 256, 4, 2, 16)
    bias = jnp.zeros(bias_shape)

    def loss(q, k, v, bias):
        out = masked_attention_via_map(
            q, k, v, bias=bias, is_causal=True, block_size=64, implementation="triton"
        )
        return out.sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1, 2, 3)))(q, k, v, bias).jaxpr
    largest = max(_array_sizes_outside_kernels(jaxpr))
    assert largest < 256 * 256, largest


def _kernel_and_reference(ref, arrays, block_mask, visible, rng, **kwargs):
    """``_pallas.attend`` (jitted; ``backward_tile`` and ``kv_splits`` from
    ``kwargs``) and the float64 reference, as ``ref.against_reference`` returns them."""
    tuning = {name: kwargs.pop(name) for name in ("backward_tile", "kv_splits") if name in kwargs}

    def attend(a, score_mod):
        program, consts = (None, ()) if score_mod is None else trace_score_mod(score_mod)
        scores = ScoreConfig(soft_cap=kwargs.get("soft_cap"), score=program)
        out, lse = pallas.attend(
            a["q"],
            a["k"],
            a["v"],
            block_mask,
            kwargs["scale"],
            scores=scores,
            operands=Operands(a.get("bias"), consts),
            **tuning,
        )
        # Sinks join each row's denominator after any backend, as the dispatcher adds them.
        return (out, lse) if "sinks" not in a else with_sinks(out, lse, a["sinks"])

    return ref.against_reference(attend, arrays, visible, rng, jit=True, **kwargs)


@pytest.mark.parametrize(
    "bias_shape", [(2, 4, 40, 56), (2, 1, 1, 56), (1, 4, 40, 1)], ids=["tiles", "columns", "rows"]
)
def test_score_pipeline_in_backward_slices(ref, bias_shape):
    # Bias (each gradient route), soft-cap and score_mod on blocks of 32 that the
    # backward kernels walk in slices of 16, against the float64 reference.
    shape = (2, 40, 56, 4, 2, 16, 16)
    options = {"is_causal": True, "q_offset": np.array([16, 5])}
    options["mask_fn"] = lambda b, h, q, k: (q + 2 * k) % 7 != 3
    slopes = jnp.asarray(2.0 ** -np.arange(1, 5), jnp.float32)  # concrete
    rng = np.random.default_rng(31)
    arrays = {
        "q": ref.qkv(32, *shape)[0],
        "k": ref.qkv(33, *shape)[1],
        "v": ref.qkv(34, *shape)[2],
        "bias": jnp.asarray(rng.standard_normal(bias_shape), jnp.float32),
    }
    (value, _, _, grads), (value64, _, _, grads64) = _kernel_and_reference(
        ref,
        arrays,
        ref.block_mask_for(shape, 32, options),
        ref.mask_for(shape, options),
        rng,
        scale=0.25,
        q_offset=options["q_offset"],
        soft_cap=3.0,
        make_mod=lambda _: ref.alibi(slopes),
        backward_tile=16,
    )
    np.testing.assert_allclose(value, value64, rtol=1e-5)
    for name, got in grads.items():
        assert ref.relative_error(got, grads64[name]) < 1e-4, f"d{name}"


def _random_call(rng):
    """A random kernel call: shapes, mask, score changes and tuning, drawn together."""
    groups, kv_heads = int(rng.choice([1, 2])), int(rng.choice([1, 2]))
    batch, q_heads = int(rng.choice([1, 2])), groups * kv_heads
    block = (int(rng.choice([16, 32])), int(rng.choice([16, 32])))
    q_len, k_len = int(rng.integers(block[0], 50)), int(rng.integers(block[1], 70))
    d, dv = int(rng.choice([8, 16, 24])), int(rng.choice([8, 16]))
    options = {"is_causal": bool(rng.random() < 0.6)}
    if rng.random() < 0.4:
        options["window_size"] = (int(rng.integers(0, 30)), int(rng.integers(0, 10)))
    offsets = rng.integers(-10, 40, batch)
    options["q_offset"] = offsets if rng.random() < 0.5 else int(offsets[0])
    if rng.random() < 0.5:
        period = int(rng.integers(3, 9))
        options["mask_fn"] = lambda b, h, q, k: (q + h + b) % period != k % period
    bias_shape = tuple(int(n) if rng.random() < 0.5 else 1 for n in (batch, q_heads, q_len, k_len))
    return {
        "shape": (batch, q_len, k_len, q_heads, kv_heads, d, dv),
        "block": block,
        "options": options,
        "bias_shape": bias_shape if rng.random() < 0.6 else None,
        "soft_cap": float(rng.uniform(1.0, 5.0)) if rng.random() < 0.4 else None,
        "score_mod": bool(rng.random() < 0.5),
        "sinks": bool(rng.random() < 0.4),
        "backward_tile": 16 if rng.random() < 0.5 else None,
        "kv_splits": int(rng.choice([1, 2, 3])),
    }


@pytest.mark.parametrize("seed", range(6))
def test_random_combinations_match_reference(ref, seed):
    # Options drawn together (GQA, odd lengths, offsets, windows, masks, every bias
    # broadcast, soft-cap, a score_mod with a traced table, sinks, backward slices,
    # split-K), all outputs and gradients against the float64 reference.
    rng = np.random.default_rng(100 + seed)
    call = _random_call(rng)
    shape = call["shape"]
    q_heads, d = shape[3], shape[5]
    options = call["options"]
    q, k, v = ref.qkv(seed, *shape)
    arrays = {"q": q, "k": k, "v": v}
    if call["bias_shape"] is not None:
        arrays["bias"] = jnp.asarray(rng.standard_normal(call["bias_shape"]), jnp.float32)
    if call["score_mod"]:
        arrays["table"] = jnp.asarray(rng.standard_normal((8, q_heads)), jnp.float32)
    if call["sinks"]:
        arrays["sinks"] = jnp.asarray(rng.standard_normal(q_heads), jnp.float32)
    (_, out, lse, grads), (_, out64, lse64, grads64) = _kernel_and_reference(
        ref,
        arrays,
        ref.block_mask_for(shape, call["block"], options),
        ref.mask_for(shape, options),
        rng,
        scale=1.0 / math.sqrt(d),
        q_offset=options["q_offset"],
        soft_cap=call["soft_cap"],
        make_mod=lambda a: ref.bucket_table(a["table"]) if "table" in a else None,
        backward_tile=call["backward_tile"],
        kv_splits=call["kv_splits"],
    )
    np.testing.assert_allclose(out, out64, atol=3e-5, rtol=1e-4, err_msg=str(call))
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse64))
    finite = np.isfinite(lse64)
    np.testing.assert_allclose(np.asarray(lse)[finite], lse64[finite], atol=3e-5)
    for name, got in grads.items():
        assert ref.relative_error(got, grads64[name]) < 1e-4, f"d{name}: {call}"


@pytest.mark.compat
def test_vmap_over_the_kernel(ref):
    # jax.vmap (as fancy_vmap applies it) adds a grid axis to every pallas_call; each
    # mapped slice, with its own segment ids, must match the block loop on that slice.
    rng = np.random.default_rng(42)
    q, k, v = (jnp.asarray(rng.standard_normal((3, 2, 40, h, 16)), jnp.float32) for h in (4, 2, 2))
    ids = jnp.asarray(rng.integers(0, 3, (3, 2, 40)), jnp.int32)

    def attend(q, k, v, ids, implementation):
        def same(b, h, qi, ki):
            return ids[b, qi] == ids[b, ki]

        return masked_attention_via_map(
            q, k, v, is_causal=True, mask_fn=same, implementation=implementation
        )

    def loss(q, k, v, ids, implementation):
        return jnp.sum(jnp.sin(attend(q, k, v, ids, implementation)))

    mapped = jax.vmap(lambda *a: attend(*a, "pallas"))(q, k, v, ids)
    grads = jax.vmap(jax.grad(lambda *a: loss(*a, "pallas"), argnums=(0, 1, 2)))(q, k, v, ids)
    for n in range(3):
        row_ids = np.asarray(ids[n])
        mask = ref.mask(2, 4, 40, 40, is_causal=True, mask_fn=ref.same_segment(row_ids))
        np.testing.assert_allclose(mapped[n], ref.attention(q[n], k[n], v[n], mask), atol=2e-5)
        # The block loop on this slice (float32, but an independent backend).
        expected = jax.grad(loss, argnums=(0, 1, 2))(q[n], k[n], v[n], ids[n], "xla")
        for got, want in zip(grads, expected, strict=True):
            np.testing.assert_allclose(got[n], want, atol=ref.float32_atol("xla"), rtol=1e-4)


@pytest.mark.parametrize("bias_shape", [(1, 4, 48, 80), (1, 1, 1, 80)])
def test_score_pipeline_lowers_for_cuda_without_a_gpu(ref, bias_shape):
    from jaxmodules.attention._scores import Operands

    shape = (1, 48, 80, 4, 2, 32, 32)
    q, k, v = ref.qkv(29, *shape, dtype=jnp.bfloat16)
    block_mask = ref.block_mask_for(shape, (32, 16), {"mask_fn": same_segment, "is_causal": True})
    program, consts = trace_score_mod(ref.alibi(jnp.asarray(2.0 ** -np.arange(1, 5), jnp.float32)))
    bias = jnp.asarray(np.random.default_rng(30).standard_normal(bias_shape), jnp.bfloat16)
    sinks = jnp.zeros((4,), jnp.float32)
    scores = ScoreConfig(soft_cap=20.0, score=program)

    def value_and_grads(q, k, v, bias, sinks):
        def loss(q, k, v, bias, sinks):
            out, lse = pallas.attend(
                q,
                k,
                v,
                block_mask,
                0.2,
                interpret=False,
                scores=scores,
                operands=Operands(bias, consts),
                backward_tile=16,
            )
            out, _ = with_sinks(out, lse, sinks)
            return out.astype(jnp.float32).sum()

        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, bias, sinks)

    assert _triton_kernels_for_cuda(value_and_grads, q, k, v, bias, sinks) == 3


def test_dropout_on_sub_tiles_keeps_the_block_loop_weights(ref, monkeypatch):
    # Dropout's keep decisions follow positions, so kernels whose programs own part of a
    # block, walk it in tiles and run causal rows last-first keep the block loop's
    # weights and gradients.
    from jaxmodules.attention._pallas import _entry

    tiles = _tiles((16, 16), (16, 32), (16, 16))
    monkeypatch.setattr(_entry, "whole_blocks", lambda q_block, k_block: tiles)
    q, k, v = ref.qkv(23, 2, 40, 56, 4, 2, 16)
    ct = jax.random.normal(jax.random.key(8), (2, 40, 4, 16))
    options = {"is_causal": True, "q_offset": 16, "block_size": 32, "dropout_rate": 0.3}

    def loss(q, k, v, implementation):
        out = masked_attention_via_map(
            q, k, v, dropout_rng=jax.random.key(9), implementation=implementation, **options
        )
        return jnp.sum(out * ct), out

    results = {}
    for implementation in ("triton", "xla"):
        grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
        results[implementation] = grad(q, k, v, implementation)
    (grads, out), (expected_grads, expected_out) = results["triton"], results["xla"]
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected_out), rtol=1e-5, atol=1e-5)
    for name, actual, expected in zip("qkv", grads, expected_grads, strict=True):
        np.testing.assert_allclose(
            np.asarray(actual), np.asarray(expected), rtol=1e-4, atol=1e-5, err_msg=name
        )
