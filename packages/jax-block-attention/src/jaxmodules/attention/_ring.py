"""Ring attention: context parallelism over one mesh axis with ``shard_map`` and ``ppermute``.

Each device keeps its queries; key/value chunks travel round the ring of devices along
``seq_axis`` by collective permutes, one hop per step, and every step runs
[`masked_attention_via_map`][jaxmodules.attention.masked_attention_via_map] on the local
queries against the visiting chunk with ``return_lse=True``. The partial results are merged
through their log-sum-exp. The backward pass (a custom VJP) sends the chunks round again
with their key/value gradient accumulators.

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

from ._api import _check_implementation, masked_attention_via_map
from ._checks import fold_scale, normalize_scale
from ._elementwise import _arity, has_tracers, trace_score_mod
from ._scores import merge_by_lse, with_sinks

Array = jax.Array

_LAYOUTS = ("zigzag", "contiguous")
_UNSUPPORTED = ("bias", "mask", "query_seq_lengths", "key_value_seq_lengths")


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
    outs = jnp.stack([acc[0], part[0]])
    lses = jnp.swapaxes(jnp.stack([acc[1], part[1]]), 2, 3)  # (2, B, L, H), as outs
    out, lse = merge_by_lse(outs, lses)
    return out, jnp.swapaxes(lse, 1, 2)


def _from_block_mask(
    block_mask: Any,
    Q: Array,
    K: Array,
    is_causal: Any,
    window_size: Any,
    mask_fn: Any,
    q_offset: int,
) -> tuple[bool, Any, Any, int]:
    """The causal flag, window, mask function and offset a block mask stands for."""
    from ._checks import _check_block_mask

    _check_block_mask(
        block_mask,
        Q,
        K,
        is_causal,
        mask_fn,
        _window(window_size) or (None, None),
        None,
        q_offset != 0,
    )
    offsets = np.unique(np.asarray(block_mask.q_offset))
    if offsets.size != 1:
        raise ValueError(
            "ring_attention takes a block_mask with one q_offset for all rows, got "
            f"{offsets.tolist()}"
        )
    program, consts = block_mask.program, block_mask.mask_consts
    stands_for = None
    if program is not None:

        def stands_for(b: Any, h: Any, q: Any, k: Any) -> Any:
            return program.evaluate(consts, b, h, q, k)

    return block_mask.is_causal, block_mask.window, stands_for, int(offsets[0])


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
    scale: float | jax.Array | None = None,
    block_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    score_mod: Callable[..., Any] | None = None,
    sinks: Any = None,
    return_lse: bool = False,
    block_mask: Any = None,
    implementation: str | None = None,
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
    or window constraint leaves wholly masked is skipped with ``lax.cond``. The backward
    pass is a custom VJP that runs the ring again: key/value chunks travel the same way
    with their gradient accumulators, each step differentiates its per-step calls against
    the merged output and log-sum-exp (recomputing their forward, about a third more
    compute than plain differentiation), and the key/value gradients take one more hop
    home, so the backward also keeps O(L / n) per device. Traced floating arrays that
    ``score_mod`` closes over (learnable slopes or tables) are inputs of that VJP too:
    each device accumulates their gradient over its steps, summed over the mesh after.

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
        scale: As in ``masked_attention_via_map`` (a traced scalar too).
        block_size: Block size of each per-step call (positions per block within a
            half-chunk of ``L / (2 n)`` positions).
        logits_soft_cap: As in ``masked_attention_via_map``.
        score_mod: ``score_mod(score, b, h, q, k)`` on global indices, as in
            ``masked_attention_via_map``.
        sinks: Float array ``(Hq,)`` of per-head sink logits, joined once to each row's
            softmax (after the ring).
        return_lse: Also return the log-sum-exp ``(B, Hq, Lq)`` float32 in the same
            layout.
        block_mask: A [`BlockMask`][jaxmodules.attention.BlockMask] for the whole
            sequence (natural positions, a single ``q_offset``): its causal, window,
            offset and ``mask_fn`` parts drive every step, whose own block lists are
            classified on the device for the visiting chunk (its block size is not used).
            Not combined with ``is_causal``, ``window_size``, ``mask_fn`` or ``q_offset``.
        implementation: The backend of every step, as in ``masked_attention_via_map``
            (``None``: the fastest that takes the step; steps carry a query offset, so on
            a GPU that is the Pallas kernel where it applies).
        **unsupported: ``bias``, ``mask``, ``query_seq_lengths`` and
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
        if name in ("dropout_rate", "dropout_rng"):
            raise ValueError(
                "ring_attention does not take dropout (dropout_rate, dropout_rng): its steps "
                "see chunks at relative offsets, so their keep decisions would not be those "
                "of the whole call; use masked_attention_via_map for attention dropout"
            )
        if name in _UNSUPPORTED:
            raise ValueError(
                f"ring_attention does not take {name}=: a ring step sees only one chunk of "
                "queries and keys; express the mask as mask_fn (global positions) or "
                "segment_ids"
            )
        raise TypeError(f"ring_attention got an unexpected keyword argument {name!r}")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    _check_implementation(implementation)
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
    # The steps take the scale as a static float: a traced one is folded into Q here,
    # outside the ring's VJP, so autodiff gives it its gradient.
    Q, scale = fold_scale(Q, normalize_scale(scale))
    if block_mask is not None:
        is_causal, window_size, mask_fn, q_offset = _from_block_mask(
            block_mask, Q, K, is_causal, window_size, mask_fn, q_offset
        )
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
    # Arrays score_mod closes over that may need gradients go through shard_map as
    # replicated inputs of the ring's VJP; concrete ones stay closed over.
    mod_program, mod_consts = (None, ()) if score_mod is None else trace_score_mod(score_mod)
    mod_inputs = tuple(mod_consts) if has_tracers(mod_consts) else ()
    differentiable = [
        i for i, c in enumerate(mod_inputs) if jnp.issubdtype(jnp.result_type(c), jnp.inexact)
    ]
    cq, ck = lq // (2 * n), lk // (2 * n)

    seq_spec = P(batch_axis, seq_axis, head_axis, None)
    lse_spec = P(batch_axis, head_axis, seq_axis)
    seg_spec = P(batch_axis, seq_axis)
    sink_spec = P(head_axis)

    def local(q: Array, k: Array, v: Array, seg: Any, sink: Any, *mod_arrays: Any) -> Any:
        bl, hl = q.shape[0], q.shape[2]

        def user_mod(arrays: Sequence[Any]) -> Callable[..., Any] | None:
            """score_mod, reading its traced arrays from ``arrays``."""
            if score_mod is None or not mod_inputs:
                return score_mod
            assert mod_program is not None

            def traced_mod(sc: Any, b: Any, h: Any, qp: Any, kp: Any) -> Any:
                return mod_program.evaluate(arrays, sc, b, h, qp, kp)

            return traced_mod

        def with_float(arrays: Sequence[Any], floats: Sequence[Any]) -> list[Any]:
            full = list(arrays)
            for i, x in zip(differentiable, floats, strict=True):
                full[i] = x
            return full

        def context(seg: Any) -> tuple[Any, ...]:
            # Made afresh in each traced function (the custom VJP's backward is traced
            # apart from the forward): this device, batch and head offsets, query chunks.
            device = lax.axis_index(seq_axis)
            b0 = _axis_index(batch_axis) * bl
            h0 = _axis_index(head_axis) * hl
            return device, b0, h0, _chunks(device, n, layout), seg

        perm = [(i, (i + 1) % n) for i in range(n)]

        def shift(tree: Any) -> Any:
            return jax.tree_util.tree_map(lambda x: lax.ppermute(x, seq_axis, perm), tree)

        def half(x: Any, i: int, size: int) -> Any:
            return None if x is None else x[:, i * size : (i + 1) * size]

        def pair_call(
            ctx: Any,
            q_half: Array,
            k_half: Array,
            v_half: Array,
            qi: int,
            kc: Any,
            seg_k: Any,
            arrays: Sequence[Any],
        ) -> tuple[Array, Array]:
            """Local query half ``qi`` against one visiting key half (chunk ``kc``);
            ``arrays`` are score_mod's traced arrays."""
            _, b0, h0, q_chunks, seg_q = ctx
            k_start = kc * ck
            offset = (q_chunks[qi] * cq + q_offset - k_start).astype(jnp.int32)
            seg_qi = half(seg_q, qi, cq)
            inner_mask = None
            if mask_fn is not None or seg_k is not None:

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
            mod = user_mod(arrays)
            if mod is not None:

                def inner_mod(sc: Any, b: Any, h: Any, qp: Any, kp: Any) -> Any:
                    return mod(sc, b + b0, h + h0, qp + k_start, kp + k_start)

            o, lse = masked_attention_via_map(
                q_half,
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
                implementation=implementation,
            )
            return o.astype(jnp.float32), lse

        def visible(ctx: Any, qi: int, kc: Any) -> Any:
            q_chunks = ctx[3]
            q_start = q_chunks[qi] * cq + q_offset
            return _maybe_visible(q_start, cq, kc * ck, ck, is_causal, window)

        def forward_step(
            ctx: Any, q: Array, accs: Any, kv: Any, source: Any, arrays: Sequence[Any]
        ) -> Any:
            k_cur, v_cur, seg_cur = kv
            k_chunks = _chunks(source, n, layout)
            new = []
            for qi in range(2):
                acc = accs[qi]
                for ki in range(2):
                    args = (
                        ctx,
                        half(q, qi, cq),
                        half(k_cur, ki, ck),
                        half(v_cur, ki, ck),
                        qi,
                        k_chunks[ki],
                        half(seg_cur, ki, ck),
                        arrays,
                    )
                    dv_shape = (bl, cq, hl, v_cur.shape[-1])

                    def skip() -> tuple[Array, Array]:
                        return (
                            jnp.zeros(dv_shape, jnp.float32),  # noqa: B023
                            jnp.full((bl, hl, cq), -jnp.inf, jnp.float32),
                        )

                    pred = visible(ctx, qi, k_chunks[ki])
                    if pred is True:
                        part = pair_call(*args)
                    else:
                        part = lax.cond(pred, lambda a=args: pair_call(*a), skip)
                    acc = part if acc is None else _merge(acc, part)
                new.append(acc)
            return tuple(new)

        def ring_forward(
            q: Array, k: Array, v: Array, seg: Any, arrays: Sequence[Any]
        ) -> tuple[Array, Array]:
            ctx = context(seg)
            device = ctx[0]
            accs = forward_step(ctx, q, (None, None), (k, v, seg), device, arrays)

            def body(carry: Any, step: Any) -> Any:
                accs, kv = carry
                kv = shift(kv)
                source = (device - step) % n
                return (forward_step(ctx, q, accs, kv, source, arrays), kv), None

            if n > 1:
                (accs, _), _ = lax.scan(body, (accs, (k, v, seg)), jnp.arange(1, n))
            out = jnp.concatenate([accs[0][0], accs[1][0]], axis=1)
            lse = jnp.concatenate([accs[0][1], accs[1][1]], axis=2)
            return out, lse

        def backward_step(
            ctx: Any,
            q: Array,
            out: Array,
            lse: Array,
            d_out: Array,
            d_lse: Array,
            kv: Any,
            source: Any,
            arrays: Sequence[Any],
        ) -> tuple[Array, Array, Array, list[Array]]:
            """Gradients of one step's four pairs, from the merged ``out`` and ``lse``:
            dQ, dK, dV and the step's share of the floating ``arrays``' gradients."""
            k_cur, v_cur, seg_cur = kv
            k_chunks = _chunks(source, n, layout)
            floats = [arrays[i] for i in differentiable]
            d_floats = [jnp.zeros(jnp.shape(x), jnp.float32) for x in floats]
            dq = []
            dk = [jnp.zeros((*k_cur.shape[:1], ck, *k_cur.shape[2:]), jnp.float32)] * 2
            dv = [jnp.zeros((*v_cur.shape[:1], ck, *v_cur.shape[2:]), jnp.float32)] * 2
            for qi in range(2):
                o_all, l_all = half(out, qi, cq), lse[:, :, qi * cq : (qi + 1) * cq]
                do_all = half(d_out, qi, cq)
                dl_all = d_lse[:, :, qi * cq : (qi + 1) * cq]
                dq_i = jnp.zeros((*q.shape[:1], cq, *q.shape[2:]), jnp.float32)
                for ki in range(2):
                    q_half, k_half, v_half = (
                        half(q, qi, cq),
                        half(k_cur, ki, ck),
                        half(v_cur, ki, ck),
                    )
                    seg_k = half(seg_cur, ki, ck)

                    def grads(
                        q_half: Array = q_half,
                        k_half: Array = k_half,
                        v_half: Array = v_half,
                        qi: int = qi,
                        kc: Any = k_chunks[ki],
                        seg_k: Any = seg_k,
                        o_all: Array = o_all,
                        l_all: Array = l_all,
                        do_all: Array = do_all,
                        dl_all: Array = dl_all,
                    ) -> tuple[Array, ...]:
                        (o_p, l_p), pullback = jax.vjp(
                            lambda a, b, c, fs: pair_call(
                                ctx, a, b, c, qi, kc, seg_k, with_float(arrays, fs)
                            ),
                            q_half,
                            k_half,
                            v_half,
                            floats,
                        )
                        finite = jnp.isfinite(l_p) & jnp.isfinite(l_all)
                        w = jnp.where(finite, jnp.exp(jnp.where(finite, l_p - l_all, 0.0)), 0.0)
                        w_rows = jnp.swapaxes(w, 1, 2)[..., None]
                        d_o = (w_rows * do_all).astype(o_p.dtype)
                        dot = jnp.swapaxes(jnp.sum(do_all * (o_p - o_all), axis=-1), 1, 2)
                        d_l = w * (dl_all + dot)
                        dq_p, dk_p, dv_p, d_fs = pullback((d_o, d_l))
                        g = (dq_p, dk_p, dv_p, *d_fs)
                        return tuple(x.astype(jnp.float32) for x in g)

                    def no_grads(
                        q_half: Array = q_half, k_half: Array = k_half, v_half: Array = v_half
                    ) -> tuple[Array, ...]:
                        shapes: tuple[Any, ...] = (q_half.shape, k_half.shape, v_half.shape)
                        shapes += tuple(jnp.shape(x) for x in floats)
                        return tuple(jnp.zeros(shape, jnp.float32) for shape in shapes)

                    pred = visible(ctx, qi, k_chunks[ki])
                    g = grads() if pred is True else lax.cond(pred, grads, no_grads)
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

        @jax.custom_vjp
        def ring(q: Array, k: Array, v: Array, seg: Any, arrays: tuple) -> tuple[Array, Array]:
            return ring_forward(q, k, v, seg, arrays)

        def ring_fwd(q: Array, k: Array, v: Array, seg: Any, arrays: tuple) -> Any:
            out, lse = ring_forward(q, k, v, seg, arrays)
            return (out, lse), (q, k, v, seg, arrays, out, lse)

        def ring_bwd(res: Any, cts: Any) -> Any:
            q, k, v, seg, arrays, out, lse = res
            d_out, d_lse = cts
            d_out = d_out.astype(jnp.float32)
            d_lse = d_lse.astype(jnp.float32)
            ctx = context(seg)
            device = ctx[0]
            first = backward_step(ctx, q, out, lse, d_out, d_lse, (k, v, seg), device, arrays)
            dq, dk, dv, d_floats = first

            def body(carry: Any, step: Any) -> Any:
                dq, kv, dk, dv, d_floats = carry
                kv, dk, dv = shift((kv, dk, dv))
                source = (device - step) % n
                g = backward_step(ctx, q, out, lse, d_out, d_lse, kv, source, arrays)
                d_floats = [acc + new for acc, new in zip(d_floats, g[3], strict=True)]
                return (dq + g[0], kv, dk + g[1], dv + g[2], d_floats), None

            if n > 1:
                carry = (dq, (k, v, seg), dk, dv, d_floats)
                (dq, _, dk, dv, d_floats), _ = lax.scan(body, carry, jnp.arange(1, n))
                dk, dv = shift((dk, dv))  # home: the chunk came from the previous device
            d_seg = None if seg is None else np.zeros(seg.shape, jax.dtypes.float0)
            # This device's share of the arrays' gradients; shard_map's transpose sums
            # the shares of a replicated input over the mesh.
            d_arrays: list[Any] = [np.zeros(jnp.shape(x), jax.dtypes.float0) for x in arrays]
            for i, g in zip(differentiable, d_floats, strict=True):
                d_arrays[i] = g.astype(jnp.result_type(arrays[i]))
            grads = (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype))
            return (*grads, d_seg, tuple(d_arrays))

        ring.defvjp(ring_fwd, ring_bwd)

        out, lse = ring(q, k, v, seg, tuple(mod_arrays))
        if sink is not None:
            out, lse = with_sinks(out, lse, sink)
        return out.astype(q.dtype), lse

    seg_arg = segment_ids
    sink_arg = None if sinks is None else jnp.asarray(sinks)
    in_specs = (seq_spec, seq_spec, seq_spec, seg_spec, sink_spec, *(P(),) * len(mod_inputs))
    args = _reshard_explicit(mesh, (Q, K, V, seg_arg, sink_arg, *mod_inputs), in_specs)
    out, lse = _shard_map(local, mesh, in_specs, (seq_spec, lse_spec))(*args)
    return (out, lse) if return_lse else out
