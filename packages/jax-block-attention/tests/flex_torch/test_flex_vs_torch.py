"""``jaxmodules.attention.flex`` against PyTorch's FlexAttention, case by case.

Each case's ``mask_mod`` and ``score_mod`` are written once and built for both
frameworks: only the array namespace (``torch`` or ``jax.numpy``) and the arrays they
close over differ, which is what porting code by changing imports means. The forward
output and the log-sum-exp are compared with PyTorch (eager, CPU); PyTorch has no CPU
backward, so the gradients (of q, k, v and of the floating arrays a ``score_mod`` closes
over) are compared with the float64 dense reference, under the mask PyTorch's own
``create_mask`` gives. The largest differences seen are printed at the end of the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch_flex = pytest.importorskip("torch.nn.attention.flex_attention")

from jaxmodules.attention import flex  # noqa: E402

# Eager PyTorch FlexAttention warns that it materialises the scores (fine at these
# sizes), and return_lse=True is the form the ported code uses.
pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
    pytest.mark.filterwarnings("ignore:return_lse is deprecated"),
]

FORWARD_ATOL = 2e-5  # ours (float32, block by block) against PyTorch (float32, dense)
GRAD_ATOL = 1e-4  # ours (float32) against the float64 reference

# Largest differences per case and quantity, reported by this folder's conftest.
DIFFERENCES: dict[str, dict[str, float]] = {}


# --------------------------------------------------------------------------- the cases
# make(xp, p) -> (mask_mod or None, score_mod or None): xp is torch or jax.numpy, p the
# case's arrays in that framework.


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(size):
    def window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= size)

    return window


def prefix_lm(prefix):
    def prefix_mask(b, h, q_idx, kv_idx):
        return kv_idx < prefix

    return prefix_mask


def same_document(doc):
    def document(b, h, q_idx, kv_idx):
        return doc[b, q_idx] == doc[b, kv_idx]

    return document


def alibi(slopes):
    def alibi_mod(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * abs(q_idx - kv_idx)

    return alibi_mod


def soft_cap(xp, cap):
    def tanh_cap(score, b, h, q_idx, kv_idx):
        return cap * xp.tanh(score / cap)

    return tanh_cap


def _rng_docs(seed, batch, length, n_docs):
    """Sorted document ids ``(batch, length)`` with random boundaries per row."""
    rng = np.random.default_rng(seed)
    ids = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), n_docs - 1, replace=False))
        ids.append(np.searchsorted(cuts, np.arange(length), side="right"))
    return np.stack(ids).astype(np.int32)


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Any, dict[str, Any]], tuple[Any, Any]]
    B: int = 2
    Hq: int = 2
    Hkv: int = 2
    L: int = 128
    S: int = 128
    E: int = 16
    Ev: int | None = None
    mask_B: int | None = None  # the B given to create_block_mask
    mask_H: int | None = None
    block_size: Any = 32
    scale: float | None = None
    params: dict[str, np.ndarray] = field(default_factory=dict)


_slopes = 2.0 ** -np.arange(1, 5, dtype=np.float32)
_heads_window = np.array([8, 24, 40, 72], np.int32)

CASES = [
    Case("no mask", lambda xp, p: (None, None), L=96, S=96),
    Case("noop_mask", lambda xp, p: (flex_ns(xp).noop_mask, None)),
    Case("causal", lambda xp, p: (causal, None)),
    Case("sliding window", lambda xp, p: (sliding_window(40), None)),
    Case(
        "prefix LM",
        lambda xp, p: (flex_ns(xp).or_masks(causal, prefix_lm(48)), None),
    ),
    Case(
        "and_masks(causal, window) | prefix",
        lambda xp, p: (
            flex_ns(xp).or_masks(flex_ns(xp).and_masks(causal, sliding_window(24)), prefix_lm(20)),
            None,
        ),
    ),
    Case(
        "and_masks of three",
        lambda xp, p: (
            flex_ns(xp).and_masks(causal, sliding_window(64), lambda b, h, q, k: k % 3 != 1),
            None,
        ),
    ),
    Case(
        "batch-dependent",
        lambda xp, p: (lambda b, h, q, k: (q >= k) & (k >= p["start"][b]), None),
        mask_B=2,
        params={"start": np.array([0, 70], np.int32)},
    ),
    Case(
        "head-dependent window",
        lambda xp, p: (lambda b, h, q, k: (q >= k) & (q - k <= p["window"][h]), None),
        Hq=4,
        Hkv=4,
        mask_H=4,
        params={"window": _heads_window},
    ),
    Case(
        "batch- and head-dependent",
        lambda xp, p: (lambda b, h, q, k: (q - k <= p["window"][h]) & (k >= p["start"][b]), None),
        Hq=4,
        Hkv=4,
        mask_B=2,
        mask_H=4,
        params={"window": _heads_window, "start": np.array([5, 50], np.int32)},
    ),
    Case(
        "documents from an index array",
        lambda xp, p: (flex_ns(xp).and_masks(causal, same_document(p["doc"])), None),
        mask_B=2,
        params={"doc": _rng_docs(0, 2, 128, 4)},
    ),
    Case("GQA 4:1", lambda xp, p: (causal, None), Hq=4, Hkv=1),
    Case("GQA 4:2, no mask", lambda xp, p: (None, None), Hq=4, Hkv=2),
    Case("Lq < Lk, causal", lambda xp, p: (causal, None), L=64, S=160),
    Case("Lq > Lk, window", lambda xp, p: (sliding_window(30), None), L=160, S=96),
    Case("Lq != Lk, not block multiples", lambda xp, p: (causal, None), L=72, S=100),
    Case("Ev != E", lambda xp, p: (causal, None), E=16, Ev=24),
    Case(
        "ALiBi",
        lambda xp, p: (causal, alibi(p["slopes"])),
        Hq=4,
        Hkv=4,
        params={"slopes": _slopes},
    ),
    Case("tanh soft-cap", lambda xp, p: (causal, soft_cap(xp, 2.0))),
    Case("tanh soft-cap, no mask", lambda xp, p: (None, soft_cap(xp, 1.5)), L=64, S=96),
    Case(
        "ALiBi + soft-cap + documents, GQA",
        lambda xp, p: (
            same_document(p["doc"]),
            lambda s, b, h, q, k: soft_cap(xp, 3.0)(alibi(p["slopes"])(s, b, h, q, k), b, h, q, k),
        ),
        Hq=4,
        Hkv=2,
        mask_B=2,
        params={"slopes": _slopes, "doc": _rng_docs(1, 2, 128, 3)},
    ),
    Case("explicit scale", lambda xp, p: (causal, None), scale=0.61),
    Case(
        "explicit scale + ALiBi",
        lambda xp, p: (None, alibi(p["slopes"])),
        Hq=4,
        Hkv=4,
        scale=0.2,
        params={"slopes": _slopes},
    ),
    Case("block size 16", lambda xp, p: (sliding_window(20), None), block_size=16),
    Case("block size (32, 64)", lambda xp, p: (causal, None), block_size=(32, 64)),
    Case(
        "block size 64, Lq != Lk", lambda xp, p: (prefix_lm(40), None), block_size=64, L=96, S=192
    ),
    Case("B=None, H=None", lambda xp, p: (causal, None), mask_B=None, mask_H=None),
    Case("B=2, H=None", lambda xp, p: (causal, None), mask_B=2, mask_H=None),
    Case("B=None, H=2", lambda xp, p: (causal, None), mask_B=None, mask_H=2),
    Case(
        "empty rows",
        lambda xp, p: (lambda b, h, q, k: (q >= k) & (q % 5 != 3), None),
    ),
    # The recipes the documentation shows, written as PyTorch would.
    Case("recipe: causal sliding window", lambda xp, p: (sliding_window(16), None), L=96, S=96),
    Case(
        "recipe: prefix LM",
        lambda xp, p: (lambda b, h, q, k: (k <= q) | (k < 64), None),
        L=96,
        S=96,
    ),
    Case(
        "recipe: packed documents",
        lambda xp, p: (
            lambda b, h, q, k: (k <= q) & (p["doc"][b, q] == p["doc"][b, k]),
            None,
        ),
        mask_B=2,
        params={"doc": np.stack([np.repeat(np.arange(3), [40, 50, 38])] * 2).astype(np.int32)},
    ),
    Case(
        "recipe: window per head",
        lambda xp, p: (lambda b, h, q, k: (k <= q) & (q - k <= xp.where(h < 2, 16, 64)), None),
        Hq=4,
        Hkv=4,
        mask_H=4,
    ),
    Case(
        "recipe: ALiBi",
        lambda xp, p: (causal, lambda s, b, h, q, k: s - p["slopes"][h] * (q - k)),
        Hq=4,
        Hkv=4,
        params={"slopes": _slopes},
    ),
]


def flex_ns(xp):
    """The FlexAttention module of the framework ``xp`` belongs to."""
    return torch_flex if xp is torch else flex


def _inputs(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    ev = case.Ev or case.E
    q = rng.standard_normal((case.B, case.Hq, case.L, case.E)).astype(np.float32)
    k = rng.standard_normal((case.B, case.Hkv, case.S, case.E)).astype(np.float32)
    v = rng.standard_normal((case.B, case.Hkv, case.S, ev)).astype(np.float32)
    return q, k, v


def _torch_run(case: Case, q, k, v):
    params = {name: torch.from_numpy(x) for name, x in case.params.items()}
    mask_mod, score_mod = case.make(torch, params)
    block_mask = None
    if mask_mod is not None:
        block_mask = torch_flex.create_block_mask(
            mask_mod,
            case.mask_B,
            case.mask_H,
            case.L,
            case.S,
            device="cpu",
            BLOCK_SIZE=case.block_size,
        )
    out, lse = torch_flex.flex_attention(
        *(torch.from_numpy(x) for x in (q, k, v)),
        score_mod=score_mod,
        block_mask=block_mask,
        scale=case.scale,
        enable_gqa=case.Hq != case.Hkv,
        return_lse=True,
    )
    return out.numpy(), lse.numpy(), mask_mod, block_mask


def _jax_parts(case: Case, params: dict[str, Any]):
    mask_mod, score_mod = case.make(jnp, params)
    block_mask = None
    if mask_mod is not None:
        block_mask = flex.create_block_mask(
            mask_mod, case.mask_B, case.mask_H, case.L, case.S, BLOCK_SIZE=case.block_size
        )
    return block_mask, score_mod


def _record(case: Case, quantity: str, value: float) -> None:
    DIFFERENCES.setdefault(case.name, {})[quantity] = value


def _torch_dense_mask(case: Case, mask_mod) -> np.ndarray:
    """PyTorch's own ``create_mask`` of the case, broadcast to ``(B, Hq, L, S)``."""
    shape = (case.B, case.Hq, case.L, case.S)
    if mask_mod is None:
        return np.ones(shape, bool)
    dense = torch_flex.create_mask(mask_mod, case.mask_B, case.mask_H, case.L, case.S, "cpu")
    return np.broadcast_to(dense.numpy(), shape)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_forward_and_lse_match_pytorch(case: Case) -> None:
    q, k, v = _inputs(case, seed=len(case.name))
    out_t, lse_t, _, _ = _torch_run(case, q, k, v)
    params = {name: jnp.asarray(x) for name, x in case.params.items()}
    block_mask, score_mod = _jax_parts(case, params)
    out, lse = flex.flex_attention(
        q,
        k,
        v,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=case.scale,
        enable_gqa=case.Hq != case.Hkv,
        return_lse=True,
    )
    assert out.shape == out_t.shape and out.dtype == jnp.float32
    assert lse.shape == lse_t.shape
    out, lse = np.asarray(out), np.asarray(lse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_t), err_msg="empty rows")
    finite = np.isfinite(lse_t)
    _record(case, "out", float(np.abs(out - out_t).max()))
    _record(case, "lse", float(np.abs(lse[finite] - lse_t[finite]).max(initial=0.0)))
    np.testing.assert_allclose(out, out_t, atol=FORWARD_ATOL, rtol=1e-5, err_msg="out")
    np.testing.assert_allclose(lse[finite], lse_t[finite], atol=FORWARD_ATOL, rtol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_gradients_match_float64_reference(case: Case, ref) -> None:
    q, k, v = _inputs(case, seed=len(case.name) + 1)
    torch_params = {n: torch.from_numpy(x) for n, x in case.params.items()}
    visible = _torch_dense_mask(case, case.make(torch, torch_params)[0])
    # Floating arrays a score_mod closes over (ALiBi slopes) are differentiated too.
    learnable = {n: x for n, x in case.params.items() if np.issubdtype(x.dtype, np.floating)}
    constants = {n: jnp.asarray(x) for n, x in case.params.items() if n not in learnable}
    arrays = {
        "q": jnp.asarray(q.swapaxes(1, 2)),
        "k": jnp.asarray(k.swapaxes(1, 2)),
        "v": jnp.asarray(v.swapaxes(1, 2)),
        **{n: jnp.asarray(x) for n, x in learnable.items()},
    }
    block_mask, _ = _jax_parts(case, {**constants, **arrays})

    def make_mod(a):
        return case.make(jnp, {**constants, **{n: a[n] for n in learnable}})[1]

    def attend(a, score_mod):
        out, lse = flex.flex_attention(
            a["q"].swapaxes(1, 2),
            a["k"].swapaxes(1, 2),
            a["v"].swapaxes(1, 2),
            score_mod=score_mod,
            block_mask=block_mask,
            scale=case.scale,
            enable_gqa=case.Hq != case.Hkv,
            return_lse=True,
        )
        return out.swapaxes(1, 2), lse

    (_, _, _, grads), (_, _, _, grads64) = ref.against_reference(
        attend,
        arrays,
        visible,
        np.random.default_rng(7),
        scale=case.scale,
        make_mod=make_mod,
        jit=True,
    )
    worst = 0.0
    for name, got in grads.items():
        got = np.asarray(got)
        assert np.isfinite(got).all(), name
        worst = max(worst, float(np.abs(got - grads64[name]).max()))
        np.testing.assert_allclose(got, grads64[name], atol=GRAD_ATOL, rtol=1e-4, err_msg=name)
    _record(case, "grads", worst)


# ------------------------------------------------------------ block masks and helpers


MASKED = [c for c in CASES if c.make(np, c.params)[0] is not None]


@pytest.mark.parametrize("case", MASKED, ids=[c.name for c in MASKED])
def test_block_classes_match_pytorch(case: Case) -> None:
    """The same block pairs skipped, and the same ones full, per (batch, head).

    PyTorch pads a length that is not a multiple of the block size with invisible
    positions, so in the last query block (or key block) it calls partial what is full
    for every real position; we call that full. Anywhere else the classes are equal.
    """
    mask_mod_t = case.make(torch, {n: torch.from_numpy(x) for n, x in case.params.items()})[0]
    theirs = torch_flex.create_block_mask(
        mask_mod_t,
        case.mask_B,
        case.mask_H,
        case.L,
        case.S,
        device="cpu",
        BLOCK_SIZE=case.block_size,
    )
    ours, _ = _jax_parts(case, {n: jnp.asarray(x) for n, x in case.params.items()})
    assert tuple(ours.shape) == tuple(theirs.shape)
    assert tuple(ours.block_size) == tuple(theirs.BLOCK_SIZE)
    n_q, n_k = ours.num_blocks
    # 0 empty, 1 partial, 2 full. Ours keeps one list per batch row / head only where
    # the mask reads b / h; PyTorch keeps B / H whenever they are given.
    lead = tuple(theirs.kv_num_blocks.shape[:2])
    classes_o = np.broadcast_to(np.asarray(ours.block_classes()), (*lead, n_q, n_k))
    classes_t = np.zeros_like(classes_o)
    for count, indices, value in (
        ("kv_num_blocks", "kv_indices", 1),
        ("full_kv_num_blocks", "full_kv_indices", 2),
    ):
        counts, lists = getattr(theirs, count).numpy(), getattr(theirs, indices).numpy()
        for row in np.ndindex(counts.shape):
            classes_t[row][lists[row][: counts[row]]] = value
    np.testing.assert_array_equal(classes_o > 0, classes_t > 0, err_msg="skipped blocks")
    padded_q = case.L % ours.block_size[0] != 0
    padded_k = case.S % ours.block_size[1] != 0
    edge = np.zeros((n_q, n_k), bool)
    edge[-1, :] |= padded_q
    edge[:, -1] |= padded_k
    differ = classes_o != classes_t
    assert not (differ & ~edge).any(), "partial / full differ away from a padded edge"
    assert ((classes_o == 2) | ~differ).all(), "a block PyTorch calls full is partial here"
    if not (padded_q or padded_k):  # PyTorch counts padded blocks' area, we count blocks
        assert ours.sparsity() * 100 == pytest.approx(theirs.sparsity())


# ------------------------------------------------------------------ API-level parity


@pytest.mark.parametrize("case", MASKED, ids=[c.name for c in MASKED])
def test_create_mask_matches_pytorch(case: Case) -> None:
    mask_mod_t = case.make(torch, {n: torch.from_numpy(x) for n, x in case.params.items()})[0]
    mask_mod = case.make(jnp, {n: jnp.asarray(x) for n, x in case.params.items()})[0]
    theirs = torch_flex.create_mask(mask_mod_t, case.mask_B, case.mask_H, case.L, case.S, "cpu")
    ours = flex.create_mask(mask_mod, case.mask_B, case.mask_H, case.L, case.S)
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_create_mask_of_a_score_mod_matches_pytorch() -> None:
    def masking(xp):
        def score_mod(score, b, h, q_idx, kv_idx):
            return xp.where((q_idx + h) % 3 == kv_idx % 2, -float("inf"), score)

        return score_mod

    theirs = torch_flex.create_mask(masking(torch), 1, 2, 12, 10, "cpu")
    ours = flex.create_mask(masking(jnp), 1, 2, 12, 10)
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def _pair(shape_q, shape_kv, seed=0, ev=None):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(shape_q).astype(np.float32)
    k = rng.standard_normal(shape_kv).astype(np.float32)
    v = rng.standard_normal((*shape_kv[:3], ev or shape_kv[3])).astype(np.float32)
    return q, k, v


def test_array_scale_and_return_aux_match_pytorch() -> None:
    """``scale`` as a 0-d array (a tensor for PyTorch, a jax array here); the lse
    through ``return_aux=AuxRequest(lse=True)``."""
    q, k, v = _pair((1, 2, 40, 16), (1, 2, 56, 16))
    scale = np.float32(1 / np.sqrt(7.0))
    out_t, aux_t = torch_flex.flex_attention(
        *(torch.from_numpy(x) for x in (q, k, v)),
        scale=torch.tensor(scale),
        return_aux=torch_flex.AuxRequest(lse=True),
    )
    out, aux = flex.flex_attention(
        q, k, v, scale=1 / jnp.sqrt(7.0), return_aux=flex.AuxRequest(lse=True)
    )
    np.testing.assert_allclose(out, out_t.numpy(), atol=FORWARD_ATOL, rtol=1e-5)
    np.testing.assert_allclose(aux.lse, aux_t.lse.numpy(), atol=FORWARD_ATOL, rtol=1e-6)


def test_key_value_batch_of_one_matches_pytorch() -> None:
    """PyTorch lets keys and values of batch 1 serve a block mask of the queries' batch."""
    q, k, v = _pair((2, 2, 48, 16), (1, 2, 48, 16))
    doc = np.stack([np.repeat([0, 1], [20, 28]), np.repeat([0, 1], [30, 18])]).astype(np.int32)

    def make(xp_doc):
        return lambda b, h, q_idx, kv_idx: xp_doc[b, q_idx] == xp_doc[b, kv_idx]

    bm_t = torch_flex.create_block_mask(
        make(torch.from_numpy(doc)), 2, None, 48, 48, device="cpu", BLOCK_SIZE=16
    )
    out_t = torch_flex.flex_attention(*(torch.from_numpy(x) for x in (q, k, v)), block_mask=bm_t)
    bm = flex.create_block_mask(make(jnp.asarray(doc)), 2, None, 48, 48, BLOCK_SIZE=16)
    out = flex.flex_attention(q, k, v, block_mask=bm)
    np.testing.assert_allclose(out, out_t.numpy(), atol=FORWARD_ATOL, rtol=1e-5)


def test_kernel_options_are_accepted_like_pytorch() -> None:
    q, k, v = _pair((1, 4, 64, 16), (1, 2, 64, 16))
    options = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "PRESCALE_QK": False}
    bm_t = torch_flex.create_block_mask(causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=32)
    out_t = torch_flex.flex_attention(
        *(torch.from_numpy(x) for x in (q, k, v)),
        block_mask=bm_t,
        enable_gqa=True,
        kernel_options=options,
    )
    bm = flex.create_block_mask(causal, None, None, 64, 64, BLOCK_SIZE=32)
    out = flex.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=options)
    np.testing.assert_allclose(out, out_t.numpy(), atol=FORWARD_ATOL, rtol=1e-5)


def test_both_refuse_different_head_counts_without_enable_gqa() -> None:
    q, k, v = _pair((1, 4, 16, 8), (1, 2, 16, 8))
    with pytest.raises(ValueError, match="enable_gqa"):
        torch_flex.flex_attention(*(torch.from_numpy(x) for x in (q, k, v)))
    with pytest.raises(ValueError, match="enable_gqa"):
        flex.flex_attention(q, k, v)
    q3 = q[:, :3]
    with pytest.raises(ValueError, match="multiple"):
        torch_flex.flex_attention(*(torch.from_numpy(x) for x in (q3, k, v)), enable_gqa=True)
    with pytest.raises(ValueError, match="multiple"):
        flex.flex_attention(q3, k, v, enable_gqa=True)


def test_both_refuse_a_block_mask_for_other_lengths() -> None:
    q, k, v = _pair((1, 2, 32, 8), (1, 2, 32, 8))
    bm_t = torch_flex.create_block_mask(causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(ValueError):
        torch_flex.flex_attention(*(torch.from_numpy(x) for x in (q, k, v)), block_mask=bm_t)
    bm = flex.create_block_mask(causal, None, None, 64, 64, BLOCK_SIZE=16)
    with pytest.raises(ValueError, match="does not fit"):
        flex.flex_attention(q, k, v, block_mask=bm)


def test_bfloat16_inputs_match_pytorch_to_bfloat16_precision() -> None:
    q, k, v = (x.astype(np.float32) for x in _pair((1, 2, 64, 16), (1, 2, 64, 16), seed=3))
    tq, tk, tv = (torch.from_numpy(x).to(torch.bfloat16) for x in (q, k, v))
    bm_t = torch_flex.create_block_mask(causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=32)
    out_t, lse_t = torch_flex.flex_attention(tq, tk, tv, block_mask=bm_t, return_lse=True)
    jq, jk, jv = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    bm = flex.create_block_mask(causal, None, None, 64, 64, BLOCK_SIZE=32)
    out, lse = flex.flex_attention(jq, jk, jv, block_mask=bm, return_lse=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32), out_t.float().numpy(), atol=2e-2, rtol=2e-2
    )
    np.testing.assert_allclose(np.asarray(lse), lse_t.float().numpy(), atol=2e-2, rtol=1e-2)
