"""BlockMask: built outside and inside jit, reused, offsets, one compile per mask, caches,
misuse, edge cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import (
    BlockMask,
    _block_mask,
    create_block_mask,
    masked_attention_via_map,
)
from jaxmodules.attention._xla import _entry as xla_entry


def _segments(seed, batch, length, documents):
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), documents - 1, replace=False))
        ids[b] = np.searchsorted(cuts, np.arange(length), "right")
    return ids


def _document_mask(ids):
    return ids[:, None, :, None] == ids[:, None, None, :]


def _assert_grads(grads, expected):
    for name, got, want in zip("QKV", grads, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-4, err_msg=f"d{name}")


def test_block_mask_built_once_reused_across_calls_with_gradients(ref):
    batch, length = 2, 70
    ids = _segments(1, batch, length, 3)
    ids_j = jnp.asarray(ids)

    def same_document(b, h, q, k):
        return ids_j[b, q] == ids_j[b, k]

    bm = create_block_mask(same_document, batch, 1, length, length, is_causal=True, block_size=16)
    assert bm.kv_num_blocks.shape[:2] == (batch, 1)  # depends on b, not on h
    mask = ref.mask(batch, 4, length, length, is_causal=True) & _document_mask(ids)
    for seed in (2, 3):  # one block mask, two calls (two "layers")
        q, k, v = ref.qkv(seed, batch, length, length, 4, 2, 8)
        weights = ref.qkv(seed + 10, batch, length, length, 4, 2, 8)[0]
        out = masked_attention_via_map(q, k, v, block_mask=bm)
        np.testing.assert_allclose(out, ref.attention(q, k, v, mask), atol=2e-6, rtol=2e-5)

        def loss(q, k, v, weights):
            return jnp.sum(masked_attention_via_map(q, k, v, block_mask=bm) * weights)

        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, weights)
        _assert_grads(grads, ref.gradients(q, k, v, mask, weights))


@pytest.mark.compat
def test_block_mask_built_inside_jit_from_traced_ids_is_a_pytree(ref):
    batch, length = 2, 53
    ids = _segments(4, batch, length, 4)
    q, k, v = ref.qkv(5, batch, length, length, 2, 1, 8)

    @jax.jit
    def make(ids):
        return create_block_mask(
            lambda b, h, q, k: ids[b, q] == ids[b, k],
            batch,
            1,
            length,
            length,
            is_causal=True,
            block_size=(8, 16),
        )

    bm = make(jnp.asarray(ids))  # a BlockMask returned from jit
    assert isinstance(bm, BlockMask)
    leaves, treedef = jax.tree_util.tree_flatten(bm)
    assert all(isinstance(x, jax.Array) for x in leaves)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    mask = ref.mask(batch, 2, length, length, is_causal=True) & _document_mask(ids)
    np.testing.assert_array_equal(np.asarray(again.to_dense()), mask[:, :1])
    expected_sparsity = 1 - np.count_nonzero(np.asarray(bm.block_classes())) / (2 * 7 * 4)
    assert np.isclose(bm.sparsity(), expected_sparsity)

    weights = ref.qkv(6, batch, length, length, 2, 1, 8)[0]

    @jax.jit
    def loss(q, k, v, bm):
        return jnp.sum(masked_attention_via_map(q, k, v, block_mask=bm) * weights)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, bm)
    _assert_grads(grads, ref.gradients(q, k, v, mask, weights))

    # Built and used in one jitted step, the mask never leaves the device.
    @jax.jit
    def step(q, k, v, ids):
        bm = create_block_mask(
            lambda b, h, q, k: ids[b, q] == ids[b, k],
            batch,
            1,
            length,
            length,
            is_causal=True,
            block_size=(8, 16),
        )
        return masked_attention_via_map(q, k, v, block_mask=bm)

    np.testing.assert_allclose(
        step(q, k, v, jnp.asarray(ids)), ref.attention(q, k, v, mask), atol=2e-6, rtol=2e-5
    )


@pytest.mark.compat
def test_traced_mask_has_no_per_block_conditional(ref):
    q, k, v = ref.qkv(7, 1, 64, 64, 2, 2, 8)

    def f(q, k, v, ids):
        return masked_attention_via_map(
            q, k, v, is_causal=True, block_size=16, mask_fn=lambda b, h, q, k: ids[q] == ids[k]
        )

    closed = jax.make_jaxpr(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(
        q, k, v, jnp.zeros(64, jnp.int32)
    )
    # The only conditionals are platform_dependent's (resolved when lowered) and the
    # hidden-values check of a partial tile (its careful branch,
    # _hidden.add_values_through, takes three products where the plain one takes one);
    # none decides per block whether to compute it.
    conds = list(_conditionals(closed.jaxpr))
    assert conds and "while[" in str(closed)
    for params in conds:
        products = sorted(str(b).count("dot_general") for b in params["branches"])
        careful = len(products) == 2 and products[0] == 1 and products[1] >= 3
        assert params.get("branches_platforms") is not None or careful, params


def _conditionals(jaxpr):
    """The parameters of every ``cond`` in ``jaxpr`` and the jaxprs nested in it, kernels
    aside (a kernel's own conditionals run inside one fused program)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            continue
        if eqn.primitive.name == "cond":
            yield eqn.params
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _conditionals(inner)


@pytest.mark.parametrize("traced", [False, True])
def test_q_offset_per_batch_row(ref, traced):
    """Decoding with a KV cache: each row's queries sit at the end of its own cache."""
    batch, q_len, k_len = 3, 5, 40
    offsets = np.array([35, 20, 2], np.int32)
    q, k, v = ref.qkv(8, batch, q_len, k_len, 4, 2, 8)
    weights = ref.qkv(9, batch, q_len, k_len, 4, 2, 8)[0]
    options = {"is_causal": True, "window_size": (12, None), "block_size": 8}

    def loss(q, k, v, offset):
        out = masked_attention_via_map(q, k, v, q_offset=offset, **options)
        return jnp.sum(out * weights), out

    offset = jnp.asarray(offsets) if traced else offsets
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = (
        step(q, k, v, offset)
        if traced
        else jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, offset)
    )
    mask = ref.mask(batch, 4, q_len, k_len, is_causal=True, window=(12, None), q_offset=offsets)
    np.testing.assert_allclose(out, ref.attention(q, k, v, mask), atol=2e-6, rtol=2e-5)
    _assert_grads(grads, ref.gradients(q, k, v, mask, weights))


def test_head_dependent_block_mask_with_grouped_query_heads(ref):
    q, k, v = ref.qkv(10, 2, 45, 45, 6, 2, 8)

    def per_head(b, h, q, k):  # head h sees keys within 4 * (h + 1) positions behind it
        return (q - k) < 4 * (h + 1)

    bm = create_block_mask(per_head, 1, 6, 45, 45, is_causal=True, block_size=8)
    assert bm.kv_num_blocks.shape[:2] == (1, 6)
    mask = ref.mask(2, 6, 45, 45, is_causal=True, mask_fn=per_head)
    weights = ref.qkv(11, 2, 45, 45, 6, 2, 8)[0]

    def loss(q, k, v):
        return jnp.sum(masked_attention_via_map(q, k, v, block_mask=bm) * weights)

    out = masked_attention_via_map(q, k, v, block_mask=bm)
    np.testing.assert_allclose(out, ref.attention(q, k, v, mask), atol=2e-6, rtol=2e-5)
    _assert_grads(jax.grad(loss, argnums=(0, 1, 2))(q, k, v), ref.gradients(q, k, v, mask, weights))


@pytest.mark.compat
def test_eager_calls_with_one_mask_fn_compile_once(ref):
    compiles = []

    def listener(event, *args, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    q, k, v = ref.qkv(12, 1, 48, 48, 2, 1, 8)
    ids = jnp.asarray(_segments(13, 1, 48, 3)[0])

    def same_document(b, h, q, k):
        return ids[q] == ids[k]

    counts = []
    for _ in range(6):
        before = len(compiles)
        masked_attention_via_map(q, k, v, mask_fn=same_document, block_size=16).block_until_ready()
        counts.append(len(compiles) - before)
    assert counts[0] > 0 and counts[1:] == [0] * 5, counts


@pytest.mark.compat
def test_same_mask_fn_object_sees_new_closed_over_values(ref):
    """Caches are keyed on the traced program, not the function object: a closed-over
    array that changes between calls is never baked into a stale program."""
    q, k, v = ref.qkv(14, 1, 32, 32, 2, 2, 8)
    state = {"ids": jnp.asarray(_segments(15, 1, 32, 2)[0])}

    def same_document(b, h, q, k):
        return state["ids"][q] == state["ids"][k]

    for seed in (15, 16, 17):
        ids = _segments(seed, 1, 32, 3)
        state["ids"] = jnp.asarray(ids[0])
        out = masked_attention_via_map(q, k, v, mask_fn=same_document, block_size=8)
        np.testing.assert_allclose(
            out, ref.attention(q, k, v, _document_mask(ids)), atol=2e-6, rtol=2e-5
        )


def test_caches_are_bounded_and_hold_no_closed_over_arrays(ref, monkeypatch):
    # Small bounds, so that a few distinct calls overflow them.
    monkeypatch.setattr(xla_entry._PROGRAMS, "size", 3)
    monkeypatch.setattr(_block_mask._BUILT, "size", 2)
    q, k, v = ref.qkv(18, 1, 16, 16, 1, 1, 4)
    for width in range(6):
        masked_attention_via_map(q, k, v, window_size=(width, 0), block_size=4)
        assert len(xla_entry._PROGRAMS) <= 3 and len(_block_mask._BUILT) <= 2
    # A mask that closes over an array is built for the call and not kept: the cache
    # holds the same entries before and after, none of them with closed-over arrays.
    before = list(_block_mask._BUILT._entries)
    big = jnp.arange(1 << 16) % 3
    masked_attention_via_map(q, k, v, mask_fn=lambda b, h, q, k: big[q] == big[k], block_size=4)
    assert list(_block_mask._BUILT._entries) == before
    assert all(not entry.mask_consts for entry in _block_mask._BUILT._entries.values())


def test_repr_shows_sizes_sparsity_and_picture():
    bm = create_block_mask(None, 1, 1, 64, 64, is_causal=True, block_size=16)
    text = repr(bm)
    assert "q_len=64" in text and "is_causal=True" in text and "sparsity 0.375" in text
    assert [line.strip() for line in text.splitlines()[2:6]] == ["░···", "█░··", "██░·", "███░"]


@pytest.mark.compat
def test_repr_of_a_traced_block_mask():
    seen = []

    @jax.jit
    def f(x):
        bm = create_block_mask(lambda b, h, q, k: k <= q + x, 1, 1, 32, 32, block_size=8)
        seen.append(repr(bm))
        return bm.kv_num_blocks

    f(jnp.int32(0))
    assert seen[0].startswith("BlockMask(") and "traced" in seen[0]


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"is_causal": True}, r"do not pass is_causal"),
        ({"mask_fn": lambda b, h, q, k: q >= k}, r"do not pass mask_fn"),
        ({"window_size": 3}, r"do not pass window_size"),
        ({"q_offset": 2}, r"do not pass q_offset"),
        ({"block_size": 4}, r"block_size=\(4, 4\) differs from the block mask's \(8, 8\)"),
    ],
)
def test_block_mask_with_mask_arguments_is_an_error(options, pattern):
    q = jnp.ones((1, 16, 2, 4))
    bm = create_block_mask(None, 1, 1, 16, 16, is_causal=True, block_size=8)
    with pytest.raises(ValueError, match=pattern):
        masked_attention_via_map(q, q, q, block_mask=bm, **options)


def test_block_mask_that_does_not_fit_is_an_error():
    q = jnp.ones((2, 16, 2, 4))
    with pytest.raises(
        ValueError, match=r"\(q_len, k_len\) = \(16, 20\), the inputs have \(16, 16\)"
    ):
        masked_attention_via_map(q, q, q, block_mask=create_block_mask(None, 1, 1, 16, 20))
    with pytest.raises(ValueError, match=r"built for B=3, the inputs have B=2"):
        masked_attention_via_map(q, q, q, block_mask=create_block_mask(None, 3, 1, 16, 16))
    with pytest.raises(ValueError, match=r"built for H=4, the inputs have Hq=2"):
        masked_attention_via_map(q, q, q, block_mask=create_block_mask(None, 1, 4, 16, 16))
    ids = jnp.zeros((2, 16), jnp.int32)
    by_row = create_block_mask(lambda b, h, q, k: ids[b, q] == ids[b, k], 1, 1, 16, 16)
    with pytest.raises(
        ValueError, match=r"depends on b but it was built with B=1; build it with B=2"
    ):
        masked_attention_via_map(q, q, q, block_mask=by_row)
    by_head = create_block_mask(lambda b, h, q, k: k <= q + h, 1, 1, 16, 16)
    with pytest.raises(
        ValueError, match=r"depends on h but it was built with H=1; build it with H=2"
    ):
        masked_attention_via_map(q, q, q, block_mask=by_head)
    with pytest.raises(TypeError, match=r"block_mask must be a BlockMask .* got ndarray"):
        masked_attention_via_map(q, q, q, block_mask=np.ones((16, 16), bool))


@pytest.mark.parametrize(
    ("args", "options", "error", "pattern"),
    [
        ((0, 1, 8, 8), {}, ValueError, r"B must be a positive int, got 0"),
        ((1, 1, -3, 8), {}, ValueError, r"q_len must be a positive int, got -3"),
        ((1, 1.0, 8, 8), {}, TypeError, r"H must be a positive int, got 1.0"),
        ((2, 1, 8, 8), {"q_offset": np.zeros(3, np.int32)}, ValueError, r"shape \(B,\) = \(2,\)"),
        ((2, 1, 8, 8), {"q_offset": 1.5}, TypeError, r"q_offset must be an int"),
        ((2, 1, 8, 8), {"q_offset": np.zeros(2)}, TypeError, r"q_offset must have an integer"),
        ((1, 1, 8, 8), {"window_size": (-1, 0)}, ValueError, r"window_size\[0\]"),
        ((1, 1, 8, 8), {"block_size": 0}, ValueError, r"block_size must be a positive int"),
    ],
)
@pytest.mark.compat
def test_create_block_mask_bad_arguments(args, options, error, pattern):
    with pytest.raises(error, match=pattern):
        create_block_mask(None, *args, **options)


@pytest.mark.parametrize(
    "shapes",
    [
        ((0, 8, 4, 8), (0, 8, 2, 8)),  # B = 0
        ((2, 0, 4, 8), (2, 8, 2, 8)),  # Lq = 0
        ((2, 8, 4, 8), (2, 0, 2, 8)),  # Lk = 0
    ],
)
@pytest.mark.compat
def test_empty_sizes_give_empty_or_zero_results(shapes):
    q_shape, k_shape = shapes
    q, k = jnp.ones(q_shape), jnp.ones(k_shape)
    out = masked_attention_via_map(q, k, k, is_causal=True)
    assert out.shape == q_shape and not np.asarray(out).any()
    grads = jax.grad(lambda q, k: masked_attention_via_map(q, k, k).sum(), argnums=(0, 1))(q, k)
    assert [g.shape for g in grads] == [q_shape, k_shape]
    assert not any(np.asarray(g).any() for g in grads)


def test_no_heads_is_a_clear_error():
    with pytest.raises(ValueError, match=r"numbers of heads must be positive, got Hq=0"):
        masked_attention_via_map(
            jnp.ones((1, 8, 0, 4)), jnp.ones((1, 8, 0, 4)), jnp.ones((1, 8, 0, 4))
        )


@pytest.mark.compat
def test_higher_order_derivatives_name_the_limitation(ref):
    q, k, v = ref.qkv(19, 1, 16, 16, 2, 2, 4)

    def loss(q):
        return jnp.sum(masked_attention_via_map(q, k, v, is_causal=True, block_size=8) ** 2)

    with pytest.raises(NotImplementedError, match=r"first-order reverse-mode .*\(grad of grad"):
        jax.grad(lambda q: jnp.sum(jax.grad(loss)(q)))(q)
    with pytest.raises(TypeError, match=r"can't apply forward-mode autodiff \(jvp\)"):
        jax.jvp(loss, (q,), (q,))
