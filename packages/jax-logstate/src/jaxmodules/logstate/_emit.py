"""The `emit` primitive, its transformation rules, and the naming state `scope` edits.

`emit(name, value)` binds the primitive `emit_p` only while `collect` is tracing its
function; everywhere else it returns at once and the program gets no operation. The
primitive has no outputs, so it carries an effect (`EmitEffect`) to survive jax's dead
code elimination, and that effect is registered with jax's allow-lists for control flow,
`custom_jvp`/`custom_vjp` and `checkpoint`. Its rules:

- abstract evaluation: no outputs, the effect;
- JVP: the primal values are emitted, tangents ignored, so an emitted value never changes
  a gradient (and under `checkpoint`, the emit stays in the forward pass: jax keeps
  effectful operations out of the recomputation);
- batching: the value is emitted with the mapped axis in front; a value that does not
  depend on the mapped input is broadcast, so every `vmap` adds its axis to the log;
- lowering: an error, since `collect` removes every `emit` before compilation.

Whether `emit` binds, and the prefix `scope` gives names, live in one jax configuration
state that is part of jax's tracing cache keys. A function jitted inside `collect` (or a
`scan` body) is therefore traced again rather than reused from a trace made outside it,
and the other way round, and the same function traced under two scopes gets both names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

# jax keeps the effect allow-lists and its configuration states private: there is no
# public way to register an effect with control flow, or to add a state to the trace keys.
# Every private name used here is listed in PRIVATE_JAX and imported by a test, so a jax
# that moves one fails that test by name.
from jax._src import config as _jax_config
from jax._src import effects as _jax_effects
from jax.extend.core import Primitive
from jax.interpreters import ad, mlir
from jax.interpreters import batching as _batching

from jaxmodules.logstate._log import check_data
from jaxmodules.logstate._names import check_text

try:
    from jax.extend.core import Effect
except ImportError:  # pragma: no cover - jax before jax.extend.core.Effect
    Effect = _jax_effects.Effect  # type: ignore[misc]

if not hasattr(_batching, "fancy_primitive_batchers"):  # pragma: no cover - older jax
    from jax._src.interpreters import batching as _batching  # type: ignore[no-redef]

# (module, name): the private jax names this package uses, and what for.
# The oldest jax each is needed on: the package imports on jax 0.5, collect runs on 0.8.
PRIVATE_JAX = (
    ("jax._src.config", "string_or_object_state", (0, 5)),  # the naming state, in trace keys
    ("jax._src.config", "trace_context", (0, 5)),  # probing that it is (SUPPORTED)
    ("jax._src.effects", "control_flow_allowed_effects", (0, 5)),  # emit inside scan / cond
    ("jax._src.effects", "custom_derivatives_allowed_effects", (0, 5)),  # custom_jvp / vjp
    ("jax._src.effects", "remat_allowed_effects", (0, 5)),  # inside checkpoint
    ("jax._src.effects", "partial_eval_kept_effects", (0, 8)),  # a scan body under grad
)


class EmitEffect(Effect):
    """The effect of `emit`: keeps the operation alive through dead-code elimination."""

    def __repr__(self) -> str:
        return "Emit"

    __str__ = __repr__


emit_effect = EmitEffect()
for _allowed in (
    "control_flow_allowed_effects",
    "custom_derivatives_allowed_effects",
    "remat_allowed_effects",
    # Keeps an emit that partial evaluation stages out with no output depending on it
    # (a scan body's loop-variant part, when differentiating). Older jax, where collect
    # refuses to run, lacks it.
    "partial_eval_kept_effects",
):
    if hasattr(_jax_effects, _allowed):
        getattr(_jax_effects, _allowed).add_type(EmitEffect)

emit_p = Primitive("emit")
emit_p.multiple_results = True


def _abstract_eval(*avals: Any, name: str, tree: Any) -> tuple[list[Any], set[Any]]:
    del avals, name, tree
    return [], {emit_effect}


emit_p.def_effectful_abstract_eval(_abstract_eval)


def _impl(*values: Any, name: str, tree: Any) -> list[Any]:
    # Reached only by evaluating a traced program by hand (jax.core.eval_jaxpr) outside
    # collect: nothing collects the value there.
    del values, name, tree
    return []


emit_p.def_impl(_impl)


def _jvp(primals: Any, tangents: Any, **params: Any) -> tuple[list[Any], list[Any]]:
    del tangents
    emit_p.bind(*primals, **params)
    return [], []


ad.primitive_jvps[emit_p] = _jvp


def _transpose(cotangents: Any, *args: Any, **params: Any) -> list[None]:
    del cotangents, params
    return [None] * len(args)


ad.primitive_transposes[emit_p] = _transpose


def _batch(axis_data: Any, values: Any, dims: Any, **params: Any) -> tuple[list[Any], list[Any]]:
    size = axis_data.size
    front = [
        jnp.moveaxis(v, d, 0) if d is not None else jnp.broadcast_to(v, (size, *jnp.shape(v)))
        for v, d in zip(values, dims, strict=True)
    ]
    emit_p.bind(*front, **params)
    return [], []


if hasattr(_batching, "fancy_primitive_batchers"):
    # Called even when no input is mapped, which is what lets an unmapped value get the
    # batch axis like a hand-threaded output would.
    _batching.fancy_primitive_batchers[emit_p] = _batch
else:  # pragma: no cover - every supported jax has the fancy batchers

    def _plain_batch(values: Any, dims: Any, **params: Any) -> tuple[list[Any], list[Any]]:
        size = next(v.shape[d] for v, d in zip(values, dims, strict=True) if d is not None)
        return _batch(type("_Axis", (), {"size": size}), values, dims, **params)

    _batching.primitive_batchers[emit_p] = _plain_batch


def _lowering(ctx: Any, *args: Any, name: str, tree: Any) -> Any:
    raise ValueError(
        f"emit({name!r}) reached compilation: it was traced inside collect but ended up in "
        "a program collect did not run (for instance a function jitted inside collect and "
        "called again outside it through an exported or cached trace); call it inside "
        "collect"
    )


mlir.register_lowering(emit_p, _lowering)


# --------------------------------------------------------------------- naming state

# None: not collecting, emit does nothing. A string: collecting, and the prefix of names
# ("" at the top of a collect). Part of jax's trace keys, see the module docstring.
_STATE_NAME = "jaxmodules_logstate_emit_prefix"
_STATE_HELP = "Internal to jaxmodules.logstate: the name prefix while collect traces."
try:
    _NAMING = _jax_config.string_or_object_state(
        name=_STATE_NAME,
        default=None,
        help=_STATE_HELP,
        include_in_jit_key=True,
        include_in_trace_context=True,
    )
except TypeError:  # older jax: the state exists, but may not reach the trace keys
    _NAMING = _jax_config.string_or_object_state(name=_STATE_NAME, default=None, help=_STATE_HELP)
    _callbacks = getattr(_jax_config, "register_trace_context_callback", None)
    if _callbacks is not None:
        _callbacks.append(lambda: _NAMING.value)


def _state_in_trace_keys() -> bool:
    with _NAMING("probe"):
        probed = _jax_config.trace_context()
    return bool(probed != _jax_config.trace_context())


# Without it, a function jitted outside collect would be reused, emits missing, inside
# it; so collect refuses to run (jax 0.8 and newer have it).
SUPPORTED = _state_in_trace_keys()


def current_prefix() -> str | None:
    """The prefix names get while `collect` traces; None when no `collect` is tracing."""
    return _NAMING.value


@contextlib.contextmanager
def naming(prefix: str | None) -> Iterator[None]:
    """Set the naming state (None: emits off) for the duration of the block."""
    with _NAMING(prefix):
        yield


def check_name(name: object, who: str) -> str:
    return check_text(name, "the name", who)


def check_prefix(prefix: object) -> str:
    """A scope's prefix: names join it with ".", so a dot at either end or two in a row
    would give names like "layer..a"."""
    text = check_text(prefix, "the prefix", "scope")
    if "" in text.split("."):
        raise ValueError(
            f"scope: the prefix {prefix!r} has an empty part between dots (a dot at the "
            "start or end, or two in a row); names are joined to it with '.', so write "
            f"scope({'.'.join(p for p in text.split('.') if p)!r})"
        )
    return text


def emit(name: str, value: Any) -> None:
    """Record `value` under `name` for the enclosing `collect`; outside one, do nothing.

    Call it anywhere in the code `collect` runs: inside layers, `jax.jit`-ed functions,
    `lax.scan` bodies, `lax.cond` branches, `vmap`-ed or `checkpoint`-ed functions. The
    value comes out of `collect` as `Log(value, name=full_name)`, where `full_name` is
    `name` behind the prefixes of the enclosing `scope`s. Inside a `scan` body the value
    is stacked over the iterations; inside a `vmap` it gets the mapped axis (see
    `collect` for the exact shapes). An emitted value never changes a gradient.

    Outside `collect` the call returns at once: no operation is added to the program, so
    the same model code runs with or without logging.

    Args:
        name: the value's name, a non-empty string (joined behind the enclosing scopes
            with `"."`).
        value: an array, a Python number, or a pytree of them (what `Log` accepts).

    Raises:
        TypeError: if `name` is not a string, or `value` is something `Log` refuses (a
            string, an arbitrary object, a `Log`, or no arrays at all).
        ValueError: if `name` is empty.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxmodules.logstate import collect, emit
        >>> def f(x):
        ...     emit("mean", jnp.mean(x))
        ...     return 2 * x
        >>> out, logs = collect(f)(jnp.arange(4.0))
        >>> logs["mean"]
        Log(Array(1.5, dtype=float32), name='mean')
        >>> f(jnp.arange(4.0))  # outside collect, emit does nothing
        Array([0., 2., 4., 6.], dtype=float32)
    """
    check_name(name, "emit")
    who = f"emit({name!r})"
    check_data(value, who)
    leaves, tree = jax.tree_util.tree_flatten(value)
    if not leaves:
        raise TypeError(f"{who}: the value holds no arrays or numbers (got {value!r})")
    prefix = current_prefix()
    if prefix is None:
        return
    full = f"{prefix}.{name}" if prefix else name
    emit_p.bind(*(jnp.asarray(leaf) for leaf in leaves), name=full, tree=tree)


@contextlib.contextmanager
def scope(prefix: str) -> Iterator[None]:
    """Prefix the names of the values emitted inside the block with `prefix + "."`.

    Scopes nest (`scope("layers.0")` inside `scope("model")` gives `model.layers.0.x`),
    so the same layer code, called once per layer under its own scope, emits distinct
    names. Names are relative to the innermost `collect`: a `collect` inside a scope
    starts again from no prefix. Outside `collect` a scope does nothing.

    Args:
        prefix: a non-empty string; it may itself contain dots, between non-empty parts
            (`"layers.0"`, not `"layers."`: the dot that joins names is added for you).

    Raises:
        TypeError: if `prefix` is not a string.
        ValueError: if `prefix` is empty, or starts or ends with a dot, or has two in a row.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxmodules.logstate import collect, emit, scope
        >>> def f(x):
        ...     for i in range(2):
        ...         with scope(f"layers.{i}"):
        ...             emit("norm", jnp.linalg.norm(x))
        ...             x = 2 * x
        ...     return x
        >>> list(collect(f)(jnp.ones(4))[1])
        ['layers.0.norm', 'layers.1.norm']
    """
    check_prefix(prefix)
    outer = current_prefix()
    if outer is None:
        yield
        return
    with naming(f"{outer}.{prefix}" if outer else prefix):
        yield
