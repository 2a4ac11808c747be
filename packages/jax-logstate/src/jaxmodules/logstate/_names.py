"""Names for Logs: their path in the tree, or the name they were given."""

from __future__ import annotations

from typing import Any

import jax

from jaxmodules.logstate._traverse import KeyPath, find_logs

ROOT_NAME = "log"


def key_name(key: Any) -> str:
    """One path element as text: a dict key, an attribute or field name, or an index."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)  # a key type of some custom pytree node


def path_name(path: KeyPath, sep: str) -> str:
    return sep.join(key_name(key) for key in path)


def describe_path(path: KeyPath) -> str:
    return jax.tree_util.keystr(path) if path else "the root of the tree"


def check_text(value: object, what: str, caller: str) -> str:
    """``value`` when it is a non-empty str (a name, a prefix, a separator); else a
    TypeError or ValueError that names the ``caller`` and ``what`` it takes."""
    if not isinstance(value, str):
        raise TypeError(f"{caller}: {what} must be a str, got {type(value).__name__} {value!r}")
    if not value:
        raise ValueError(f"{caller}: {what} must be a non-empty string, got ''")
    return value


def check_sep(sep: object, caller: str) -> str:
    return check_text(sep, "sep", caller)


def named_logs(tree: Any, *, sep: str = ".") -> dict[str, Any]:
    """The `Log`s of a tree as `{name: data}`, in the order of `list_of_logs`.

    A Log's name is its path in the tree, one element per level joined by `sep`: dict keys
    (as `str(key)`), attribute and field names (of plain objects, dataclasses,
    NamedTuples, equinox Modules, ...) and sequence indices as numbers, so
    `{"model": {"layers": [..., ..., Block(attn=Attn(entropy=Log(e)))]}}` gives
    `"model.layers.2.attn.entropy"`. A Log made with `Log(x, name="loss")` is called
    `"loss"` instead, wherever it sits, and a Log that is the whole tree is called `"log"`
    unless it has a name.

    Cleared logs (`Log(None)`) are left out: there is nothing to write for them.

    Args:
        tree: any pytree or plain object, possibly holding `Log`s at any depth.
        sep: the text between path elements; `"/"` makes TensorBoard group the logs of
            one module under one heading.

    Returns:
        A dict from name to the Log's data (arrays are returned as they are, on device).

    Raises:
        ValueError: if two Logs get the same name (for instance an explicit name that is
            also another Log's path, or dict keys `"a.b"` next to `"a"` holding `"b"`);
            the message gives both paths. Names are never changed behind your back.
        TypeError: if `sep` is not a string.

    Examples:
        >>> from jaxmodules.logstate import Log, named_logs
        >>> state = {"model": {"layers": [{"norm": Log(1.0)}, {"norm": Log(2.0)}]},
        ...          "total": Log(3.0, name="loss")}
        >>> named_logs(state)
        {'model.layers.0.norm': 1.0, 'model.layers.1.norm': 2.0, 'loss': 3.0}
        >>> list(named_logs(state, sep="/"))
        ['model/layers/0/norm', 'model/layers/1/norm', 'loss']
    """
    sep = check_sep(sep, "named_logs")
    logs, paths = find_logs(tree, with_paths=True)
    named: dict[str, Any] = {}
    origins: dict[str, tuple[KeyPath, bool]] = {}
    for log, path in zip(logs, paths, strict=True):
        if log.data is None:
            continue
        explicit = log.name is not None
        name = log.name if log.name is not None else (path_name(path, sep) or ROOT_NAME)
        if name in named:
            first_path, first_explicit = origins[name]
            raise ValueError(
                f"named_logs: two Logs are both named {name!r}: the Log at "
                f"{describe_path(first_path)}{' (explicit name)' if first_explicit else ''} "
                f"and the Log at {describe_path(path)}{' (explicit name)' if explicit else ''}; "
                "give one of them another name with Log(..., name=...)"
            )
        named[name] = log.data
        origins[name] = (path, explicit)
    return named
