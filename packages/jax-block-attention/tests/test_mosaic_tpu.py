"""The Mosaic TPU backend beyond the shared contract suite (``test_backends.py``): the
block-mask schedule its kernels prefetch and walk, dropout and decoding against the
float64 reference (TPU kernels in interpret mode on this host), and the program a TPU
user gets (lowered for a TPU: one ``tpu_custom_call`` per kernel)."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import (
    _block_mask,
    create_block_mask,
    explain_dispatch,
    masked_attention_via_map,
)
from jaxmodules.attention._mosaic_tpu import _lists
from jaxmodules.attention._mosaic_tpu._lists import KernelSchedule, kernel_schedule, step_block
from jaxmodules.attention._mosaic_tpu._rules import mosaic_tpu_problem

pytestmark = pytest.mark.skipif(mosaic_tpu_problem() is not None, reason=mosaic_tpu_problem() or "")


def _documents(b, h, q, k):
    return (q // 70 == k // 70) | (k < 8)


def _reference_classes(visible, block):
    """``(B, H, n_q, n_k)`` block classes of a dense visibility (0 empty, 1 partial, 2
    full): padded query rows repeat the last row, padded keys are invisible."""
    bq, bk = block
    batch, heads, q_len, k_len = visible.shape
    n_q, n_k = -(-q_len // bq), -(-k_len // bk)
    rows = np.minimum(np.arange(n_q * bq), q_len - 1)
    padded = np.zeros((batch, heads, n_q * bq, n_k * bk), bool)
    padded[..., :k_len] = visible[:, :, rows]
    tiles = padded.reshape(batch, heads, n_q, bq, n_k, bk)
    return np.where(tiles.all(axis=(3, 5)), 2, np.where(tiles.any(axis=(3, 5)), 1, 0))


def _walked(bm, side, schedule):
    """The blocks the kernels visit, by replaying ``step_block`` (the scalar code of
    the index maps and kernels) on every (row, step) of ``schedule``: classes ``(Bm,
    Hm, rows, others)``, 2 where the kernel skips the mask."""
    _, _, q_len, k_len = bm.shape
    lo, hi = bm.band()
    n_q, n_k = bm.num_blocks
    config = SimpleNamespace(
        walk=schedule.walk, mask_batch=bm.mask_batch, mask_heads=bm.mask_heads,
        n_q_blocks=n_q, n_k_blocks=n_k, q_len=q_len, k_len=k_len,
        q_block=bm.block_size[0], k_block=bm.block_size[1], lo=lo, hi=hi,
        kv_steps=schedule.steps, q_steps=schedule.steps,
    )  # fmt: skip
    rows, others = (n_q, n_k) if side == "kv" else (n_k, n_q)
    refs = (*schedule.arrays, jnp.asarray(bm.q_offset, jnp.int32).reshape(-1))
    b = jnp.arange(bm.mask_batch)[:, None, None, None]
    h = jnp.arange(bm.mask_heads)[None, :, None, None]
    row = jnp.arange(rows)[None, None, :, None]
    t = jnp.arange(schedule.steps)[None, None, None, :]
    shape = (bm.mask_batch, bm.mask_heads, rows, schedule.steps)
    block, active, full = (
        np.broadcast_to(np.asarray(x), shape) for x in step_block(config, side, refs, b, h, row, t)
    )
    classes = np.zeros((*shape[:3], others), np.int8)
    for index in np.ndindex(*shape[:3]):
        walked = block[index][active[index]]
        assert len(set(walked.tolist())) == len(walked), "a block visited twice"
        classes[index][walked] = np.where(full[index][active[index]], 2, 1)
        count = int(active[index].sum())
        assert not active[index][count:].any()
        if count:
            # Past the end the last block again: the pipeline copies nothing new.
            assert (block[index][count:] == block[index][count - 1]).all()
    return classes


def _documents_of(ids):
    return lambda b, h, q, k: ids[b, q] == ids[b, k]


CASES = {
    "causal": {"is_causal": True},
    "window": {"window_size": (50, 10)},
    "offsets": {"is_causal": True, "q_offset": np.array([0, 37])},
    "documents": {"is_causal": True},
    "holes": {},
}


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_walk_is_the_reference_block_classes_from_tables_of_o_blocks(
    ref, case, traced, monkeypatch
):
    # The kernels' walk (index maps and kernels alike) visits the non-empty blocks of
    # the dense mask, each once, and skips the mask only on full blocks. Prefetched: a
    # band nothing but the offsets, documents four numbers per block row (no table of
    # n_q * n_k entries), a mask with holes its lists. Traced: offsets and ids traced.
    monkeypatch.setattr(_block_mask, "TRACED_LIST_PAIRS", 0)
    options = dict(CASES[case])
    batch, q_len, k_len, block = 2, 200, 260, (24, 32)
    ids = np.stack([np.arange(k_len) // 45, (np.arange(k_len) + 20) // 60]).astype(np.int32)
    offset = options.pop("q_offset", 0)
    mask_fn = {"documents": lambda b, h, q, k: ids[b, q] == ids[b, k], "holes": _documents}
    visible = ref.mask(
        batch, 1, q_len, k_len, is_causal=options.get("is_causal", False),
        window=options.get("window_size"), mask_fn=mask_fn.get(case), q_offset=offset,
    )  # fmt: skip

    def plan(ids, offset):
        fn = {"documents": _documents_of(ids), "holes": _documents}.get(case)
        return create_block_mask(
            fn, batch, 1, q_len, k_len, block_size=block, q_offset=offset, **options
        )

    steps: dict[str, int] = {}

    def with_schedules(ids, offset):
        bm = plan(ids, offset)
        schedules = {side: kernel_schedule(bm, side) for side in ("kv", "q")}
        steps.update({side: s.steps for side, s in schedules.items()})
        return bm, {side: s.arrays for side, s in schedules.items()}

    if traced:
        bm, arrays = jax.jit(with_schedules)(jnp.asarray(ids), jnp.asarray(offset, jnp.int32))
    else:
        bm, arrays = with_schedules(jnp.asarray(ids), offset)
    expected = _reference_classes(visible, block)
    for side, want in (("kv", expected), ("q", np.swapaxes(expected, -1, -2))):
        walked = _walked(bm, side, KernelSchedule(bm.walk, arrays[side], steps[side]))
        want = np.broadcast_to(want[: bm.mask_batch, : bm.mask_heads], walked.shape)
        assert not ((want != 0) & (walked == 0)).any(), f"{side}: a non-empty block skipped"
        assert not ((walked == 2) & (want != 2)).any(), f"{side}: a partial block unmasked"
        if case != "holes" or bm.walk == "lists":
            np.testing.assert_array_equal(walked != 0, want != 0, err_msg=side)
        if bm.walk == "band":
            np.testing.assert_array_equal(walked, want, err_msg=side)
        rows = walked.shape[2]
        sizes = [int(np.size(a)) for a in arrays[side]]
        if bm.walk != "lists":
            assert sizes == ([] if bm.walk == "band" else [bm.mask_batch * rows * 4])
    walk = {"holes": "ranges" if traced else "lists", "documents": "ranges"}.get(case, "band")
    assert bm.walk == walk


def test_lists_too_large_for_smem_are_walked_as_ranges(ref, monkeypatch):
    # Lists beyond the SMEM budget: the kernels walk the ranges the mask also keeps
    # (holes computed, masked): every non-empty block visited, results unchanged.
    monkeypatch.setattr(_lists, "SMEM_LIST_BYTES", 0)
    length, block = 200, (24, 32)
    bm = create_block_mask(_documents, 1, 1, length, length, block_size=block)
    assert bm.walk == "lists" and _lists.kernel_walk(bm) == "ranges"
    visible = ref.mask(1, 1, length, length, mask_fn=_documents)
    expected = _reference_classes(visible, block)
    for side, want in (("kv", expected), ("q", np.swapaxes(expected, -1, -2))):
        schedule = kernel_schedule(bm, side)
        assert schedule.walk == "ranges"
        walked = _walked(bm, side, schedule)
        assert not ((want != 0) & (walked == 0)).any(), side
        assert not ((walked == 2) & (want != 2)).any(), side
    q, k, v = ref.qkv(9, 1, length, length, 2, 1, 16)
    out = masked_attention_via_map(q, k, v, block_mask=bm, implementation="mosaic_tpu")
    np.testing.assert_allclose(out, ref.attention(q, k, v, visible), atol=2e-5, rtol=1e-4)


def test_band_schedule_at_a_million_tokens_is_arithmetic():
    # At L = 1,048,576 the band prefetches nothing and its steps are the widest row.
    length = 1 << 20
    for options, widest in (({"is_causal": True}, 2048), ({"window_size": (4096, 0)}, 9)):
        bm = create_block_mask(None, 1, 1, length, length, block_size=512, **options)
        for side in ("kv", "q"):
            schedule = kernel_schedule(bm, side)
            assert schedule.arrays == () and schedule.steps == widest


def test_dropout_with_every_score_change(ref):
    # Dropout draws the block loop's keep decisions (the reference drops the same
    # weights); with bias, soft cap, sinks, ALiBi and GQA; forward, lse, gradients.
    rng = np.random.default_rng(31)
    bias = jnp.asarray(rng.standard_normal((1, 4, 1, 40)), jnp.float32)
    sinks = jnp.asarray([0.5, -1.0, 2.0, 0.0], jnp.float32)
    alibi = ref.alibi(jnp.asarray(2.0 ** -np.arange(1, 5), jnp.float32))
    options = {
        "is_causal": True,
        "implementation": "mosaic_tpu",
        "logits_soft_cap": 3.0,
        "dropout_rate": 0.3,
        "dropout_rng": jax.random.key(22),
    }
    ref.compare_variants(
        (1, 40, 40, 4, 2, 16),
        options,
        bias=bias,
        sinks=sinks,
        make_mod=lambda _: alibi,
        seed=32,
        jit=True,
    )


def test_decoding_few_queries_many_keys(ref):
    # Three new queries per batch row at the end of 300 cached keys (one query block,
    # three key blocks, the last padded).
    options = {"is_causal": True, "q_offset": np.array([297, 150]), "implementation": "mosaic_tpu"}
    ref.compare_variants((2, 3, 300, 4, 1, 32), options, seed=33, jit=True)


def _abstract_tpu():
    sharding = jax.sharding
    if not (hasattr(sharding, "AbstractDevice") and hasattr(sharding, "use_abstract_mesh")):
        pytest.skip("this jax cannot lower for an abstract TPU")
    device = sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    return sharding.use_abstract_mesh(sharding.AbstractMesh((), (), abstract_device=device))


def test_default_implementation_on_a_tpu_is_the_kernels(ref):
    # implementation=None lowered for a TPU: forward, dQ and dK/dV kernels; a refusal
    # there (a closed-over array read in the kernel) leaves the block loop, and says so.
    from jax import export

    q, k, v = ref.qkv(5, 1, 256, 256, 2, 1, 64, dtype=jnp.bfloat16)

    def loss(q, k, v):
        out = masked_attention_via_map(q, k, v, is_causal=True, logits_soft_cap=20.0)
        return out.astype(jnp.float32).sum()

    with _abstract_tpu():
        exported = export.export(jax.jit(jax.value_and_grad(loss, (0, 1, 2))), platforms=["tpu"])
        text = exported(q, k, v).mlir_module()
    assert text.count("tpu_custom_call") == 3
    decisions = explain_dispatch(q, k, v, is_causal=True, mask_fn=lambda b, h, i, j: i != j)
    assert decisions["tpu"].backend == "mosaic_tpu" and decisions["cpu"].backend == "xla"
    # Segment ids are read per query row and per key column before the kernels; a
    # table read at q - k would be quadratic: refused, so the block loop takes it.
    ids = jnp.arange(256) // 64
    docs = explain_dispatch(q, k, v, mask_fn=lambda b, h, i, j: ids[i] == ids[j], platform="tpu")
    assert docs["tpu"].backend == "mosaic_tpu"
    table = jnp.arange(512) % 3 == 0
    diagonal = explain_dispatch(
        q, k, v, mask_fn=lambda b, h, i, j: table[i - j + 256], platform="tpu"
    )["tpu"]
    assert diagonal.backend == "xla"
    assert "varies with both the query and the key" in diagonal.refusals["mosaic_tpu"]


def test_query_row_reads_of_narrow_dtypes_are_lane_dense(ref):
    # mask_fn reads int8 ids per query row and per key column and booleans per (batch,
    # head, query row); score_mod reads bfloat16 per (head, query row). The query rows
    # are handed to the kernels lane-dense, (.., 1, Lq_pad), in 32 bits, and turned back.
    from jaxmodules.attention._mosaic_tpu._entry import _reads

    rng = np.random.default_rng(50)
    ids = jnp.asarray(np.stack([np.arange(40) // 9, np.arange(40) // 13]), jnp.int8)
    flags = jnp.asarray(rng.random((2, 4, 40)) < 0.8)
    shift = jnp.asarray(rng.standard_normal((4, 40)), jnp.bfloat16)

    def mask_fn(b, h, q, k):
        return (ids[b, q] == ids[b, k]) & flags[b, h, q]

    def mod(score, b, h, q, k):
        return score + shift[h, q].astype(jnp.float32)

    options = {"is_causal": True, "q_offset": 16, "mask_fn": mask_fn, "block_size": (8, 16)}
    bm = create_block_mask(mask_fn, 2, 4, 24, 40, is_causal=True, q_offset=16, block_size=(8, 16))
    arrays, specs, _ = _reads(bm, SimpleNamespace(score=None), None, 2, 4)
    rows = np.arange(24) + 16  # 3 whole query blocks; keys padded to 48 by the last one
    keys = np.minimum(np.arange(48), 39)
    ids_, flags_ = np.asarray(ids), np.asarray(flags)
    expected = [ids_[:, None, None, rows], ids_[:, None, None, keys], flags_[:, :, None, rows]]
    assert [s.query_row for s in specs] == [True, False, True]
    for got, want in zip(arrays, expected, strict=True):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, np.asarray(want).astype(got.dtype))
    assert arrays[0].dtype == arrays[2].dtype == jnp.int32 and arrays[1].dtype == jnp.int8
    options["implementation"] = "mosaic_tpu"
    ref.compare_variants((2, 24, 40, 4, 2, 16), options, make_mod=lambda _: mod, seed=51, jit=True)
