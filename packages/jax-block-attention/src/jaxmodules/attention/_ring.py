"""Ring attention: context parallelism over one mesh axis with ``shard_map`` and ``ppermute``.

Each device keeps its queries; key/value chunks travel round the ring of devices along
``seq_axis`` by collective permutes, one hop per step, and every step runs
[`masked_attention_via_map`][jaxmodules.attention.masked_attention_via_map] on the local
queries against the visiting chunk with ``return_lse=True``. The partial results are merged
through their log-sum-exp. Gradients come from differentiating that program: the
transpose of a collective permute is the reverse permute, so the key/value gradients travel
back round the ring the same way.

Causal balance uses the zigzag layout: the sequence is cut into ``2 n`` equal chunks and
device ``i`` holds chunks ``i`` and ``2 n - 1 - i``, so every device owns as many early
(cheap) as late (expensive) query rows. [`to_zigzag`][jaxmodules.attention.to_zigzag] and
[`from_zigzag`][jaxmodules.attention.from_zigzag] move a sequence into that order and back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from ._api import masked_attention_via_map
from ._elementwise import _arity

Array = jax.Array

_LAYOUTS = ("zigzag", "contiguous")
_UNSUPPORTED = ("block_mask", "bias", "mask", "query_seq_lengths", "key_value_seq_lengths")


def _shard_map(f: Callable[..., Any], mesh: Any, in_specs: Any, out_specs: Any) -> Any:
    """``jax.shard_map`` where it exists, else ``jax.experimental.shard_map.shard_map``."""
    if hasattr(jax, "shard_map"):
        # check_vma=False: the per-step attention's loops start from unvarying zeros.
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # jax < 0.6

    return shard_map(f, mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _reshard_explicit(mesh: Any, args: tuple[Any, ...], specs: tuple[Any, ...]) -> Any:
    """On a mesh with ``Explicit`` axes ``shard_map`` takes inputs already sharded as its
    ``in_specs`` say: reshard them there (a local slice for replicated inputs). ``Auto``
    axes (and older jax) leave it to ``shard_map``."""
    axis_type = getattr(jax.sharding, "AxisType", None)
    types = getattr(mesh, "axis_types", None)
    if axis_type is None or not types or axis_type.Explicit not in tuple(types):
        return args
    return tuple(
        None if x is None else jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, spec))
        for x, spec in zip(args, specs, strict=True)
    )


def zigzag_order(length: int, num_devices: int) -> np.ndarray:
    """Indices that put a sequence of ``length`` positions into the zigzag layout.

    The sequence is cut into ``2 * num_devices`` equal chunks; device ``i`` gets chunks
    ``i`` and ``2 * num_devices - 1 - i``, in that order. ``x[..., zigzag_order(L, n), ...]``
    (along the sequence axis) is the zigzag form of ``x``.

    Args:
        length: Sequence length, a multiple of ``2 * num_devices``.
        num_devices: Devices along the sequence mesh axis.

    Returns:
        An int array of shape ``(length,)``, a permutation of ``range(length)``.

    Raises:
        ValueError: ``length`` not a positive multiple of ``2 * num_devices``.

    Examples:
        >>> from jaxmodules.attention import zigzag_order
        >>> zigzag_order(8, 2).tolist()
        [0, 1, 6, 7, 2, 3, 4, 5]
    """
    num_devices = int(num_devices)
    if num_devices < 1:
        raise ValueError(f"num_devices must be positive, got {num_devices}")
    if length <= 0 or length % (2 * num_devices):
        raise ValueError(
            f"length must be a positive multiple of 2 * num_devices = {2 * num_devices}, "
            f"got {length}"
        )
    chunk = length // (2 * num_devices)
    chunks = [c for i in range(num_devices) for c in (i, 2 * num_devices - 1 - i)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks])


def to_zigzag(x: Any, num_devices: int, axis: int = 1) -> Array:
    """Reorder ``x`` along ``axis`` (the sequence) into the zigzag layout.

    On an array already sharded along the sequence this is a gather across devices (one
    pass over the array); do it once per batch, e.g. in the input pipeline, not per layer.
    On a mesh with ``Explicit`` axes jax asks for the output sharding of that gather, so
    reorder before sharding the sequence (on the host or on unsharded arrays).
    On a mesh with ``Explicit`` axes jax asks for the output sharding of that gather, so
    reorder before sharding the sequence (on the host or on unsharded arrays).

    Args:
        x: Array whose ``axis`` is the sequence, length a multiple of ``2 * num_devices``.
        num_devices: Devices along the sequence mesh axis.
        axis: The sequence axis (1 for ``(B, L, H, d)``).

    Returns:
        ``x`` with the sequence in zigzag order.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxmodules.attention import from_zigzag, to_zigzag
        >>> x = jnp.arange(8)
        >>> to_zigzag(x, 2, axis=0).tolist()
        [0, 1, 6, 7, 2, 3, 4, 5]
        >>> from_zigzag(to_zigzag(x, 2, axis=0), 2, axis=0).tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    x = jnp.asarray(x)
    return jnp.take(x, jnp.asarray(zigzag_order(x.shape[axis], num_devices)), axis=axis)


def from_zigzag(x: Any, num_devices: int, axis: int = 1) -> Array:
    """Undo [`to_zigzag`][jaxmodules.attention.to_zigzag]: back to sequence order.

    Args:
        x: Array in zigzag order along ``axis``.
        num_devices: Devices along the sequence mesh axis.
        axis: The sequence axis (1 for ``(B, L, H, d)``, 2 for an lse ``(B, H, L)``).

    Returns:
        ``x`` with the sequence in natural order.
    """
    x = jnp.asarray(x)
    inverse = np.argsort(zigzag_order(x.shape[axis], num_devices))
    return jnp.take(x, jnp.asarray(inverse), axis=axis)


def _chunks(device: Any, n: int, layout: str) -> tuple[Any, Any]:
    """The two chunk indices (out of ``2 n``) that ``device`` holds."""
    if layout == "zigzag":
        return device, 2 * n - 1 - device
    return 2 * device, 2 * device + 1


def _window(window_size: Any) -> tuple[int | None, int | None] | None:
    if window_size is None:
        return None
    if isinstance(window_size, (tuple, list)):
        left, right = window_size
        return left, right
    return int(window_size), int(window_size)


def _maybe_visible(
    q_start: Any, q_len: int, k_start: Any, k_len: int, is_causal: bool, window: Any
) -> Any:
    """Whether any key of ``[k_start, k_start + k_len)`` can be visible from any query of
    ``[q_start, q_start + q_len)`` under the causal / window constraints (``True`` if none)."""
    conditions = []
    q_end, k_end = q_start + q_len - 1, k_start + k_len - 1
    if is_causal:
        conditions.append(k_start <= q_end)
    if window is not None:
        left, right = window
        if left is not None:
            conditions.append(k_end >= q_start - left)
        if right is not None:
            conditions.append(k_start <= q_end + right)
    if not conditions:
        return True
    result = conditions[0]
    for condition in conditions[1:]:
        result = result & condition
    return result


def ring_block_counts(
    num_devices: int,
    *,
    is_causal: bool = True,
    window_size: Any = None,
    layout: str = "zigzag",
    seq_len: int | None = None,
) -> list[int]:
    """Half-chunk pairs each device computes over the whole ring (the rest are skipped).

    Every device holds two half-chunks of queries and, at each of the ``n`` steps, sees two
    half-chunks of keys: ``4 n`` pairs in all. This counts the pairs a device does not skip,
    the measure of its work; ``layout="contiguous"`` shows the imbalance without zigzag.

    Args:
        num_devices: Devices along the sequence axis.
        is_causal: Count with a causal mask.
        window_size: As in ``masked_attention_via_map`` (needs ``seq_len``).
        layout: ``"zigzag"`` or ``"contiguous"``.
        seq_len: Sequence length (needed only with ``window_size``); defaults to
            ``2 * num_devices`` (one position per half-chunk).

    Returns:
        One count per device.

    Examples:
        >>> from jaxmodules.attention import ring_block_counts
        >>> ring_block_counts(4, layout="zigzag")
        [9, 9, 9, 9]
        >>> ring_block_counts(4, layout="contiguous")
        [3, 7, 11, 15]
    """
    n = int(num_devices)
    length = 2 * n if seq_len is None else int(seq_len)
    chunk = length // (2 * n)
    window = _window(window_size)
    counts = []
    for device in range(n):
        count = 0
        for step in range(n):
            source = (device - step) % n
            for qc in _chunks(device, n, layout):
                for kc in _chunks(source, n, layout):
                    count += bool(
                        _maybe_visible(qc * chunk, chunk, kc * chunk, chunk, is_causal, window)
                    )
        counts.append(count)
    return counts


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


def _merge(acc: tuple[Array, Array], part: tuple[Array, Array]) -> tuple[Array, Array]:
    """Merge two partial softmax results ``(out (B, L, H, dv) f32, lse (B, H, L))``."""
    o1, l1 = acc
    o2, l2 = part
    m = lax.stop_gradient(jnp.maximum(l1, l2))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w1, w2 = jnp.exp(l1 - m), jnp.exp(l2 - m)
    total = w1 + w2
    safe = jnp.where(total > 0, total, 1.0)
    lse = jnp.where(total > 0, m + jnp.log(safe), -jnp.inf)
    a1 = jnp.swapaxes(w1 / safe, 1, 2)[..., None]
    a2 = jnp.swapaxes(w2 / safe, 1, 2)[..., None]
    return a1 * o1 + a2 * o2, lse


def ring_attention(
    Q: Any,
    K: Any,
    V: Any,
    *,
    mesh: Any,
    seq_axis: str,
    batch_axis: str | Sequence[str] | None = None,
    head_axis: str | Sequence[str] | None = None,
    layout: str = "zigzag",
    segment_ids: Any = None,
    is_causal: bool = False,
    window_size: int | tuple[int | None, int | None] | None = None,
    mask_fn: Callable[..., Any] | None = None,
    q_offset: int = 0,
    scale: float | None = None,
    block_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    score_mod: Callable[..., Any] | None = None,
    sinks: Any = None,
    return_lse: bool = False,
    **unsupported: Any,
) -> Any:
    """Attention over a sequence sharded along a mesh axis (context parallelism).

    Equal, to rounding, to ``masked_attention_via_map`` on the whole arrays in natural
    order, forward and gradients. ``Q``, ``K``, ``V`` are split along the sequence over
    ``seq_axis`` (and may be split over batch and heads along ``batch_axis`` /
    ``head_axis``). Each device keeps its queries; key/value chunks (and key segment ids)
    travel round the ring by collective permutes, never all-gathered, so per-device memory
    for the forward pass is O(L / n). Each step calls ``masked_attention_via_map`` on the
    local queries against the visiting chunk with the relative position offset, so its
    causal/window block skipping applies, and a query/key half-chunk pair that the causal
    or window constraint leaves wholly masked is skipped with ``lax.cond``. In the
    backward pass the key/value gradients travel back round the ring (the transpose of a
    permute); the per-step attention keeps its linear-memory custom VJP, and the
    visiting key/value chunks of all steps are saved as residuals (O(L) per device for the
    keys and values, no ``L x L`` array).

    **Layout.** With ``layout="zigzag"`` (the default) the sequence must be in zigzag order
    (see [`to_zigzag`][jaxmodules.attention.to_zigzag]): cut into ``2 n`` chunks, device
    ``i`` holds chunks ``i`` and ``2 n - 1 - i``. Under a causal mask every device then
    does the same number of half-chunk pairs (``2 n + 1`` of the ``4 n``; see
    [`ring_block_counts`][jaxmodules.attention.ring_block_counts]); with
    ``layout="contiguous"`` (natural order, device ``i`` holds the ``i``-th ``L / n``
    positions) the last device does about twice the average. The outputs (and ``lse``)
    come back in the same layout as the inputs.

    Args:
        Q: Queries ``(B, Lq, Hq, d)``, ``Lq`` a multiple of ``2 n`` (``n`` = size of
            ``seq_axis``).
        K: Keys ``(B, Lk, Hkv, d)``, ``Lk`` a multiple of ``2 n``.
        V: Values ``(B, Lk, Hkv, dv)``.
        mesh: A ``jax.sharding.Mesh`` (from ``jax.make_mesh``, any axis types).
        seq_axis: Mesh axis name the sequence is split over.
        batch_axis: Mesh axis (or tuple of axes) the batch is split over, if any.
        head_axis: Mesh axis (or tuple of axes) the heads are split over, if any; both
            ``Hq`` and ``Hkv`` must divide by its size.
        layout: ``"zigzag"`` or ``"contiguous"``: the order of the sequence in the inputs.
        segment_ids: Optional int array ``(B, L)`` (``Lq == Lk``) in the same layout:
            query ``q`` sees key ``k`` only where their ids are equal (packed documents).
            The key ids travel round the ring with the keys.
        is_causal: As in ``masked_attention_via_map`` (global positions).
        window_size: As in ``masked_attention_via_map`` (global positions).
        mask_fn: ``mask_fn(b, h, q, k)`` or ``mask_fn(h, q, k)`` on global batch row, query
            head and global positions. Arrays it closes over are replicated on every device;
            per-token data (document ids) belongs in ``segment_ids``, which is sharded.
        q_offset: Position of query row 0, a Python int (arrays are not supported here).
        scale: As in ``masked_attention_via_map``.
        block_size: Block size of each per-step call (positions per block within a
            half-chunk of ``L / (2 n)`` positions).
        logits_soft_cap: As in ``masked_attention_via_map``.
        score_mod: ``score_mod(score, b, h, q, k)`` on global indices, as in
            ``masked_attention_via_map``.
        sinks: Float array ``(Hq,)`` of per-head sink logits, joined once to each row's
            softmax (after the ring).
        return_lse: Also return the log-sum-exp ``(B, Hq, Lq)`` float32 in the same
            layout.
        **unsupported: ``block_mask``, ``bias``, ``mask``, ``query_seq_lengths`` and
            ``key_value_seq_lengths`` are global ``Lq x Lk`` descriptions that a ring step
            does not see; pass them as ``mask_fn`` / ``segment_ids`` instead.

    Returns:
        The output ``(B, Lq, Hq, dv)`` in ``Q``'s dtype and layout, sharded like ``Q``;
        with ``return_lse=True`` the pair ``(out, lse)``.

    Raises:
        ValueError: Unknown layout, ``seq_axis`` not in the mesh, lengths not divisible by
            ``2 n``, non-4-D inputs, an unsupported keyword.
        TypeError: A non-integer ``q_offset``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxmodules.attention import masked_attention_via_map, ring_attention
        >>> mesh = jax.make_mesh((1,), ("seq",))
        >>> kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
        >>> Q = jax.random.normal(kq, (1, 32, 4, 16))
        >>> K = jax.random.normal(kk, (1, 32, 2, 16))
        >>> V = jax.random.normal(kv, (1, 32, 2, 16))
        >>> out = ring_attention(Q, K, V, mesh=mesh, seq_axis="seq", is_causal=True)
        >>> ref = masked_attention_via_map(Q, K, V, is_causal=True)
        >>> bool(jnp.allclose(out, ref, atol=1e-5))
        True
    """
    if unsupported:
        name = sorted(unsupported)[0]
        if name in _UNSUPPORTED:
            raise ValueError(
                f"ring_attention does not take {name}=: a ring step sees only one chunk of "
                "queries and keys; express the mask as mask_fn (global positions) or "
                "segment_ids"
            )
        raise TypeError(f"ring_attention got an unexpected keyword argument {name!r}")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if seq_axis not in mesh.axis_names:
        raise ValueError(f"seq_axis {seq_axis!r} is not an axis of the mesh {mesh.axis_names}")
    if isinstance(q_offset, (bool, np.bool_)) or not isinstance(q_offset, (int, np.integer)):
        raise TypeError(
            f"ring_attention takes q_offset as a Python int, got {type(q_offset).__name__}"
        )
    Q, K, V = jnp.asarray(Q), jnp.asarray(K), jnp.asarray(V)
    for name, x in (("Q", Q), ("K", K), ("V", V)):
        if x.ndim != 4:
            raise ValueError(f"ring_attention needs 4-D {name} (B, L, H, d), got {x.shape}")
    n = int(mesh.shape[seq_axis])
    lq, lk = Q.shape[1], K.shape[1]
    for name, length in (("Q", lq), ("K", lk)):
        if length % (2 * n):
            raise ValueError(
                f"{name}'s sequence length {length} must be a multiple of 2 * n = {2 * n} "
                f"({n} devices along {seq_axis!r})"
            )
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        if lq != lk or segment_ids.shape != (Q.shape[0], lq):
            raise ValueError(
                f"segment_ids must have shape (B, L) = {(Q.shape[0], lq)} with Lq == Lk, "
                f"got {segment_ids.shape} (Lq={lq}, Lk={lk})"
            )
    window = _window(window_size)
    arity = None if mask_fn is None else _arity(mask_fn)
    cq, ck = lq // (2 * n), lk // (2 * n)

    seq_spec = P(batch_axis, seq_axis, head_axis, None)
    lse_spec = P(batch_axis, head_axis, seq_axis)
    seg_spec = P(batch_axis, seq_axis)
    sink_spec = P(head_axis)

    def local(q: Array, k: Array, v: Array, seg: Any, sink: Any) -> Any:
        bl, hl = q.shape[0], q.shape[2]
        device = lax.axis_index(seq_axis)
        b0 = _axis_index(batch_axis) * bl
        h0 = _axis_index(head_axis) * hl
        q_halves = (q[:, :cq], q[:, cq:])
        q_chunks = _chunks(device, n, layout)
        seg_q = None if seg is None else (seg[:, :cq], seg[:, cq:])

        def pair(qi: int, qc: Any, k_half: Array, v_half: Array, kc: Any, seg_k: Any) -> Any:
            q_start = qc * cq + q_offset
            k_start = kc * ck
            offset = (q_start - k_start).astype(jnp.int32)
            inner_mask = None
            if mask_fn is not None or seg_k is not None:
                seg_qi = None if seg_q is None else seg_q[qi]

                def inner_mask(b: Any, h: Any, qp: Any, kp: Any) -> Any:
                    visible = jnp.bool_(True)
                    if mask_fn is not None:
                        gq, gk = qp + k_start, kp + k_start
                        if arity == 4:
                            visible = mask_fn(b + b0, h + h0, gq, gk)
                        else:
                            visible = mask_fn(h + h0, gq, gk)
                    if seg_k is not None and seg_qi is not None:
                        visible = visible & (seg_qi[b, qp - offset] == seg_k[b, kp])
                    return visible

            inner_mod = None
            if score_mod is not None:

                def inner_mod(s: Any, b: Any, h: Any, qp: Any, kp: Any) -> Any:
                    return score_mod(s, b + b0, h + h0, qp + k_start, kp + k_start)

            def compute() -> tuple[Array, Array]:
                o, lse = masked_attention_via_map(
                    q_halves[qi],
                    k_half,
                    v_half,
                    is_causal=is_causal,
                    window_size=window_size,
                    mask_fn=inner_mask,
                    q_offset=jnp.full((bl,), offset, jnp.int32),
                    scale=scale,
                    block_size=block_size,
                    logits_soft_cap=logits_soft_cap,
                    score_mod=inner_mod,
                    return_lse=True,
                )
                return o.astype(jnp.float32), lse

            def skip() -> tuple[Array, Array]:
                shape = (bl, cq, hl, v_half.shape[-1])
                lse = jnp.full((bl, hl, cq), -jnp.inf, jnp.float32)
                return jnp.zeros(shape, jnp.float32), lse

            visible = _maybe_visible(q_start, cq, k_start, ck, is_causal, window)
            if visible is True:
                return compute()
            return lax.cond(visible, compute, skip)

        def step(accs: Any, kv: Any, source: Any) -> Any:
            k_cur, v_cur, seg_cur = kv
            k_chunks = _chunks(source, n, layout)
            new = []
            for qi in range(2):
                acc = accs[qi]
                for ki in range(2):
                    sl = slice(0, ck) if ki == 0 else slice(ck, 2 * ck)
                    seg_k = None if seg_cur is None else seg_cur[:, sl]
                    part = pair(qi, q_chunks[qi], k_cur[:, sl], v_cur[:, sl], k_chunks[ki], seg_k)
                    acc = part if acc is None else _merge(acc, part)
                new.append(acc)
            return tuple(new)

        accs = step((None, None), (k, v, seg), device)
        perm = [(i, (i + 1) % n) for i in range(n)]

        def body(carry: Any, s: Any) -> Any:
            accs, kv = carry
            kv = jax.tree_util.tree_map(lambda x: lax.ppermute(x, seq_axis, perm), kv)
            accs = step(accs, kv, (device - s) % n)
            return (accs, kv), None

        if n > 1:
            (accs, _), _ = lax.scan(body, (accs, (k, v, seg)), jnp.arange(1, n))
        out = jnp.concatenate([accs[0][0], accs[1][0]], axis=1)
        lse = jnp.concatenate([accs[0][1], accs[1][1]], axis=2)
        if sink is not None:
            sink_lse = jnp.broadcast_to(sink.astype(jnp.float32)[None, :, None], lse.shape)
            out, lse = _merge((out, lse), (jnp.zeros_like(out), sink_lse))
        return out.astype(q.dtype), lse

    seg_arg = segment_ids
    sink_arg = None if sinks is None else jnp.asarray(sinks)
    in_specs = (seq_spec, seq_spec, seq_spec, seg_spec, sink_spec)
    args = _reshard_explicit(mesh, (Q, K, V, seg_arg, sink_arg), in_specs)
    out, lse = _shard_map(local, mesh, in_specs, (seq_spec, lse_spec))(*args)
    return (out, lse) if return_lse else out
