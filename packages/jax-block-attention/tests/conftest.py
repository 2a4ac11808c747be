"""The test suite's one float64 reference: dense softmax attention with every score
change (``dense_attention``, in jnp, differentiated by ``jax.grad``), the dense masks it
takes, written from the definitions, and the comparisons built on them."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace
from typing import Any

import jax
import numpy as np
import pytest

# Most of this suite's time is XLA compiling many small programs; cheaper LLVM code
# generation halves it and does not change what is computed.
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
    ]
).strip()


# The longest tests (multi-device subprocesses, brute-force mask sweeps) start first, so
# that under pytest-xdist no worker is left running one of them alone at the end.
_LONGEST_FIRST = {
    name: position
    for position, name in enumerate(
        (
            "test_ring.py::test_ring_natural_order_user_call",
            "test_ring.py::test_ring_1d_mesh_default_axis_types",
            "test_ring.py::test_ring_2d_mesh_auto_axis_types",
            "test_ring.py::test_two_processes_gloo",
            "test_masks.py::test_mask_fn_classes_and_dense_match_brute_force",
            "test_masks.py::test_random_masks_match_reference",
        )
    )
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--compat-subset",
        action="store_true",
        help="run only the tests marked `compat` (nox runs these on the older jax versions)",
    )


def compat_subset(items: list[pytest.Item]) -> list[pytest.Item]:
    """The items marked ``compat``, in collection order. ``compat("case")`` takes only the
    first value of the parameter ``case``, with every value of the other parameters."""
    first_params: dict[tuple[Any, str], dict[str, Any]] = {}
    chosen = []
    for item in items:
        marker = item.get_closest_marker("compat")
        if marker is None:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        unknown = [name for name in marker.args if name not in params]
        if unknown:
            raise pytest.UsageError(f"{item.nodeid}: compat({unknown[0]!r}) names no parameter")
        # The first item of a test function holds the first value of every parameter.
        first = first_params.setdefault((item.path, getattr(item, "originalname", "")), params)
        if all(params[name] is first[name] for name in marker.args):
            chosen.append(item)
    return chosen


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--compat-subset"):
        chosen = compat_subset(items)
        kept = set(map(id, chosen))
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
        items[:] = chosen

    def rank(item: pytest.Item) -> int:
        return _LONGEST_FIRST.get(item.nodeid.rpartition("/")[2], len(_LONGEST_FIRST))

    items.sort(key=rank)  # stable: every other test keeps its order


def dense_mask(
    batch: int,
    q_heads: int,
    q_len: int,
    k_len: int,
    *,
    is_causal: bool = False,
    window: Any = None,
    mask_fn: Callable[..., Any] | None = None,
    q_offset: Any = 0,
) -> np.ndarray:
    """The full ``(B, Hq, Lq, Lk)`` visibility, written directly from the definitions
    (query row ``i`` at position ``i + q_offset[b]``, key ``j`` at ``j``)."""
    offset = np.broadcast_to(np.asarray(q_offset).reshape(-1), (batch,))
    q = np.arange(q_len)[None, None, :, None] + offset[:, None, None, None]
    k = np.arange(k_len)[None, None, None, :]
    visible = np.ones((batch, q_heads, q_len, k_len), bool)
    if is_causal:
        visible &= k <= q
    if window is not None:
        left, right = (window, window) if isinstance(window, int) else window
        if left is not None:
            visible &= q - left <= k
        if right is not None:
            visible &= k <= q + right
    if mask_fn is not None:
        b_idx = np.arange(batch)[:, None, None, None]
        h_idx = np.arange(q_heads)[None, :, None, None]
        if len(inspect.signature(mask_fn).parameters) == 3:
            values = mask_fn(h_idx, q, k)
        else:
            values = mask_fn(b_idx, h_idx, q, k)
        visible &= np.asarray(values, bool)
    return visible


@partial(jax.jit, static_argnames="scale")
def _plain(q, k, v, mask, scale):
    """``dense_attention`` without score changes, compiled once per shape."""
    return dense_attention(q, k, v, mask, scale=scale)


@partial(jax.jit, static_argnames="scale")
def _plain_gradients(q, k, v, mask, d_out, scale):
    """The gradients of ``sum(out * d_out)`` through ``_plain``."""
    _, pullback = jax.vjp(lambda *a: dense_attention(*a, mask, scale=scale)[0], q, k, v)
    return pullback(d_out)


def _reference(Q, K, V, mask, d_out=None, scale=None):
    with float64():
        q, k, v = _as_float64(Q, K, V)
        mask = jax.numpy.asarray(mask)
        if d_out is not None:
            (do,) = _as_float64(d_out)
            return tuple(np.asarray(g) for g in _plain_gradients(q, k, v, mask, do, scale))
        return tuple(np.asarray(x) for x in _plain(q, k, v, mask, scale))


def _as_float64(*arrays):
    return [jax.numpy.asarray(np.asarray(x, np.float64)) for x in arrays]


def reference_attention(Q, K, V, mask: np.ndarray, scale: float | None = None) -> np.ndarray:
    """The float64 output of ``dense_attention``, as NumPy; rows without a visible key
    give 0."""
    return _reference(Q, K, V, mask, scale=scale)[0]


def reference_lse(Q, K, V, mask: np.ndarray, scale: float | None = None) -> np.ndarray:
    """The float64 log-sum-exp of ``dense_attention``, as NumPy (``-inf`` on empty rows)."""
    return _reference(Q, K, V, mask, scale=scale)[1]


def reference_gradients(Q, K, V, mask, d_out, scale: float | None = None):
    """Float64 gradients of ``sum(reference_attention(...) * d_out)`` with respect to
    ``Q``, ``K`` and ``V``, as NumPy."""
    return _reference(Q, K, V, mask, d_out, scale)


def random_qkv(seed, batch, q_len, k_len, q_heads, kv_heads, d, dv=None, dtype=np.float32):
    rng = np.random.default_rng(seed)
    dv = d if dv is None else dv
    shapes = [(batch, q_len, q_heads, d), (batch, k_len, kv_heads, d), (batch, k_len, kv_heads, dv)]
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    return [jax.numpy.asarray(a, dtype=dtype) for a in arrays]


def mask_for(shape, options):
    """The dense mask for a test case: ``shape`` starts (batch, Lq, Lk, Hq), ``options``
    are the keyword arguments given to ``masked_attention_via_map``."""
    batch, q_len, k_len, q_heads = shape[:4]
    return dense_mask(
        batch,
        q_heads,
        q_len,
        k_len,
        is_causal=options.get("is_causal", False),
        window=options.get("window_size"),
        mask_fn=options.get("mask_fn"),
        q_offset=options.get("q_offset", 0),
    )


def block_mask_for(shape, block, options):
    """``create_block_mask`` for a test case: ``shape`` starts (batch, Lq, Lk, Hq),
    ``options`` holds the mask keywords of ``masked_attention_via_map``."""
    from jaxmodules.attention import create_block_mask

    batch, q_len, k_len, q_heads = shape[:4]
    return create_block_mask(
        options.get("mask_fn"),
        batch,
        q_heads,
        q_len,
        k_len,
        is_causal=options.get("is_causal", False),
        window_size=options.get("window_size"),
        q_offset=options.get("q_offset", 0),
        block_size=block,
    )


def relative_error(actual, expected) -> float:
    """Largest absolute difference over the largest magnitude (at least 1)."""
    expected = np.asarray(expected, np.float64)
    difference = np.abs(np.asarray(actual, np.float64) - expected).max(initial=0.0)
    return float(difference / max(1.0, np.abs(expected).max(initial=0.0)))


def float64():
    """A context in which JAX computes in float64 (the API moved between jax versions)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64()


def dense_attention(
    Q,
    K,
    V,
    mask,
    *,
    scale=None,
    bias=None,
    soft_cap=None,
    score_mod=None,
    sinks=None,
    q_offset=0,
    dropout=None,
):
    """Dense attention with every score change, written from the definitions in jnp:
    the reference every test compares with; call it inside ``float64()``. Returns
    ``(out, lse)``: rows with nothing visible give zeros and ``lse = -inf`` (or the
    sink). Differentiable with ``jax.grad``. ``dropout = (rate, keep)``: the normalised
    weights where ``keep (B, Hq, Lq, Lk)`` is false are dropped and the others divided
    by ``1 - rate``; ``lse`` is unchanged."""
    jnp = jax.numpy
    q, k, v = (jnp.asarray(x, jnp.float64) for x in (Q, K, V))
    batch, q_len, q_heads, d = q.shape
    groups = q_heads // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        s = s + jnp.asarray(bias, jnp.float64)
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    if score_mod is not None:
        offset = np.broadcast_to(np.asarray(q_offset).reshape(-1), (batch,))
        b_idx = np.arange(batch).reshape(-1, 1, 1, 1)
        h_idx = np.arange(q_heads).reshape(1, -1, 1, 1)
        q_pos = np.arange(q_len).reshape(1, 1, -1, 1) + offset.reshape(-1, 1, 1, 1)
        k_pos = np.arange(k.shape[1]).reshape(1, 1, 1, -1)
        s = jnp.broadcast_to(score_mod(s, b_idx, h_idx, q_pos, k_pos), s.shape)
    s = jnp.where(mask, s, -jnp.inf)
    m = s.max(axis=-1, initial=-jnp.inf)
    if sinks is not None:
        m = jnp.maximum(m, jnp.asarray(sinks, jnp.float64)[None, :, None])
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.exp(s - m[..., None])
    total = p.sum(axis=-1)
    if sinks is not None:
        total = total + jnp.exp(jnp.asarray(sinks, jnp.float64)[None, :, None] - m)
    safe = jnp.where(total == 0, 1.0, total)
    weights = p / safe[..., None]
    if dropout is not None:
        rate, keep = dropout
        weights = jnp.where(np.asarray(keep), weights / (1.0 - rate), 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    lse = jnp.where(total == 0, -jnp.inf, m + jnp.log(safe))
    return out, lse


def against_reference(
    attend,
    arrays,
    visible,
    rng,
    *,
    scale=None,
    soft_cap=None,
    make_mod=None,
    q_offset=0,
    jit=False,
    dropout=None,
):
    """``attend(arrays, score_mod) -> (out, lse)`` and ``dense_attention`` in float64, on
    ``arrays`` (``q``, ``k``, ``v`` and, when present, ``bias``, ``sinks`` and whatever
    ``make_mod(arrays)``'s ``score_mod`` closes over), with the reference mask
    ``visible``. A loss weighs both outputs with weights drawn from ``rng``. Returns
    ``(value, out, lse, grads)`` for ours and, as NumPy arrays, for the reference."""
    jnp = jax.numpy
    batch, q_len, q_heads, _ = arrays["q"].shape
    dv = arrays["v"].shape[-1]
    w_out = jnp.asarray(rng.standard_normal((batch, q_len, q_heads, dv)), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal((batch, q_heads, q_len)), jnp.float32)

    def loss(out, lse):
        weighted = jnp.where(jnp.isfinite(lse), lse * w_lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(weighted)

    def score_mod(a):
        return None if make_mod is None else make_mod(a)

    def ours(a):
        out, lse = attend(a, score_mod(a))
        return loss(out, lse), (out, lse)

    def theirs(a):
        out, lse = dense_attention(
            a["q"],
            a["k"],
            a["v"],
            visible,
            scale=scale,
            bias=a.get("bias"),
            soft_cap=soft_cap,
            sinks=a.get("sinks"),
            score_mod=score_mod(a),
            q_offset=q_offset,
            dropout=dropout,
        )
        return loss(out, lse), (out, lse)

    run = jax.value_and_grad(ours, has_aux=True)
    (value, (out, lse)), grads = (jax.jit(run) if jit else run)(arrays)
    with float64():
        arrays64 = {name: jnp.asarray(x, jnp.float64) for name, x in arrays.items()}
        (value64, (out64, lse64)), grads64 = jax.value_and_grad(theirs, has_aux=True)(arrays64)
        grads64 = {name: np.asarray(g) for name, g in grads64.items()}
        theirs_result = (np.asarray(value64), np.asarray(out64), np.asarray(lse64), grads64)
    return (value, out, lse, grads), theirs_result


def compare_variants(
    shape,
    options,
    *,
    bias=None,
    sinks=None,
    extra=None,
    make_mod=None,
    visible_extra=None,
    seed=0,
    atol=3e-5,
    jit=False,
):
    """``masked_attention_via_map(**options)`` against ``dense_attention`` in float64:
    outputs, lse and the gradients of a loss through both with respect to Q, K, V and
    the given ``bias``, ``sinks`` and ``extra`` (the array ``make_mod(extra)``'s
    ``score_mod`` closes over). ``shape`` is ``(B, Lq, Lk, Hq, Hkv, d)``;
    ``visible_extra`` narrows the reference's mask (for ``mask`` / lengths keywords).
    With ``dropout_rate`` in ``options`` the reference drops the weights where
    ``dropout_keep_mask`` says. Returns our output."""
    from jaxmodules.attention import dropout_keep_mask, masked_attention_via_map

    batch, q_len, k_len, q_heads, kv_heads, d = shape
    q, k, v = random_qkv(seed, batch, q_len, k_len, q_heads, kv_heads, d)
    visible = mask_for(shape, options)
    if visible_extra is not None:
        visible = visible & visible_extra
    diff = {"q": q, "k": k, "v": v}
    for name, x in (("bias", bias), ("sinks", sinks), ("extra", extra)):
        if x is not None:
            diff[name] = x
    dropout = None
    if options.get("dropout_rate", 0.0) > 0.0:
        rate = options["dropout_rate"]
        keep_shape = (batch, q_heads, q_len, k_len)
        offset = options.get("q_offset", 0)
        keep = dropout_keep_mask(options["dropout_rng"], rate, keep_shape, q_offset=offset)
        dropout = (rate, np.asarray(keep))

    def attend(arrays, score_mod):
        kw = dict(options, bias=arrays.get("bias"), sinks=arrays.get("sinks"))
        return masked_attention_via_map(
            arrays["q"], arrays["k"], arrays["v"], score_mod=score_mod, return_lse=True, **kw
        )

    (_, out, lse, grads), (_, out64, lse64, grads64) = against_reference(
        attend,
        diff,
        visible,
        np.random.default_rng(seed + 1),
        scale=options.get("scale"),
        soft_cap=options.get("logits_soft_cap"),
        make_mod=None if make_mod is None else lambda arrays: make_mod(arrays.get("extra")),
        q_offset=options.get("q_offset", 0),
        jit=jit,
        dropout=dropout,
    )
    np.testing.assert_allclose(out, out64, atol=atol, rtol=1e-4, err_msg="out")
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse64))
    finite = np.isfinite(lse64)
    np.testing.assert_allclose(np.asarray(lse)[finite], lse64[finite], atol=atol, rtol=1e-5)
    for name, got in grads.items():
        assert got.shape == diff[name].shape, name
        np.testing.assert_allclose(got, grads64[name], atol=atol * 4, rtol=2e-4, err_msg=f"d{name}")
    return out


# score_mod factories shared by the tests: ALiBi with per-head slopes, a relative
# position table read at q - k, and a T5-style table read at a bucket of q - k and the head.


def alibi(slopes):
    def score_mod(score, b, h, q, k):
        return score - slopes[h] * jax.numpy.abs(q - k)

    return score_mod


def relative_table(table):
    span = table.shape[0] // 2

    def score_mod(score, b, h, q, k):
        return score + table[jax.numpy.clip(q - k, -span, span) + span]

    return score_mod


def same_segment(ids):
    """``mask_fn`` of packed documents: ``ids`` is ``(B, L)``."""

    def mask_fn(b, h, q, k):
        return ids[b, q] == ids[b, k]

    return mask_fn


def bucket_table(table):
    def score_mod(score, b, h, q, k):
        return score + table[jax.numpy.clip(q - k, -3, 4) + 3, h]

    return score_mod


def float32_atol(implementation: str | None) -> float:
    """Absolute tolerance of a float32 result against float64 (unit-normal inputs, the
    suite's sizes), per backend as docs/ring.md states: the Triton kernels multiply
    float32 in full precision everywhere; the block loop's dots follow jax's default
    precision, which is TF32 on NVIDIA GPUs."""
    if implementation not in ("triton", "pallas") and jax.default_backend() == "gpu":
        return 2e-3
    return 2e-5


@pytest.fixture(scope="session")
def ref() -> SimpleNamespace:
    return SimpleNamespace(
        mask=dense_mask,
        mask_for=mask_for,
        block_mask_for=block_mask_for,
        relative_error=relative_error,
        attention=reference_attention,
        lse=reference_lse,
        gradients=reference_gradients,
        qkv=random_qkv,
        float64=float64,
        dense=dense_attention,
        compare_variants=compare_variants,
        float32_atol=float32_atol,
        against_reference=against_reference,
        alibi=alibi,
        relative_table=relative_table,
        bucket_table=bucket_table,
        same_segment=same_segment,
    )
