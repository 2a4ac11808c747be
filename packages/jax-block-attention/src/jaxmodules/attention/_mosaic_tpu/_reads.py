"""Mosaic TPU backend, the closed-over arrays of a ``mask_fn``/``score_mod``: read before
the kernels, per query row or per key column, and handed to them as tiles.

Mosaic lowers no gather, so a kernel cannot load ``ids[b, q]`` at a vector of query
positions. But such a read varies only along the queries (or only along the keys): the
program is evaluated once outside the kernels on the whole position vectors (``b``,
``h``, ``q`` and ``k`` broadcast against each other), and each read's values, an array
that is 1 along the axes it does not vary on, become a kernel input whose BlockSpec
hands every step its ``(query block | 1, key block | 1)`` tile. Inside the kernels the
program is evaluated again on the tile, with those tiles replayed for its reads in
order (the evaluator is deterministic). XLA keeps only the reads of the outside
evaluation. A read that varies along both queries and keys (a table over ``q - k``, an
index computed from the score) would be a quadratic array: refused.

A read per query row is stored lane-dense, ``(.., 1, Lq)`` as the lse (a ``(.., Lq,
1)`` column is padded to 128 lanes in HBM by the TPU's (8, 128) tiling: 128 times its
size), widened to 32 bits, and turned back into a ``(query block, 1)`` column of its
own dtype in the kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._elementwise import ElementwiseProgram
from .._tile_program import Reader, _read, evaluate_on_tile, kernel_consts
from ._rules import MOSAIC_TPU

Array = Any
_TRIAL = (8, 128)  # one (sublanes, lanes) tile


class ReadSpec(NamedTuple):
    """One read of a closed-over array as a kernel input: which of (batch, head, query,
    key) it varies along, and the dtype the program reads (a boolean travels as int32,
    a query row of fewer than 32 bits widened)."""

    along: tuple[bool, bool, bool, bool]
    dtype: str

    @property
    def query_row(self) -> bool:
        """Varies along the queries only: stored lane-dense, ``(.., 1, Lq)``."""
        return self.along[2] and not self.along[3]


def read_problem(
    program: ElementwiseProgram, consts: Sequence[Any], *, with_score: bool
) -> str | None:
    """Why the kernels cannot take ``program``'s reads of its closed-over arrays (one
    varies along both queries and keys), or ``None``: a trial trace on one tile."""
    if not consts:
        return None
    arrays, dtypes = kernel_consts(consts)
    shapes: list[tuple[int, ...]] = []

    def reader(view: Any) -> Any:
        shapes.append(np.broadcast_shapes(*(jnp.shape(a) for a in view.axes)))
        return _read(view)

    def trial(cs: list[Any]) -> Any:
        q = jnp.zeros((_TRIAL[0], 1), jnp.int32)
        k = jnp.zeros((1, _TRIAL[1]), jnp.int32)
        score = [jnp.zeros(_TRIAL, jnp.float32)] if with_score else []
        index = (jnp.int32(0), jnp.int32(0), q, k)
        return evaluate_on_tile(
            program, cs, dtypes, *score, *index, reader=reader, lowerable=MOSAIC_TPU
        )

    jax.eval_shape(trial, [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays])
    if any(tuple(s[-2:]) == _TRIAL for s in shapes if len(s) >= 2):
        name = "score_mod" if with_score else "mask_fn"
        return (
            f"{name} reads a closed-over array at an index that varies with both the query "
            "and the key position (or with the score); the mosaic_tpu kernels read such "
            'arrays per query row or per key column only: use implementation="xla"'
        )
    return None


def outside_reads(
    program: ElementwiseProgram,
    consts: Sequence[Any],
    index: tuple[Array, Array, Array, Array],
    *,
    with_score: bool,
) -> tuple[list[Array], list[ReadSpec]]:
    """The values of every read of ``program`` on the whole ``index = (b, h, q, k)``
    (4-D, broadcast against each other), as 4-D kernel inputs, and their specs."""
    arrays, dtypes = kernel_consts(consts)
    values: list[Array] = []

    def reader(view: Any) -> Any:
        value = _read(view)
        values.append(value)
        return value

    score = [jnp.zeros((1, 1, 1, 1), jnp.float32)] if with_score else []
    evaluate_on_tile(program, arrays, dtypes, *score, *index, reader=reader)
    inputs, specs = [], []
    for value in values:
        value = jnp.asarray(value)
        value = value.reshape((1,) * (4 - value.ndim) + value.shape)
        b, h, q, k = (n > 1 for n in value.shape)
        spec = ReadSpec((b, h, q, k), jnp.dtype(value.dtype).name)
        inputs.append(_stored(value, spec))
        specs.append(spec)
    return inputs, specs


def _stored(value: Array, spec: ReadSpec) -> Array:
    """A read's values as the kernels take them: booleans as int32; a query row
    lane-dense ``(.., 1, Lq)`` and of 32 bits (the kernel turns it into a column: a
    relayout Mosaic makes for 32-bit rows, as for the lse)."""
    if value.dtype == jnp.bool_:
        value = value.astype(jnp.int32)
    if not spec.query_row:
        return value
    if value.dtype.itemsize < 4:
        wide = jnp.float32 if jnp.issubdtype(value.dtype, jnp.floating) else jnp.int32
        value = value.astype(wide)
    return jnp.swapaxes(value, 2, 3)


def replaying(refs: Sequence[Any], specs: Sequence[ReadSpec]) -> Reader:
    """A reader that returns, in order, the tiles of the reads made outside."""
    pending = iter(zip(refs, specs, strict=True))

    def reader(view: Any) -> Any:
        ref, spec = next(pending)
        # A lane-dense (1, query block) row becomes the (query block, 1) column.
        value = jnp.expand_dims(ref[0], -1) if spec.query_row else ref[...]
        if spec.dtype == "bool":
            return value != 0
        return value.astype(spec.dtype) if value.dtype != spec.dtype else value

    return reader
