"""Execution: a parsed plan becomes a nest of ``jax.vmap`` calls, one per named axis."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax

from ._errors import pattern_error
from ._parse import ELLIPSIS, AxisPattern, VmapPlan, describe, parse_pattern


@dataclass(frozen=True)
class _Level:
    """One ``jax.vmap`` of the nest."""

    axis: str
    in_axes: tuple[int | None, ...]  # one entry per mapped argument
    out_axes: int | tuple[int, ...]
    spmd_axis_name: Any


@dataclass(frozen=True)
class _Schedule:
    plan: VmapPlan
    mapped: tuple[int, ...]  # positions of the arguments that carry named axes
    levels: tuple[_Level, ...]  # outermost first


def _position(axes: tuple[str, ...], axis: str, outer: set[str]) -> int:
    """Where ``axis`` sits once the axes in ``outer`` are already mapped away.

    Entries after ``...`` are counted from the end (negative), so the position holds
    whatever number of axes ``...`` stands for, and no shape is needed to compute it.
    """
    index = axes.index(axis)
    if ELLIPSIS in axes and index > axes.index(ELLIPSIS):
        after = axes[index:]
        return -len(after) + sum(1 for other in after[1:] if other in outer)
    return index - sum(1 for other in axes[:index] if other in outer)


def _build_schedule(plan: VmapPlan, spmd_axis_name: Mapping[str, Any]) -> _Schedule:
    mapped = tuple(i for i, pattern in enumerate(plan.inputs) if pattern.named)
    levels = []
    for depth, axis in enumerate(plan.axis_order):
        outer = set(plan.axis_order[:depth])
        in_axes = tuple(
            _position(plan.inputs[i].axes, axis, outer) if axis in plan.inputs[i].named else None
            for i in mapped
        )
        out_axes = tuple(_position(output.axes, axis, outer) for output in plan.outputs)
        levels.append(
            _Level(
                axis=axis,
                in_axes=in_axes,
                out_axes=out_axes if plan.tuple_output else out_axes[0],
                spmd_axis_name=spmd_axis_name.get(axis),
            )
        )
    return _Schedule(plan=plan, mapped=mapped, levels=tuple(levels))


def _check_spmd_axis_name(plan: VmapPlan, spmd_axis_name: object) -> Mapping[str, Any]:
    if spmd_axis_name is None:
        return {}
    if not isinstance(spmd_axis_name, Mapping):
        raise TypeError(
            "fancy_vmap: spmd_axis_name must map axis names of the pattern to mesh axis"
            f" names, such as {{'i': 'data'}}; got {type(spmd_axis_name).__name__}"
        )
    for axis in spmd_axis_name:
        if axis not in plan.axis_order:
            raise ValueError(
                f"fancy_vmap: spmd_axis_name names axis {axis!r}, which pattern {plan.fmt!r}"
                f" does not map; its named axes are {list(plan.axis_order)}"
            )
    return dict(spmd_axis_name)


def _leaf_shape(leaf: object) -> tuple[int, ...] | None:
    """The shape of an array-like leaf, or ``None`` for anything that is not one."""
    if isinstance(leaf, (bool, int, float, complex)):
        return ()
    shape = getattr(leaf, "shape", None)
    return tuple(shape) if isinstance(shape, tuple) else None


def _where(role: str, index: int, pattern: AxisPattern, path: tuple[Any, ...]) -> str:
    leaf = f", leaf {jax.tree_util.keystr(path)}" if path else ""
    return f"{role} {index} {describe(pattern)}{leaf}"


def _input_rank_ok(pattern: AxisPattern, rank: int) -> tuple[bool, str]:
    if pattern.has_ellipsis:
        needed = len(pattern.axes) - 1
        return rank >= needed, f"at least {needed}"
    return rank == len(pattern.axes), str(len(pattern.axes))


def _dimension(pattern: AxisPattern, axis: str, rank: int) -> int:
    position = _position(pattern.axes, axis, set())
    return position if position >= 0 else rank + position


def _holds_array(value: Any) -> bool:
    """Whether ``value`` holds an array with an axis to map (numbers and flags have none)."""
    return any(bool(_leaf_shape(leaf)) for leaf in jax.tree_util.tree_leaves(value))


def _check_arguments(
    plan: VmapPlan, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
) -> None:
    """Count, ranks and sizes of the arguments, checked before jax sees them."""
    fmt = plan.fmt
    if len(args) != len(plan.inputs):
        arrays = [k for k, v in (kwargs or {}).items() if _holds_array(v)]
        hint = (
            f"; keyword arguments are never mapped (they reach fn as they are), and "
            f"{', '.join(repr(k) for k in arrays)} came as keyword(s): pass the arguments "
            "the pattern maps positionally, in the pattern's order"
            if arrays
            else ""
        )
        if plan.inputs:
            start, end = plan.inputs[0].start, plan.inputs[-1].end
        else:
            start, end = 0, len(fmt)
        raise pattern_error(
            fmt,
            start,
            end,
            f"the pattern describes {len(plan.inputs)} positional argument(s), but the"
            f" function was called with {len(args)}{hint}",
        )
    bound: dict[str, tuple[int, str, tuple[int, ...]]] = {}
    for index, (pattern, arg) in enumerate(zip(plan.inputs, args, strict=True)):
        if pattern.axes == (ELLIPSIS,):
            continue  # passed whole: any object at all
        for path, leaf in jax.tree_util.tree_flatten_with_path(arg)[0]:
            where = _where("argument", index, pattern, path)
            shape = _leaf_shape(leaf)
            if shape is None:
                raise TypeError(
                    f"fancy_vmap: {where} is a {type(leaf).__name__}, not an array; only"
                    f" arguments written '...' (or without brackets) may hold other objects"
                )
            rank_ok, needed = _input_rank_ok(pattern, len(shape))
            if not rank_ok:
                raise pattern_error(
                    fmt,
                    pattern.start,
                    pattern.end,
                    f"{where} has shape {shape} of rank {len(shape)}, but its pattern needs"
                    f" rank {needed}",
                )
            for axis in pattern.named:
                size = shape[_dimension(pattern, axis, len(shape))]
                if axis not in bound:
                    bound[axis] = (size, where, shape)
                    continue
                first_size, first_where, first_shape = bound[axis]
                if size != first_size:
                    start, end = pattern.span_of(axis)
                    raise pattern_error(
                        fmt,
                        start,
                        end,
                        f"axis {axis!r} has size {first_size} in {first_where} (shape"
                        f" {first_shape}) but size {size} in {where} (shape {shape})",
                    )
    for axis in plan.axis_order:
        if axis not in bound:
            index = next(i for i, pattern in enumerate(plan.inputs) if axis in pattern.named)
            start, end = plan.inputs[index].span_of(axis)
            raise pattern_error(
                fmt,
                start,
                end,
                f"axis {axis!r} has no size: argument {index} holds no arrays to take it from",
            )


def _check_output(plan: VmapPlan, index: int, pattern: AxisPattern, part: Any) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(part)[0]:
        subject = f"output {index}" if plan.tuple_output else "the output"
        if path:
            subject += f", leaf {jax.tree_util.keystr(path)}"
        shape = _leaf_shape(leaf)
        if shape is None:
            raise TypeError(f"fancy_vmap: fn returned a {type(leaf).__name__} as {subject}")
        colons = pattern.unmapped_count
        if pattern.has_ellipsis:
            fits, wanted = len(shape) >= colons, f"at least {colons}"
        else:  # with no ':' either, fn's axes follow the named axes and any rank fits
            fits, wanted = colons == 0 or len(shape) == colons, str(colons)
        if not fits:
            raise pattern_error(
                plan.fmt,
                pattern.start,
                pattern.end,
                f"output pattern {pattern.text!r} has {colons} ':' for the axes of fn's own"
                f" output, so fn must return rank {wanted} for each element, but {subject}"
                f" has shape {shape} of rank {len(shape)} (write '...' in the output pattern"
                " to take any number of axes)",
            )


def _normalize_result(
    plan: VmapPlan, result: Any, rebuild: list[Callable[[tuple[Any, ...]], Any]]
) -> Any:
    """Check ``fn``'s per-element result against the output patterns.

    Runs inside the innermost ``vmap``, where shapes are per element, so a rank that does
    not fit is reported before ``jax.vmap`` would complain about ``out_axes``.
    """
    if not plan.tuple_output:
        _check_output(plan, 0, plan.outputs[0], result)
        return result
    count = len(plan.outputs)
    if not isinstance(result, (tuple, list)) or len(result) != count:
        if isinstance(result, (tuple, list)):
            got = f"a {type(result).__name__} of length {len(result)}"
        elif _leaf_shape(result) is not None:
            got = f"a single array of shape {_leaf_shape(result)}"
        else:
            got = f"a {type(result).__name__}"
        raise pattern_error(
            plan.fmt,
            plan.outputs[0].start,
            plan.outputs[-1].end,
            f"the pattern has {count} output pattern(s), so fn must return a tuple of"
            f" {count}; it returned {got}",
        )
    container = type(result)
    # vmap's out_axes is a plain tuple prefix; lists and namedtuples are restored after.
    if container is list:
        rebuild.append(list)
    elif container is not tuple and hasattr(container, "_fields"):
        rebuild.append(lambda parts: container(*parts))
    elif container is not tuple:
        rebuild.append(container)
    parts = tuple(result)
    for index, (pattern, part) in enumerate(zip(plan.outputs, parts, strict=True)):
        _check_output(plan, index, pattern, part)
    return parts


def _call(
    schedule: _Schedule, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    plan = schedule.plan
    _check_arguments(plan, args, kwargs)
    rebuild: list[Callable[[tuple[Any, ...]], Any]] = []

    def per_element(*mapped_values: Any) -> Any:
        # Unmapped arguments and keyword arguments reach fn by closure, untouched by vmap.
        full = list(args)
        for position, value in zip(schedule.mapped, mapped_values, strict=True):
            full[position] = value
        return _normalize_result(plan, fn(*full, **kwargs), rebuild)

    batched: Callable[..., Any] = per_element
    for level in reversed(schedule.levels):
        batched = jax.vmap(
            batched,
            in_axes=level.in_axes,
            out_axes=level.out_axes,
            axis_name=level.axis,
            spmd_axis_name=level.spmd_axis_name,
        )
    result = batched(*(args[position] for position in schedule.mapped))
    return rebuild[0](result) if rebuild else result


def fancy_vmap(
    fn: Callable[..., Any],
    fmt: str,
    *,
    spmd_axis_name: Mapping[str, Any] | None = None,
) -> Callable[..., Any]:
    """Vectorize ``fn`` over named axes described by a format string.

    Each named axis becomes one ``jax.vmap``, nested in the order of the first output
    pattern (outermost first); the traced program is the one the hand-written nest gives.

    Two syntaxes, equivalent:

    * einsum-like, one pattern per positional argument: ``"i : j, : j, i -> : i j"``,
      or reversed, ``": i j <- i : j, : j, i"``;
    * dummy function: ``"out[:, i, j] = f(A[i, :, j], B[:, j], C[i])"`` or
      ``"f(A[i], B[j]) -> out[i, j]"``; the names ``out``, ``f``, ``A`` are free.

    In a pattern, an identifier is a mapped axis, ``:`` one axis passed to ``fn`` as is,
    and ``...`` any number of such axes. An argument written ``...`` (or, in the
    dummy-function form, without brackets) is passed whole and may be any object. A
    pattern applies to every leaf of a pytree argument or output. ``fn``'s own output
    axes fill the output's ``:`` positions in order; ``...`` takes all of them; with
    neither, they follow the named axes. Several comma-separated output patterns (or one
    with a trailing comma) mean ``fn`` returns a tuple.

    Args:
        fn: The function to vectorize. It sees one element along every named axis.
        fmt: The format string, parsed once, now.
        spmd_axis_name: Maps named axes onto device-mesh axis names, such as
            ``{"i": "data"}``; passed to the ``jax.vmap`` of that axis.

    Returns:
        The vectorized function. Its positional arguments follow the patterns; its
        keyword arguments go to ``fn`` unmapped. Each named axis is also the vmap
        ``axis_name``, so ``fn`` may call collectives such as ``jax.lax.psum(x, "i")``.

    Raises:
        TypeError: ``fn`` is not callable, ``fmt`` is not a string, or
            ``spmd_axis_name`` is not a mapping.
        ValueError: The pattern is malformed (at this call), or a call does not fit it:
            argument count, argument ranks, one axis bound to two sizes, or ``fn``'s
            output rank. Messages quote the pattern with carets under the culprit.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxmodules.vectorize import fancy_vmap
        >>> def weighted(a, b, c):
        ...     return a + jnp.sum(b) + c
        >>> vectorized = fancy_vmap(weighted, "i : j, : j, i -> : i j")
        >>> A, B, C = jnp.ones((3, 5, 4)), jnp.ones((7, 4)), jnp.ones(3)
        >>> vectorized(A, B, C).shape
        (5, 3, 4)
        >>> outer = fancy_vmap(jnp.multiply, "out[i, j] = f(a[i], b[j])")
        >>> outer(jnp.arange(3.0), jnp.arange(2.0)).shape
        (3, 2)
    """
    if not callable(fn):
        raise TypeError(f"fancy_vmap: fn must be callable, got {type(fn).__name__}")
    plan = parse_pattern(fmt)
    schedule = _build_schedule(plan, _check_spmd_axis_name(plan, spmd_axis_name))

    @functools.wraps(fn)
    def vectorized(*args: Any, **kwargs: Any) -> Any:
        return _call(schedule, fn, args, kwargs)

    return vectorized
