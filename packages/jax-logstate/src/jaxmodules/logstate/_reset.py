"""Emptying logs between steps: by zeros (structure kept) or by `None` (structure changed)."""

from __future__ import annotations

from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodules.logstate._traverse import map_all_logs, map_logs

Tree = TypeVar("Tree")


@jax.jit
def _zeros_like_each(arrays: list[jax.Array]) -> list[jax.Array]:
    # One dispatch for all the logs of a state instead of one per array; cached per
    # shapes and dtypes, which a training loop keeps fixed.
    return [jnp.zeros_like(a) for a in arrays]


def _zeros_like(value: Any) -> Any:
    if isinstance(value, jax.core.Tracer):
        return jnp.zeros_like(value)
    if isinstance(value, jax.Array):
        return _zeros_for_arrays([value])[0]
    if isinstance(value, np.ndarray):
        return np.zeros_like(value)
    if isinstance(value, (np.generic, bool, int, float, complex)):
        return type(value)(0)
    raise TypeError(
        f"reset_logs: a Log holds a {type(value).__name__}, which has no zero; only arrays "
        "and numbers (or pytrees of them) can be reset, use clear_logs for other values"
    )


def _zeros_for_arrays(arrays: list[jax.Array]) -> list[jax.Array]:
    # Arrays committed to different devices cannot meet in one jitted call.
    groups: dict[Any, list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(a.sharding, []).append(i)
    zeros: list[Any] = [None] * len(arrays)
    for sharding, members in groups.items():
        made = _zeros_like_each([arrays[i] for i in members])
        for i, z in zip(members, made, strict=True):
            # Keep the placement, so a jitted step sees the same input shardings.
            zeros[i] = z if z.sharding == sharding else jax.device_put(z, sharding)
    return zeros


def reset_logs(tree: Tree) -> Tree:
    """The same tree with every Log's data set to zeros of the same shape and dtype.

    The tree structure, shapes, dtypes (weak types included) and, for jax arrays, the
    sharding are unchanged, so the result can go back into a jitted step without a new
    trace and can be the initial carry of `jax.lax.scan` or `jax.lax.while_loop` whose
    body writes Logs. It also works on traced values inside a jitted function. A Log whose
    data is a pytree has each leaf zeroed; cleared logs (`Log(None)`) stay cleared; jax
    arrays stay jax arrays, NumPy arrays and Python numbers keep their types. The input is
    not mutated.

    Args:
        tree: any pytree or plain object, possibly holding `Log`s at any depth.

    Returns:
        The tree with zeroed Logs.

    Raises:
        TypeError: if a Log holds something that is neither an array nor a number.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxmodules.logstate import Log, reset_logs
        >>> state = {"loss": Log(jnp.full((2, 3), 7.0)), "steps": Log(5), "note": Log(None)}
        >>> fresh = reset_logs(state)
        >>> fresh["loss"].data.shape, fresh["loss"].data.dtype, float(fresh["loss"].data.sum())
        ((2, 3), dtype('float32'), 0.0)
        >>> fresh["steps"], fresh["note"]
        (Log(0), Log(None))
    """
    return map_all_logs(_zeros_for_all, tree, batched=True)


def _zeros_for_all(datas: list[Any]) -> list[Any]:
    concrete = [
        leaf
        for data in datas
        for leaf in jax.tree_util.tree_leaves(data)
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
    ]
    zero_of = {id(a): z for a, z in zip(concrete, _zeros_for_arrays(concrete), strict=True)}

    def zero(value: Any) -> Any:
        found = zero_of.get(id(value))
        return _zeros_like(value) if found is None else found

    return [jax.tree_util.tree_map(zero, data) for data in datas]


def clear_logs(tree: Tree) -> Tree:
    """The same tree with every Log's data replaced by `None`: `map_logs(lambda x: None, tree)`.

    A cleared `Log(None)` has no leaves, so it frees the arrays the logs held and the
    cleared state prints, pickles and checkpoints without stale values. The tree
    structure changes, though: a jitted step traces again when its input flips between
    filled and cleared logs, and a scan or while-loop carry must keep one structure; use
    `reset_logs` there.

    Args:
        tree: any pytree or plain object, possibly holding `Log`s at any depth.

    Returns:
        The tree with every Log cleared.

    Examples:
        >>> import jax
        >>> from jaxmodules.logstate import Log, clear_logs
        >>> state = {"loss": Log(0.5), "w": 2.0}
        >>> clear_logs(state)
        {'loss': Log(None), 'w': 2.0}
        >>> jax.tree_util.tree_leaves(clear_logs(state))
        [2.0]
    """
    return map_logs(lambda data: None, tree)
