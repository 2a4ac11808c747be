"""From Logs on the device to values a logger takes: Python numbers and NumPy arrays."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodules.logstate._names import check_sep, named_logs, path_name


class SummaryWriterLike(Protocol):
    """What `write_tensorboard` needs from a writer (tensorboardX's `SummaryWriter` has it)."""

    def add_scalar(self, tag: str, scalar_value: Any, global_step: int | None = ...) -> Any: ...

    def add_histogram(self, tag: str, values: Any, global_step: int | None = ...) -> Any: ...


def fetch_logs(tree: Any, *, sep: str = ".") -> dict[str, Any]:
    """The named logs of a tree as host values, fetched from the device in one transfer.

    Names are those of `named_logs` (cleared logs are left out). A Log whose data is a
    pytree (say `Log({"mean": m, "max": M})`) gives one entry per leaf, named with the
    leaf's path appended (`"acts.mean"`, `"acts.max"`). Every array is copied to the host
    by a single `jax.device_get`, so the transfers overlap and the call waits once.
    Scalars (0-d arrays and NumPy scalars) come back as Python `float`, `int`, `bool` or
    `complex`; other arrays as `numpy.ndarray`. A Log
    stacked by `lax.scan` is an array over the steps.

    Args:
        tree: any pytree or plain object, possibly holding `Log`s at any depth. Call it
            outside `jit`, on the state a jitted step returned.
        sep: the text between path elements, as in `named_logs`.

    Returns:
        `{name: value}`, ready for `wandb.log`, a CSV writer or `write_tensorboard`.

    Raises:
        TypeError: if a Log holds a traced value (`fetch_logs` was called inside a
            transformation), or if `sep` is not a string.
        ValueError: if two values get the same name (see `named_logs`).

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxmodules.logstate import Log, fetch_logs
        >>> state = {"loss": Log(jnp.float32(0.25)), "acts": Log({"max": jnp.arange(3)})}
        >>> fetch_logs(state)
        {'acts.max': array([0, 1, 2], dtype=int32), 'loss': 0.25}
    """
    sep = check_sep(sep, "fetch_logs")
    entries: dict[str, Any] = {}
    for name, data in named_logs(tree, sep=sep).items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(data)[0]:
            full_name = f"{name}{sep}{path_name(path, sep)}" if path else name
            if full_name in entries:
                raise ValueError(
                    f"fetch_logs: two values are both named {full_name!r}; one is a leaf "
                    f"of the Log named {name!r}. Give one of the Logs another name with "
                    "Log(..., name=...)"
                )
            if isinstance(leaf, jax.core.Tracer):
                raise TypeError(
                    f"fetch_logs: the Log {full_name!r} holds a traced value; call fetch_logs "
                    "outside jit/vmap/scan, on the state the jitted step returned"
                )
            entries[full_name] = leaf
    on_host = jax.device_get(list(entries.values()))
    return {name: _to_python(value) for name, value in zip(entries, on_host, strict=True)}


def _to_python(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _is_real(dtype: np.dtype[Any]) -> bool:
    # jnp.issubdtype also knows the ml_dtypes floats (bfloat16, float8, ...).
    return any(jnp.issubdtype(dtype, kind) for kind in (jnp.bool_, jnp.integer, jnp.floating))


def write_tensorboard(
    writer: SummaryWriterLike, tree: Any, step: int, *, prefix: str = "", sep: str = "."
) -> dict[str, Any]:
    """Write the logs of a tree to TensorBoard: scalars as scalars, arrays as histograms.

    Takes any writer with tensorboardX's `add_scalar` / `add_histogram` methods (for
    instance `tensorboardX.SummaryWriter`, installed by this package's `tensorboard`
    extra); this package itself never imports a TensorBoard library. Values come from
    `fetch_logs`, so the device is synchronised once; tags are `prefix + name`. Empty
    arrays are skipped, since a histogram needs values. The writer is not flushed.

    Args:
        writer: the summary writer.
        tree: any pytree or plain object holding `Log`s, outside `jit`.
        step: the global step recorded with every value.
        prefix: prepended to every tag, e.g. `"train/"`.
        sep: the text between path elements, as in `named_logs`; `"/"` groups a module's
            logs under one heading in TensorBoard.

    Returns:
        The values written, as `fetch_logs` returns them (handy for printing too).

    Raises:
        TypeError: for a value TensorBoard cannot plot (a complex number or array), before
            anything is written; also if `writer` lacks `add_scalar` or `add_histogram`,
            `step` is not an int or `prefix` not a str.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxmodules.logstate import Log, write_tensorboard
        >>> class PrintingWriter:
        ...     def add_scalar(self, tag, value, step):
        ...         print("scalar", tag, value, step)
        ...     def add_histogram(self, tag, values, step):
        ...         print("histogram", tag, values.shape, step)
        >>> state = {"loss": Log(0.5), "grads": Log(jnp.array([1.0, 2.0, 4.0]))}
        >>> _ = write_tensorboard(PrintingWriter(), state, step=3, prefix="train/")
        histogram train/grads (3,) 3
        scalar train/loss 0.5 3
    """
    missing = [m for m in ("add_scalar", "add_histogram") if not callable(getattr(writer, m, None))]
    if missing:
        raise TypeError(
            f"write_tensorboard: writer must be a summary writer with add_scalar and "
            f"add_histogram methods (tensorboardX.SummaryWriter, for instance), got "
            f"{type(writer).__name__} {writer!r:.60}, which lacks {' and '.join(missing)}"
        )
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"write_tensorboard: step must be an int, got {type(step).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"write_tensorboard: prefix must be a str, got {type(prefix).__name__}")
    values = fetch_logs(tree, sep=sep)
    # Every value is checked before the first is written: a bad one leaves no partial step.
    writes: list[tuple[Callable[..., Any], str, Any]] = []
    for name, value in values.items():
        tag = prefix + name
        if isinstance(value, (bool, int, float)):
            writes.append((writer.add_scalar, tag, float(value)))
        elif isinstance(value, np.ndarray) and _is_real(value.dtype):
            if value.size:
                writes.append((writer.add_histogram, tag, value.astype(np.float64)))
        else:
            kind = f"{value.dtype} array" if isinstance(value, np.ndarray) else type(value).__name__
            raise TypeError(
                f"write_tensorboard: the log {tag!r} holds a {kind}; TensorBoard takes real "
                "numbers and real arrays only, convert it in the step or drop it; nothing "
                "was written"
            )
    for write, tag, value in writes:
        write(tag, value, int(step))
    return values
