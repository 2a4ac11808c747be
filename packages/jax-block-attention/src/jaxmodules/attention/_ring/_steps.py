"""The ring itself, run inside ``shard_map`` on one device's chunks: forward and backward
steps under one custom VJP.

Each device holds two query chunks and, at each of the ``n`` steps, two visiting key /
value chunks: four half-chunk pairs, each one ``masked_attention_via_map`` call with the
relative position offset (skipped with ``lax.cond`` where the causal / window band
leaves it empty), merged through their log-sum-exp. The backward pass sends the chunks
round again with their gradient accumulators and differentiates each pair against the
merged output and log-sum-exp, so per-device memory stays O(L / n) in both passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._api import masked_attention_via_map
from .._band import band_limits
from .._scores import merge_by_lse
from ._layout import chunk_pair, pair_visible

Array = jax.Array
Partial = tuple[Array, Array]  # (out (B, c, H, dv) f32, lse (B, H, c))


@dataclass(frozen=True)
class RingSpec:
    """Everything about one ``ring_attention`` call that is fixed at trace time.

    ``mask_fn`` and ``score_mod`` take global indices. When ``score_mod`` closes over
    traced arrays, ``mod_program`` evaluates it on those arrays, which then enter the
    ring as inputs (``differentiable`` lists the floating ones, whose gradients the
    backward pass computes); otherwise ``mod_program`` is None and ``score_mod`` is
    called as it is.
    """

    n: int
    seq_axis: str
    batch_axis: Any
    head_axis: Any
    order: str
    q_chunk: int
    k_chunk: int
    is_causal: bool
    window: tuple[int | None, int | None]
    mask_fn: Callable[..., Any] | None
    mask_arity: int | None
    q_offset: int
    scale: float | None
    block_size: Any
    logits_soft_cap: float | None
    score_mod: Callable[..., Any] | None
    mod_program: Any
    differentiable: tuple[int, ...]
    implementation: str | None

    @property
    def band(self) -> tuple[int | None, int | None]:
        return band_limits(self.is_causal, self.window)


class _Here(NamedTuple):
    """This device's place, made afresh in each traced function (the backward pass is
    traced apart from the forward)."""

    device: Any
    b0: Any  # global index of the local batch row 0
    h0: Any  # global index of the local head 0
    q_chunks: tuple[Any, Any]
    seg: Any  # the local query segment ids, or None


def _axis_index(axes: Any) -> Any:
    """Linear index of this device along one mesh axis name or a tuple of them."""
    if axes is None:
        return 0
    if isinstance(axes, str):
        return lax.axis_index(axes)
    index = 0
    for name in axes:
        index = index * lax.psum(1, name) + lax.axis_index(name)
    return index


def _here(spec: RingSpec, q: Array, seg: Any) -> _Here:
    device = lax.axis_index(spec.seq_axis)
    b0 = _axis_index(spec.batch_axis) * q.shape[0]
    h0 = _axis_index(spec.head_axis) * q.shape[2]
    return _Here(device, b0, h0, chunk_pair(device, spec.n, spec.order), seg)


def _half(x: Any, i: int, size: int) -> Any:
    return None if x is None else x[:, i * size : (i + 1) * size]


def _shift(spec: RingSpec, tree: Any) -> Any:
    """One hop round the ring: device ``d`` sends to ``d + 1``."""
    perm = [(i, (i + 1) % spec.n) for i in range(spec.n)]
    return jax.tree_util.tree_map(lambda x: lax.ppermute(x, spec.seq_axis, perm), tree)


def _with_floats(spec: RingSpec, arrays: Sequence[Any], floats: Sequence[Any]) -> list[Any]:
    full = list(arrays)
    for i, x in zip(spec.differentiable, floats, strict=True):
        full[i] = x
    return full


def _offset(spec: RingSpec, here: _Here, qi: int, kc: Any) -> Any:
    """Global position of query half ``qi``'s row 0 minus that of key chunk ``kc``'s."""
    return here.q_chunks[qi] * spec.q_chunk + spec.q_offset - kc * spec.k_chunk


def _pair_mask(
    spec: RingSpec, here: _Here, qi: int, k_start: Any, offset: Any, seg_k: Any
) -> Callable[..., Any] | None:
    """The pair's mask on local indices: the user's ``mask_fn`` on global ones, and
    equal segment ids."""
    seg_q = _half(here.seg, qi, spec.q_chunk)
    if spec.mask_fn is None and seg_k is None:
        return None
    mask_fn, arity = spec.mask_fn, spec.mask_arity

    def mask(b: Any, h: Any, qp: Any, kp: Any) -> Any:
        visible = jnp.bool_(True)
        if mask_fn is not None:
            # The call's q_offset makes qp the query's position relative to the chunk.
            gq, gk = qp + k_start, kp + k_start
            if arity == 4:
                visible = mask_fn(b + here.b0, h + here.h0, gq, gk)
            else:
                visible = mask_fn(h + here.h0, gq, gk)
        if seg_k is not None and seg_q is not None:
            visible = visible & (seg_q[b, qp - offset] == seg_k[b, kp])
        return visible

    return mask


def _pair_mod(
    spec: RingSpec, here: _Here, k_start: Any, arrays: Sequence[Any]
) -> Callable[..., Any] | None:
    """The pair's ``score_mod`` on local indices (reading its traced arrays from
    ``arrays``)."""
    program, user = spec.mod_program, spec.score_mod
    if user is None:
        return None

    def mod(sc: Any, b: Any, h: Any, qp: Any, kp: Any) -> Any:
        b, h, qp, kp = b + here.b0, h + here.h0, qp + k_start, kp + k_start
        if program is None:
            return user(sc, b, h, qp, kp)
        return program.evaluate(arrays, sc, b, h, qp, kp)

    return mod


def _pair_call(
    spec: RingSpec,
    here: _Here,
    qi: int,
    kc: Any,
    q_half: Array,
    k_half: Array,
    v_half: Array,
    seg_k: Any,
    arrays: Sequence[Any],
) -> Partial:
    """Local query half ``qi`` against one visiting key half (chunk ``kc``)."""
    k_start = kc * spec.k_chunk
    offset = _offset(spec, here, qi, kc).astype(jnp.int32)
    o, lse = masked_attention_via_map(
        q_half,
        k_half,
        v_half,
        is_causal=spec.is_causal,
        window_size=spec.window,
        mask_fn=_pair_mask(spec, here, qi, k_start, offset, seg_k),
        q_offset=jnp.full((q_half.shape[0],), offset, jnp.int32),
        scale=spec.scale,
        block_size=spec.block_size,
        logits_soft_cap=spec.logits_soft_cap,
        score_mod=_pair_mod(spec, here, k_start, arrays),
        return_lse=True,
        implementation=spec.implementation,
    )
    return o.astype(jnp.float32), lse


def _visible(spec: RingSpec, here: _Here, qi: int, kc: Any) -> Any:
    q_first = here.q_chunks[qi] * spec.q_chunk + spec.q_offset
    return pair_visible(q_first, spec.q_chunk, kc * spec.k_chunk, spec.k_chunk, spec.band)


def _merge(acc: Partial | None, part: Partial) -> Partial:
    if acc is None:
        return part
    outs = jnp.stack([acc[0], part[0]])
    lses = jnp.swapaxes(jnp.stack([acc[1], part[1]]), 2, 3)  # (2, B, c, H), as outs
    out, lse = merge_by_lse(outs, lses)
    return out, jnp.swapaxes(lse, 1, 2)


def _empty_pair(q_half: Array, v_half: Array) -> Partial:
    b, c, h = q_half.shape[:3]
    return jnp.zeros((b, c, h, v_half.shape[-1]), jnp.float32), jnp.full(
        (b, h, c), -jnp.inf, jnp.float32
    )


def _forward_step(
    spec: RingSpec,
    here: _Here,
    q: Array,
    accs: tuple[Partial | None, Partial | None],
    kv: tuple[Array, Array, Any],
    source: Any,
    arrays: Sequence[Any],
) -> tuple[Partial, Partial]:
    """Both query halves against the two key halves of chunk pair ``source``, merged
    into ``accs``."""
    k, v, seg = kv
    k_chunks = chunk_pair(source, spec.n, spec.order)
    new = []
    for qi in range(2):
        acc: Any = accs[qi]  # None before the first step; a Partial after any merge
        for ki, kc in enumerate(k_chunks):
            q_half, k_half, v_half = (
                _half(q, qi, spec.q_chunk),
                _half(k, ki, spec.k_chunk),
                _half(v, ki, spec.k_chunk),
            )
            seg_k = _half(seg, ki, spec.k_chunk)
            call = partial(_pair_call, spec, here, qi, kc, q_half, k_half, v_half, seg_k, arrays)
            pred = _visible(spec, here, qi, kc)
            if pred is True:
                part = call()
            else:
                part = lax.cond(pred, call, partial(_empty_pair, q_half, v_half))
            acc = _merge(acc, part)
        new.append(acc)
    return new[0], new[1]


def _ring_forward(
    spec: RingSpec, q: Array, k: Array, v: Array, seg: Any, arrays: Sequence[Any]
) -> Partial:
    here = _here(spec, q, seg)
    accs = _forward_step(spec, here, q, (None, None), (k, v, seg), here.device, arrays)

    def body(carry: Any, step: Any) -> Any:
        accs, kv = carry
        kv = _shift(spec, kv)
        source = (here.device - step) % spec.n
        return (_forward_step(spec, here, q, accs, kv, source, arrays), kv), None

    if spec.n > 1:
        (accs, _), _ = lax.scan(body, (accs, (k, v, seg)), jnp.arange(1, spec.n))
    out = jnp.concatenate([accs[0][0], accs[1][0]], axis=1)
    lse = jnp.concatenate([accs[0][1], accs[1][1]], axis=2)
    return out, lse


class _Merged(NamedTuple):
    """One query half's merged output and lse and their cotangents (float32)."""

    out: Array
    lse: Array
    d_out: Array
    d_lse: Array


def _pair_grads(
    spec: RingSpec,
    here: _Here,
    qi: int,
    kc: Any,
    halves: tuple[Array, Array, Array, Any],
    merged: _Merged,
    arrays: Sequence[Any],
) -> tuple[Array, ...]:
    """dQ, dK, dV of one pair and its share of the floating ``arrays``' gradients.

    The pair's part enters the merged result weighted by ``w = exp(lse_pair - lse)``,
    so its output receives ``w * d_out`` and its lse ``w * (d_lse + <d_out, o_pair -
    out>)``."""
    q_half, k_half, v_half, seg_k = halves
    floats = [arrays[i] for i in spec.differentiable]

    def pair(a: Array, b: Array, c: Array, fs: Sequence[Array]) -> Partial:
        return _pair_call(spec, here, qi, kc, a, b, c, seg_k, _with_floats(spec, arrays, fs))

    (o_p, l_p), pullback = jax.vjp(pair, q_half, k_half, v_half, floats)
    finite = jnp.isfinite(l_p) & jnp.isfinite(merged.lse)
    w = jnp.where(finite, jnp.exp(jnp.where(finite, l_p - merged.lse, 0.0)), 0.0)
    d_o = (jnp.swapaxes(w, 1, 2)[..., None] * merged.d_out).astype(o_p.dtype)
    dot = jnp.swapaxes(jnp.sum(merged.d_out * (o_p - merged.out), axis=-1), 1, 2)
    dq, dk, dv, d_floats = pullback((d_o, w * (merged.d_lse + dot)))
    return tuple(x.astype(jnp.float32) for x in (dq, dk, dv, *d_floats))


def _no_grads(spec: RingSpec, halves: tuple[Array, ...], arrays: Sequence[Any]) -> tuple:
    shapes = [x.shape for x in halves[:3]]
    shapes += [jnp.shape(arrays[i]) for i in spec.differentiable]
    return tuple(jnp.zeros(shape, jnp.float32) for shape in shapes)


def _backward_step(
    spec: RingSpec,
    here: _Here,
    q: Array,
    merged: _Merged,
    kv: tuple[Array, Array, Any],
    source: Any,
    arrays: Sequence[Any],
) -> tuple[Array, Array, Array, list[Array]]:
    """Gradients of one step's four pairs: dQ, dK, dV of the visiting chunks and the
    step's share of the floating ``arrays``' gradients."""
    k, v, seg = kv
    cq, ck = spec.q_chunk, spec.k_chunk
    d_floats = [jnp.zeros(jnp.shape(arrays[i]), jnp.float32) for i in spec.differentiable]
    dq = []
    dk = [jnp.zeros((k.shape[0], ck, *k.shape[2:]), jnp.float32)] * 2
    dv = [jnp.zeros((v.shape[0], ck, *v.shape[2:]), jnp.float32)] * 2
    for qi in range(2):
        rows = slice(qi * cq, (qi + 1) * cq)
        m = _Merged(
            merged.out[:, rows],
            merged.lse[:, :, rows],
            merged.d_out[:, rows],
            merged.d_lse[:, :, rows],
        )
        dq_i = jnp.zeros((q.shape[0], cq, *q.shape[2:]), jnp.float32)
        for ki, kc in enumerate(chunk_pair(source, spec.n, spec.order)):
            halves = (_half(q, qi, cq), _half(k, ki, ck), _half(v, ki, ck), _half(seg, ki, ck))
            grads = partial(_pair_grads, spec, here, qi, kc, halves, m, arrays)
            pred = _visible(spec, here, qi, kc)
            if pred is True:
                g = grads()
            else:
                g = lax.cond(pred, grads, partial(_no_grads, spec, halves, arrays))
            dq_i = dq_i + g[0]
            dk[ki] = dk[ki] + g[1]
            dv[ki] = dv[ki] + g[2]
            d_floats = [acc + new for acc, new in zip(d_floats, g[3:], strict=True)]
        dq.append(dq_i)
    return (
        jnp.concatenate(dq, axis=1),
        jnp.concatenate(dk, axis=1),
        jnp.concatenate(dv, axis=1),
        d_floats,
    )


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def ring(spec: RingSpec, q: Array, k: Array, v: Array, seg: Any, arrays: tuple) -> Partial:
    """This device's output ``(B, Lq / n, H, dv)`` float32 and lse ``(B, H, Lq / n)``
    over the whole ring, inside ``shard_map``; ``seg`` are the local segment ids (or
    None) and ``arrays`` the traced arrays of ``score_mod``."""
    return _ring_forward(spec, q, k, v, seg, arrays)


def _ring_fwd(spec: RingSpec, q: Array, k: Array, v: Array, seg: Any, arrays: tuple) -> Any:
    out, lse = _ring_forward(spec, q, k, v, seg, arrays)
    return (out, lse), (q, k, v, seg, arrays, out, lse)


def _ring_bwd(spec: RingSpec, res: Any, cts: Any) -> Any:
    q, k, v, seg, arrays, out, lse = res
    d_out, d_lse = cts
    merged = _Merged(out, lse, d_out.astype(jnp.float32), d_lse.astype(jnp.float32))
    here = _here(spec, q, seg)
    dq, dk, dv, d_floats = _backward_step(spec, here, q, merged, (k, v, seg), here.device, arrays)

    def body(carry: Any, step: Any) -> Any:
        dq, kv, dk, dv, d_floats = carry
        kv, dk, dv = _shift(spec, (kv, dk, dv))
        source = (here.device - step) % spec.n
        g = _backward_step(spec, here, q, merged, kv, source, arrays)
        d_floats = [acc + new for acc, new in zip(d_floats, g[3], strict=True)]
        return (dq + g[0], kv, dk + g[1], dv + g[2], d_floats), None

    if spec.n > 1:
        carry = (dq, (k, v, seg), dk, dv, d_floats)
        (dq, _, dk, dv, d_floats), _ = lax.scan(body, carry, jnp.arange(1, spec.n))
        dk, dv = _shift(spec, (dk, dv))  # home: the chunk came from the previous device
    d_seg = None if seg is None else np.zeros(seg.shape, jax.dtypes.float0)
    # This device's share of the arrays' gradients; shard_map's transpose sums the
    # shares of a replicated input over the mesh.
    d_arrays: list[Any] = [np.zeros(jnp.shape(x), jax.dtypes.float0) for x in arrays]
    for i, g in zip(spec.differentiable, d_floats, strict=True):
        d_arrays[i] = g.astype(jnp.result_type(arrays[i]))
    grads = (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype))
    return (*grads, d_seg, tuple(d_arrays))


ring.defvjp(_ring_fwd, _ring_bwd)
