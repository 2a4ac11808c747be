"""Memory linear in the sequence length, read from XLA's compiled memory analysis."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import pytest

from jaxmodules.attention import masked_attention_via_map

HEADS, DIM = 2, 32
LENGTHS = (1024, 2048, 4096)


def _temp_bytes(fn, length, *extra):
    spec = jax.ShapeDtypeStruct((1, length, HEADS, DIM), jnp.float32)
    compiled = jax.jit(fn).lower(spec, spec, spec, *extra).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _gradient(options):
    def loss(q, k, v):
        return jnp.sum(masked_attention_via_map(q, k, v, **options))

    return jax.grad(loss, argnums=(0, 1, 2))


def _forward(options):
    return lambda q, k, v: masked_attention_via_map(q, k, v, **options)


@pytest.mark.parametrize("kind", ["forward", "gradient"])
@pytest.mark.parametrize("options", [{"is_causal": True}, {}], ids=["causal", "unmasked"])
@pytest.mark.compat("kind", "options")
def test_temp_memory_is_linear_in_length(kind, options):
    fn = _gradient(options) if kind == "gradient" else _forward(options)
    sizes = [_temp_bytes(fn, length) for length in LENGTHS]
    for smaller, larger in itertools.pairwise(sizes):
        assert larger <= 2.3 * smaller, sizes
    # A single float32 score matrix for all heads would take L * L * H * 4 bytes.
    scores = LENGTHS[-1] ** 2 * HEADS * 4
    assert sizes[-1] < 0.10 * scores, (sizes[-1], scores)


@pytest.mark.compat
def test_traced_mask_memory_is_linear_in_length():
    def loss(q, k, v, ids):
        out = masked_attention_via_map(
            q, k, v, is_causal=True, mask_fn=lambda b, h, q, k: ids[q] == ids[k]
        )
        return jnp.sum(out)

    grad = jax.grad(loss, argnums=(0, 1, 2))
    sizes = [
        _temp_bytes(grad, length, jax.ShapeDtypeStruct((length,), jnp.int32))
        for length in LENGTHS[1:]
    ]
    assert sizes[1] <= 2.3 * sizes[0], sizes
    assert sizes[1] < 0.10 * LENGTHS[-1] ** 2 * HEADS * 4, sizes
