"""jit, vmap, remat, masks over traced values, block skipping, sharded inputs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import masked_attention_via_map


def _segments(seed, batch, length, documents):
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, length), documents - 1, replace=False), axis=-1)
    ids = np.zeros((batch, length), np.int32)
    for b in range(batch):
        ids[b] = np.searchsorted(np.concatenate([cuts, [length]]), np.arange(length), "right")
    return ids


@pytest.mark.compat
def test_jit_and_eager_agree(ref):
    q, k, v = ref.qkv(30, 2, 45, 45, 4, 2, 8)

    def f(q, k, v):
        return masked_attention_via_map(q, k, v, is_causal=True, window_size=(9, 0), block_size=16)

    np.testing.assert_allclose(jax.jit(f)(q, k, v), f(q, k, v), atol=1e-6)


@pytest.mark.compat
def test_vmap_over_an_extra_axis(ref):
    q, k, v = ref.qkv(31, 3, 20, 28, 2, 1, 8)

    def one(q, k, v):  # 3-D inputs: no batch axis inside the vmap
        return masked_attention_via_map(q, k, v, window_size=(4, 4), block_size=8)

    mapped = jax.vmap(one)(q, k, v)
    looped = np.stack([one(q[i], k[i], v[i]) for i in range(3)])
    np.testing.assert_allclose(mapped, looped, atol=1e-6)
    np.testing.assert_allclose(
        mapped, ref.attention(q, k, v, ref.mask(3, 2, 20, 28, window=(4, 4))), atol=2e-6
    )


@pytest.mark.compat
def test_remat_gives_the_same_gradients(ref):
    q, k, v = ref.qkv(32, 1, 36, 36, 2, 2, 8)

    def loss(q, k, v):
        return jnp.sum(jnp.sin(masked_attention_via_map(q, k, v, is_causal=True, block_size=8)))

    plain = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(plain, remat, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_mask_over_traced_segment_ids_inside_jit(ref):
    batch, length = 2, 50
    q, k, v = ref.qkv(33, batch, length, length, 4, 2, 8)
    segment_ids = _segments(34, batch, length, 4)
    weights = ref.qkv(35, batch, length, length, 4, 2, 8)[0]

    def attention(q, k, v, ids):
        def same_document(b, h, q, k):
            return ids[b, q] == ids[b, k]

        return masked_attention_via_map(
            q, k, v, is_causal=True, mask_fn=same_document, block_size=8
        )

    def loss(q, k, v, ids):
        return jnp.sum(attention(q, k, v, ids) * weights)

    mask = ref.mask(batch, 4, length, length, is_causal=True) & (
        segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    )
    out = jax.jit(attention)(q, k, v, jnp.asarray(segment_ids))
    np.testing.assert_allclose(out, ref.attention(q, k, v, mask), atol=2e-6, rtol=2e-5)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, jnp.asarray(segment_ids))
    for got, want in zip(grads, ref.gradients(q, k, v, mask, weights), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_vmap_over_segment_ids_with_gradients(ref):
    batch, length = 3, 40
    q, k, v = ref.qkv(36, batch, length, length, 2, 2, 8)
    segment_ids = _segments(37, batch, length, 3)

    def one(q, k, v, ids):
        return masked_attention_via_map(
            q, k, v, mask_fn=lambda h, q, k: ids[q] == ids[k], block_size=16
        )

    def loss(q, k, v, ids):
        return jnp.sum(jax.vmap(one)(q, k, v, ids) ** 2)

    mask = np.broadcast_to(
        segment_ids[:, None, :, None] == segment_ids[:, None, None, :], (batch, 2, length, length)
    )
    ids = jnp.asarray(segment_ids)
    out = jax.jit(jax.vmap(one))(q, k, v, ids)
    np.testing.assert_allclose(out, ref.attention(q, k, v, mask), atol=2e-6, rtol=2e-5)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, ids)
    for got, want in zip(grads, ref.gradients(q, k, v, mask, 2 * out), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.compat
def test_skipped_blocks_are_never_computed(ref):
    """NaNs in keys and values that no query can see stay out of the result: blocks the
    mask leaves empty are skipped, not computed and masked (0 * NaN would be NaN)."""
    q, k, v = ref.qkv(38, 1, 64, 64, 2, 2, 8)
    hidden = slice(32, 48)  # key block 2 at block size 16
    k = k.at[:, hidden].set(jnp.nan)
    v = v.at[:, hidden].set(jnp.nan)

    def visible(b, h, q, k):
        return (k < 32) | (k >= 48)

    def check(out, grads=None):
        assert np.isfinite(np.asarray(out)).all()
        for g in grads or ():
            assert np.isfinite(np.asarray(g)).all()

    def loss(q, k, v):
        return jnp.sum(masked_attention_via_map(q, k, v, mask_fn=visible, block_size=16))

    # Decided at trace time from the mask.
    check(
        masked_attention_via_map(q, k, v, mask_fn=visible, block_size=16),
        jax.grad(loss, argnums=(0, 1, 2))(q, k, v),
    )

    # Decided on device: the mask closes over a traced bound.
    @jax.jit
    def traced(q, k, v, start):
        return masked_attention_via_map(
            q, k, v, mask_fn=lambda b, h, q, k: (k < start) | (k >= start + 16), block_size=16
        )

    check(traced(q, k, v, 32))
    # Causal: with 16 queries, key blocks 1..3 lie wholly in the future.
    k_causal = k.at[:, 16:].set(jnp.nan)
    v_causal = v.at[:, 16:].set(jnp.nan)
    check(masked_attention_via_map(q[:, :16], k_causal, v_causal, is_causal=True, block_size=16))


@pytest.mark.compat
def test_sharded_batch_and_heads():
    """Inputs sharded over batch (and heads) on two host devices give the same result."""
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jaxmodules.attention import masked_attention_via_map

        assert len(jax.devices()) == 2
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal((2, 40, 4, 8)), jnp.float32) for _ in "qkv")
        mesh = Mesh(np.array(jax.devices()), ("data",))

        def loss(q, k, v):
            out = masked_attention_via_map(q, k, v, is_causal=True, block_size=16)
            return jnp.sum(out ** 2), out

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
        (_, expected), expected_grads = step(q, k, v)
        for spec in (P("data"), P(None, None, "data")):
            sharding = NamedSharding(mesh, spec)
            (_, out), grads = step(*(jax.device_put(x, sharding) for x in (q, k, v)))
            np.testing.assert_allclose(out, expected, atol=1e-6)
            for g, e in zip(grads, expected_grads):
                np.testing.assert_allclose(g, e, atol=1e-5)
        print("ok")
        """
    )
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
