"""The Mosaic TPU backend beyond the shared contract suite (``test_backends.py``): the
lists its kernels prefetch, dropout and decoding against the float64 reference (TPU
kernels in interpret mode on this host), and the program a TPU user gets (lowered for a
TPU: one ``tpu_custom_call`` per kernel)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import create_block_mask, explain_dispatch, masked_attention_via_map
from jaxmodules.attention._mosaic_tpu._lists import kernel_lists
from jaxmodules.attention._mosaic_tpu._rules import mosaic_tpu_problem

pytestmark = pytest.mark.skipif(mosaic_tpu_problem() is not None, reason=mosaic_tpu_problem() or "")


def _documents(b, h, q, k):
    return (q // 70 == k // 70) | (k < 8)


@pytest.mark.parametrize("per_batch", [False, True])
def test_kernel_lists_hold_every_non_empty_block_once(per_batch):
    # Per row: the non-empty blocks (full ones flagged), each once, then the last one
    # repeated, on both sides; against the block classes the block mask describes.
    offset = np.array([0, 37]) if per_batch else 5
    bm = create_block_mask(
        _documents,
        2 if per_batch else 1,
        1,
        200,
        260,
        is_causal=True,
        block_size=(24, 32),
        q_offset=offset,
    )
    classes = np.asarray(bm.block_classes())
    for side, grid in (("kv", classes), ("q", np.swapaxes(classes, -1, -2))):
        lists = kernel_lists(bm, side)
        rows = grid.reshape(-1, grid.shape[-1])
        counts = np.asarray(lists.counts)
        indices = np.asarray(lists.indices).reshape(len(rows), lists.steps)
        full = np.asarray(lists.full).reshape(len(rows), lists.steps)
        assert lists.steps >= counts.max()
        for row, n, idx, flags in zip(rows, counts, indices, full, strict=True):
            listed = idx[:n]
            assert sorted(listed) == list(np.flatnonzero(row)), side
            np.testing.assert_array_equal(flags[:n], row[listed] == 2)
            if n:
                assert (idx[n:] == idx[n - 1]).all() and not flags[n:].any()


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
