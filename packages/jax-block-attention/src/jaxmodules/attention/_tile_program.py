"""The tile-program evaluator, shared by the kernel backends: a traced ``mask_fn`` or
``score_mod`` run on a tile's index vectors inside a kernel, its closed-over arrays read
from kernel refs.

A kernel backend passes its own ``Lowerable`` (its kernel's name and which primitives its
compiler lowers, e.g. Triton's rules in ``_pallas._triton_rules``); the evaluator itself
knows no compiler."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Literal

from ._elementwise import ElementwiseProgram

Array = Any  # jax.Array, or a Pallas ref inside a kernel
_F32 = jnp.float32

_MIN_TILE = 16  # the smallest tile side of the trial trace (Triton's smallest matmul)


class UnsupportedCallError(ValueError):
    """A call a backend cannot compute (the message says why; the block loop can)."""


@dataclass(frozen=True)
class Lowerable:
    """What a kernel backend's compiler lowers: ``kernel`` names it in refusals,
    ``problem(primitive)`` says why a primitive has no lowering (``None``: it has one)."""

    kernel: str
    problem: Callable[[Any], str | None]


# Any primitive (a backend without a table of its own, or a test).
ANY_PRIMITIVE = Lowerable("kernel", lambda primitive: None)


# ------------------------------------------------- mask_fn / score_mod programs in tiles


@dataclass
class _View:
    """A closed-over array seen through the scalar indices read so far.

    ``axes`` has one entry per axis of the original array: ``None`` for an axis still
    whole, or the (vector) index read on it; ``squeezed`` marks the indexed axes the
    program no longer sees (``dynamic_slice`` of size 1 keeps them, ``squeeze`` drops
    them).
    """

    ref: Array
    dtype: Any
    shape: tuple[int, ...]  # original shape of the closed-over array
    axes: list[Any]
    squeezed: list[bool]
    const: int = 0  # which of the program's closed-over arrays


# Loads a fully indexed ``_View``: ``_read``, or one that also records or replaces the
# values read (for gradients with respect to closed-over arrays).
Reader = Callable[[_View], Any]


def _unsupported(what: str) -> UnsupportedCallError:
    """What in a program the evaluator cannot lower; ``_tile_problem`` words the refusal
    for the function it came from."""
    return UnsupportedCallError(what)


def _refusal(kernel: str, name: str, what: str) -> str:
    """Why ``kernel`` refuses the user's ``name`` (``mask_fn`` or ``score_mod``)."""
    inputs = "score and indices" if name == "score_mod" else "indices"
    return (
        f"the {kernel} kernel cannot evaluate this {name} on a tile: {what}. Inside the "
        f"kernel, a {name} may use element-wise jnp operations on its {inputs} and read "
        "closed-over arrays only by scalar indexing (ids[b, q], lengths[b]); use "
        f'implementation="xla" for other {name} functions'
    )


def _literal_value(atom: Any) -> Any:
    # lax.full, not jnp.asarray: older jax (0.5) traces jnp.asarray of a constant as a
    # device_put, which Pallas cannot lower to Triton.
    aval = atom.aval
    return lax.full(aval.shape, np.asarray(atom.val, dtype=aval.dtype), aval.dtype)


def _broadcast_all(values: Sequence[Any]) -> list[Any]:
    shape = np.broadcast_shapes(*(jnp.shape(v) for v in values))
    return [v if jnp.shape(v) == shape else jnp.broadcast_to(v, shape) for v in values]


def _read(view: _View) -> Any:
    """Load a fully indexed closed-over array at its (broadcast) index vectors."""
    if any(a is None for a in view.axes) or not all(view.squeezed):
        raise _unsupported(
            f"a closed-over array of shape {view.shape} is used whole or partly indexed "
            "(only scalar reads such as ids[b, q] are supported)"
        )
    # A 0-d array travels as shape (1,).
    value = view.ref[tuple(_broadcast_all(view.axes))] if view.shape else view.ref[0]
    if value.dtype != view.dtype:
        value = value.astype(view.dtype) if view.dtype != jnp.bool_ else value != 0
    return value


_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _inner_jaxpr(eqn: Any) -> Any:
    for name in _CALL_PARAMS:
        inner = eqn.params.get(name)
        if inner is not None:
            return inner
    return None


def _holds_jaxpr(param: Any) -> bool:
    if isinstance(param, (tuple, list)):
        return any(_holds_jaxpr(p) for p in param)
    return hasattr(param, "eqns") or hasattr(param, "jaxpr")


def _eval_tile_jaxpr(
    jaxpr: Any,
    consts: Sequence[Any],
    args: Sequence[Any],
    reader: Reader = _read,
    lowerable: Lowerable = ANY_PRIMITIVE,
) -> list[Any]:
    """Evaluate a scalar jaxpr on broadcastable index arrays (every intermediate becomes
    an array of the tile's broadcast shape); closed-over arrays are ``_View`` values,
    loaded by ``reader`` once fully indexed; each primitive must be ``lowerable``."""
    env: dict[Any, Any] = {}

    def read(atom: Any) -> Any:
        return _literal_value(atom) if isinstance(atom, Literal) else env[atom]

    def value(atom: Any) -> Any:
        x = read(atom)
        return reader(x) if isinstance(x, _View) else x

    for var, c in zip(jaxpr.constvars, consts, strict=True):
        env[var] = c
    for var, a in zip(jaxpr.invars, args, strict=True):
        env[var] = a
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        inputs = [read(v) for v in eqn.invars]
        inner = _inner_jaxpr(eqn)
        if inner is not None:
            closed_consts = list(getattr(inner, "consts", ()))
            body = getattr(inner, "jaxpr", inner)
            outs = _eval_tile_jaxpr(body, closed_consts, inputs, reader, lowerable)
        elif name in ("dynamic_slice", "squeeze") and isinstance(inputs[0], _View):
            outs = [_view_op(name, eqn, inputs, reader)]
        else:
            # A closed-over array read down to a scalar per element is loaded here.
            inputs = [reader(x) if isinstance(x, _View) else x for x in inputs]
            scalar = all(v.aval.shape == () for v in (*eqn.invars, *eqn.outvars))
            if not scalar:
                raise _unsupported(
                    f"{name!r} works on arrays of shapes "
                    f"{[tuple(v.aval.shape) for v in eqn.invars]} (only scalar, element-wise "
                    "operations are supported)"
                )
            if any(_holds_jaxpr(p) for p in eqn.params.values()):
                raise _unsupported(f"control flow ({name!r}); use jnp.where instead")
            if name in ("squeeze", "reshape", "broadcast_in_dim", "expand_dims", "copy"):
                outs = inputs[:1]  # shape () to shape (): nothing to do on a tile
            else:
                problem = lowerable.problem(eqn.primitive)
                if problem is not None:
                    raise _unsupported(problem)
                result = eqn.primitive.bind(*_broadcast_all(inputs), **eqn.params)
                outs = list(result) if eqn.primitive.multiple_results else [result]
        for var, out in zip(eqn.outvars, outs, strict=True):
            env[var] = out
    return [value(v) for v in jaxpr.outvars]


def _view_op(name: str, eqn: Any, inputs: list[Any], reader: Reader) -> _View:
    """Scalar indexing of a closed-over array: ``dynamic_slice`` of size 1 per indexed
    axis (whole axes kept), then ``squeeze`` of the indexed axes."""
    view: _View = inputs[0]
    live = [n for n, s in enumerate(view.squeezed) if not s]  # axes the program sees
    if name == "dynamic_slice":
        starts = inputs[1:]
        sizes = eqn.params["slice_sizes"]
        axes = list(view.axes)
        for pos, size, start in zip(live, sizes, starts, strict=True):
            dim = view.shape[pos]
            if size == dim and dim != 1 and axes[pos] is None:
                continue  # the whole axis is kept
            if size != 1 or axes[pos] is not None:
                raise _unsupported(
                    f"a slice of size {size} of an axis of length {dim} of a closed-over "
                    "array (only single elements may be read)"
                )
            if isinstance(start, _View):
                start = reader(start)
            # dynamic_slice clamps its start into the array, so the kernel does too.
            axes[pos] = jnp.clip(jnp.asarray(start, jnp.int32), 0, dim - 1)
        return replace(view, axes=axes, squeezed=list(view.squeezed))
    if name == "squeeze":
        axes, squeezed = list(view.axes), list(view.squeezed)
        for d in eqn.params["dimensions"]:
            pos = live[d]
            if axes[pos] is None and view.shape[pos] != 1:
                raise _unsupported("a squeeze of a whole axis of a closed-over array")
            if axes[pos] is None:
                axes[pos] = jnp.int32(0)  # an axis of length 1 has one element to read
            squeezed[pos] = True
        return replace(view, axes=axes, squeezed=squeezed)
    raise _unsupported(f"{name!r} applied to a closed-over array")


def _const_views(
    program: ElementwiseProgram, const_refs: Sequence[Any], dtypes: Sequence[Any]
) -> list:
    views = []
    for n, (var, ref, dtype) in enumerate(
        zip(program.jaxpr.constvars, const_refs, dtypes, strict=True)
    ):
        shape = tuple(var.aval.shape)
        views.append(_View(ref, dtype, shape, [None] * len(shape), [False] * len(shape), n))
    return views


def evaluate_on_tile(
    program: ElementwiseProgram,
    const_refs: Sequence[Any],
    const_dtypes: Sequence[Any],
    *inputs: Any,
    reader: Reader = _read,
    lowerable: Lowerable = ANY_PRIMITIVE,
) -> Any:
    """A traced element-wise program on broadcastable input arrays: a ``mask_fn`` on
    ``(b, h, q, k)`` or a ``score_mod`` on ``(score, b, h, q, k)``. Its closed-over
    arrays are read from ``const_refs`` (Pallas refs in a kernel, or arrays: both are
    indexed alike) laid out by ``kernel_consts``, through ``reader``. The result has the
    inputs' broadcast shape. Every primitive it binds must be ``lowerable`` (the
    calling kernel's compiler has a rule for it).

    Raises:
        UnsupportedCallError: The program does something the evaluator cannot lower
            (the message says what; ``_tile_problem`` asks this first, by a trial trace).
    """
    views = _const_views(program, const_refs, const_dtypes)
    (out,) = _eval_tile_jaxpr(program.jaxpr, views, list(inputs), reader, lowerable)
    return jnp.broadcast_to(out, np.broadcast_shapes(*(jnp.shape(x) for x in inputs)))


@dataclass(frozen=True)
class ArrayRead:
    """One load of a closed-over floating array on a tile: which array, the index
    arrays per axis (scalars or broadcastable tiles) and the value loaded."""

    const: int
    index: tuple[Any, ...]
    value: Any


def recording_reader(arrays: Sequence[int], reads: list[ArrayRead]) -> Reader:
    """A reader that appends each load of the closed-over ``arrays`` to ``reads``."""

    def reader(view: _View) -> Any:
        value = _read(view)
        if view.const in arrays:
            reads.append(ArrayRead(view.const, tuple(view.axes), value))
        return value

    return reader


def replaying_reader(arrays: Sequence[int], values: Sequence[Any]) -> Reader:
    """A reader that returns ``values``, in order, for the loads of the closed-over
    ``arrays`` (as recorded by ``recording_reader`` on the same program and tile), so
    that a function of them can be differentiated."""
    pending = iter(values)

    def reader(view: _View) -> Any:
        return next(pending) if view.const in arrays else _read(view)

    return reader


def reader_for(
    arrays: Sequence[int], reads: list[ArrayRead] | None, values: Sequence[Any] | None
) -> Reader:
    """The reader of one evaluation: ``values`` replayed for the loads of the closed-over
    ``arrays`` when given, else those loads recorded into ``reads`` when given, else
    plain loads."""
    if values is not None:
        return replaying_reader(arrays, values)
    if reads is not None and arrays:
        return recording_reader(arrays, reads)
    return _read


def kernel_consts(consts: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """The closed-over arrays as kernel inputs (booleans as int32, 0-d as shape
    ``(1,)``) and their original dtypes."""
    arrays, dtypes = [], []
    for c in consts:
        c = jnp.asarray(c)
        dtypes.append(c.dtype)
        if c.dtype == jnp.bool_:
            c = c.astype(jnp.int32)
        arrays.append(c.reshape(1) if c.ndim == 0 else c)
    return arrays, dtypes


def tile_problem(
    program: ElementwiseProgram,
    consts: Sequence[Any],
    lowerable: Lowerable,
    *,
    with_score: bool,
    reads: list[ArrayRead] | None = None,
    recorded: Sequence[int] = (),
) -> str | None:
    """Why ``lowerable``'s kernel cannot evaluate ``program`` (a ``mask_fn``, or a
    ``score_mod`` when ``with_score``) on a tile's index vectors, or ``None`` when it
    can: a trial trace on the smallest tile, which appends its loads of the closed-over
    arrays ``recorded`` to ``reads``."""
    arrays, dtypes = kernel_consts(consts)
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
    reader = _read if reads is None else recording_reader(recorded, reads)

    def trial(cs: list[Any]) -> Any:
        q = jnp.zeros((_MIN_TILE, 1), jnp.int32)
        k = jnp.zeros((1, _MIN_TILE), jnp.int32)
        score = [jnp.zeros((_MIN_TILE, _MIN_TILE), _F32)] if with_score else []
        index = (jnp.int32(0), jnp.int32(0), q, k)
        return evaluate_on_tile(
            program, cs, dtypes, *score, *index, reader=reader, lowerable=lowerable
        )

    try:
        jax.eval_shape(trial, shapes)
    except UnsupportedCallError as err:
        what = str(err)
    except (TypeError, ValueError, NotImplementedError) as err:
        what = f"evaluating it on index vectors failed ({err})"
    else:
        return None
    return _refusal(lowerable.kernel, "score_mod" if with_score else "mask_fn", what)


def mask_program_problem(
    program: ElementwiseProgram | None, consts: Sequence[Any], lowerable: Lowerable
) -> str | None:
    """Why ``lowerable``'s kernel cannot evaluate ``program`` on tiles, or ``None``."""
    return None if program is None else tile_problem(program, consts, lowerable, with_score=False)
