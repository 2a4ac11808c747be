"""``ring_attention``: its arguments checked, the ring's settings fixed, and the
``shard_map`` that runs the ring on every device."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from .._api import _check_implementation
from .._cache import LRUCache
from .._checks import _as_array, _check_block_mask, _sinks, fold_scale, normalize_scale
from .._elementwise import _arity, has_tracers, trace_score_mod
from .._normalize import normalize_window
from .._scores import with_sinks
from ._layout import LAYOUTS, balance, ring_order, unbalance
from ._steps import RingSpec, ring

Array = jax.Array

_UNSUPPORTED = ("bias", "mask", "query_seq_lengths", "key_value_seq_lengths")

# The ring as one compiled program per static configuration; bounded. Called eagerly,
# an uncompiled shard_map would run the ring's steps op by op (seconds per call at any
# size); under an outer jit the cached program is a nested call.
_PROGRAMS = LRUCache[Callable[..., Any]](64)


def _ring_program(spec: RingSpec, mesh: Any, in_specs: Any, out_specs: Any) -> Any:
    """The compiled ``shard_map`` of the ring for ``spec`` on ``mesh``."""

    def build() -> Any:
        return jax.jit(_shard_map(partial(_local, spec), mesh, in_specs, out_specs))

    key = (spec, mesh, in_specs, out_specs)
    try:
        hash(key)
    except TypeError:  # axes given as lists, or an unhashable callable: compiled, not kept
        return build()
    return _PROGRAMS.get(key, build)


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
    window = normalize_window(window_size)
    _check_block_mask(block_mask, Q, K, is_causal, mask_fn, window, None, q_offset != 0)
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


def _check_call(
    mesh: Any, seq_axis: str, layout: str, q_offset: Any, implementation: Any, unsupported: Any
) -> None:
    """The checks that need no array."""
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
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _check_implementation(implementation)
    _check_mesh(mesh, seq_axis)
    if seq_axis not in mesh.axis_names:
        raise ValueError(f"seq_axis {seq_axis!r} is not an axis of the mesh {mesh.axis_names}")
    if isinstance(q_offset, (bool, np.bool_)) or not isinstance(q_offset, (int, np.integer)):
        raise TypeError(
            f"ring_attention takes q_offset as a Python int, got {type(q_offset).__name__}"
        )


def _check_mesh(mesh: Any, seq_axis: Any) -> None:
    """``mesh`` is a ``Mesh`` (or an ``AbstractMesh``), not an axis name or ``None``."""
    kinds = tuple(t for t in (jax.sharding.Mesh, getattr(jax.sharding, "AbstractMesh", None)) if t)
    if isinstance(mesh, kinds):
        return
    hint = ""
    if isinstance(mesh, str):
        hint = f"; {mesh!r} looks like an axis name, which goes in seq_axis= (here {seq_axis!r})"
    raise TypeError(
        "mesh must be a jax.sharding.Mesh (for instance jax.make_mesh((n,), ('seq',))), got "
        f"{type(mesh).__name__}: {mesh!r}{hint}"
    )


def _check_arrays(Q: Array, K: Array, V: Array, segment_ids: Any, n: int, seq_axis: str) -> Any:
    """Ranks, lengths and segment ids; returns the segment ids as an array (or None)."""
    for name, x in (("Q", Q), ("K", K), ("V", V)):
        if x.ndim != 4:
            raise ValueError(f"ring_attention needs 4-D {name} (B, L, H, d), got {x.shape}")
    lq, lk = Q.shape[1], K.shape[1]
    for name, length in (("Q", lq), ("K", lk)):
        if length % (2 * n):
            raise ValueError(
                f"{name}'s sequence length {length} must be a multiple of 2 * n = {2 * n} "
                f"({n} devices along {seq_axis!r})"
            )
    if segment_ids is None:
        return None
    segment_ids = jnp.asarray(segment_ids)
    if lq != lk or segment_ids.shape != (Q.shape[0], lq):
        raise ValueError(
            f"segment_ids must have shape (B, L) = {(Q.shape[0], lq)} with Lq == Lk, "
            f"got {segment_ids.shape} (Lq={lq}, Lk={lk})"
        )
    return segment_ids


def _local(spec: RingSpec, q: Array, k: Array, v: Array, seg: Any, sink: Any, *arrays: Any) -> Any:
    """One device's part: its natural-order chunks exchanged into the balanced order if
    the ring runs on it, the ring, the sinks, and the output sent back."""
    exchange = spec.order == "balanced"
    if exchange:
        q, k, v = (balance(x, 1, spec.seq_axis, spec.n) for x in (q, k, v))
        seg = None if seg is None else balance(seg, 1, spec.seq_axis, spec.n)
    out, lse = ring(spec, q, k, v, seg, tuple(arrays))
    if sink is not None:
        out, lse = with_sinks(out, lse, sink)
    out = out.astype(q.dtype)
    if exchange:
        out, lse = (
            unbalance(out, 1, spec.seq_axis, spec.n),
            unbalance(lse, 2, spec.seq_axis, spec.n),
        )
    return out, lse


def ring_attention(
    Q: Any,
    K: Any,
    V: Any,
    *,
    mesh: Any,
    seq_axis: str,
    batch_axis: str | Sequence[str] | None = None,
    head_axis: str | Sequence[str] | None = None,
    layout: str = "natural",
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

    Equal, to rounding, to ``masked_attention_via_map`` on the whole arrays, forward and
    gradients. ``Q``, ``K``, ``V`` are split along the sequence over ``seq_axis`` (and may
    be split over batch and heads along ``batch_axis`` / ``head_axis``). Each device
    keeps its queries; key/value chunks (and key segment ids) travel round the ring by
    collective permutes, never all-gathered, so per-device memory is O(L / n). Each step
    calls ``masked_attention_via_map`` on the local queries against the visiting chunk
    with the relative position offset, so its causal/window block skipping applies, and
    a query/key half-chunk pair that the causal or window constraint leaves wholly
    masked is skipped with ``lax.cond``. The backward pass is a custom VJP that runs the
    ring again: key/value chunks travel the same way with their gradient accumulators,
    each step differentiates its per-step calls against the merged output and
    log-sum-exp (recomputing their forward, about a third more compute than plain
    differentiation), and the key/value gradients take one more hop home, so the
    backward also keeps O(L / n) per device. Traced floating arrays that ``score_mod``
    closes over (learnable slopes or tables) are inputs of that VJP too: each device
    accumulates their gradient over its steps, summed over the mesh after.

    **Layout.** By default (``layout="natural"``) the inputs are in natural order, device
    ``i`` holding the ``i``-th ``L / n`` positions, and so are the outputs. Under a
    causal mask (or a window open on one side) the last positions do most of the work,
    so the call first exchanges chunks between devices: with the sequence cut into
    ``2 n`` chunks, device ``i`` works on chunks ``i`` and ``2 n - 1 - i`` (the zigzag
    pair), and every device does the same number of half-chunk pairs (``2 n + 1`` of the
    ``4 n``; see [`ring_block_counts`][jaxmodules.attention.ring_block_counts]). The
    exchange is two collective permutes of ``L / (2 n)`` positions per device for each
    of ``Q``, ``K``, ``V`` (and the segment ids), and two for the output and lse on the
    way back, against the ring's ``n - 1`` hops of the keys and values. Unmasked calls
    and two-sided windows, whose work is the same on every chunk, skip it.
    ``layout="zigzag"`` declares inputs already in zigzag order (see
    [`to_zigzag`][jaxmodules.attention.to_zigzag], e.g. from the input pipeline): the
    exchange is skipped and the outputs come back in zigzag order.
    ``layout="contiguous"`` runs the ring on the natural order as it is, unbalanced
    (the last device does about twice the average under a causal mask).

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
        layout: The order of the sequence in the inputs (and outputs): ``"natural"``
            (the default; balanced inside the call), ``"zigzag"`` (already balanced) or
            ``"contiguous"`` (natural, left unbalanced).
        segment_ids: Optional int array ``(B, L)`` (``Lq == Lk``) in the same layout:
            query ``q`` sees key ``k`` only where their ids are equal (packed documents).
            The key ids travel round the ring with the keys.
        is_causal: As in ``masked_attention_via_map`` (global positions).
        window_size: As in ``masked_attention_via_map`` (global positions).
        mask_fn: ``mask_fn(b, h, q, k)`` or ``mask_fn(h, q, k)`` on global batch row, query
            head and global positions. Arrays it closes over are replicated on every device;
            per-token data (document ids) belongs in ``segment_ids``, which is sharded.
            Its structure does not steer the balancing: say ``is_causal=True`` where it
            holds.
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
    _check_call(mesh, seq_axis, layout, q_offset, implementation, unsupported)
    Q, K, V = _as_array(Q, "Q"), _as_array(K, "K"), _as_array(V, "V")
    n = int(mesh.shape[seq_axis])
    segment_ids = _check_arrays(Q, K, V, segment_ids, n, seq_axis)
    sinks = _sinks(sinks, Q.shape[2])
    # The steps take the scale as a static float: a traced one is folded into Q here,
    # outside the ring's VJP, so autodiff gives it its gradient.
    Q, scale = fold_scale(Q, normalize_scale(scale))
    if block_mask is not None:
        is_causal, window_size, mask_fn, q_offset = _from_block_mask(
            block_mask, Q, K, is_causal, window_size, mask_fn, q_offset
        )
    window = normalize_window(window_size)
    # Arrays score_mod closes over that may need gradients go through shard_map as
    # replicated inputs of the ring's VJP; concrete ones stay closed over.
    mod_program, mod_consts = (None, ()) if score_mod is None else trace_score_mod(score_mod)
    mod_inputs = tuple(mod_consts) if has_tracers(mod_consts) else ()
    spec = RingSpec(
        n=n,
        seq_axis=seq_axis,
        batch_axis=batch_axis,
        head_axis=head_axis,
        order=ring_order(layout, n, bool(is_causal), window),
        q_chunk=Q.shape[1] // (2 * n),
        k_chunk=K.shape[1] // (2 * n),
        is_causal=bool(is_causal),
        window=window,
        mask_fn=mask_fn,
        mask_arity=None if mask_fn is None else _arity(mask_fn),
        q_offset=int(q_offset),
        scale=scale,
        block_size=block_size,
        logits_soft_cap=logits_soft_cap,
        score_mod=score_mod,
        mod_program=mod_program if mod_inputs else None,
        differentiable=tuple(
            i for i, c in enumerate(mod_inputs) if jnp.issubdtype(jnp.result_type(c), jnp.inexact)
        ),
        implementation=implementation,
    )
    seq_spec = P(batch_axis, seq_axis, head_axis, None)
    in_specs: tuple[P, ...] = (seq_spec, seq_spec, seq_spec, P(batch_axis, seq_axis))
    in_specs += (P(head_axis),) + (P(),) * len(mod_inputs)
    sink_arg = None if sinks is None else jnp.asarray(sinks)
    args = _reshard_explicit(mesh, (Q, K, V, segment_ids, sink_arg, *mod_inputs), in_specs)
    out_specs = (seq_spec, P(batch_axis, head_axis, seq_axis))

    out, lse = _ring_program(spec, mesh, in_specs, out_specs)(*args)
    return (out, lse) if return_lse else out
