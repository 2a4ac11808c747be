"""`collect`: run a function and gather every value it `emit`s, as named `Log`s.

How it works (the `emit` primitive and its rules are in `_emit.py`):

1. **Trace.** `fn` is traced to a jaxpr with `jax.make_jaxpr` while the naming state says
   "collecting", so each `emit` leaves an `emit` equation wherever it was called: in the
   top-level program or inside the sub-programs of `jit`, `scan`, `cond`, ... Tracing sees
   the program after any transformation used inside `fn` (`grad`, `vmap`, `checkpoint`),
   so the emits are already where those transformations put them.
2. **Re-evaluate.** The jaxpr is evaluated again, equation by equation, binding each
   primitive on the caller's own values, so `collect(fn)` is an ordinary function that
   `jit`, `vmap`, `grad` and friends transform like any other. An `emit` equation records
   its operands. An equation whose sub-programs hold no `emit` is bound unchanged. An
   equation that holds one is rebuilt through jax's public API, with the emitted values
   as extra outputs of its sub-program:

   - `pjit` / `jit`: the same primitive bound with every parameter it had (donation,
     shardings, layouts, compiler options, mesh), on the program with the emitted values
     as extra outputs.
   - `scan` (also `fori_loop` with static bounds, `lax.map`): rebuilt with `lax.scan`;
     emitted values become per-iteration outputs, stacked on a new leading axis.
   - `cond` (`lax.cond`, `lax.switch`): rebuilt with `lax.switch`; the taken branch's
     values. Every branch must emit the same names, shapes and dtypes.
   - `remat2` (`jax.checkpoint`): the same primitive and parameters (policy,
     `prevent_cse`, `differentiated`), on the program with the extra outputs.
   - `custom_jvp_call`, `custom_vjp_call` (`custom_vjp_call_jaxpr` in older jax): the same
     primitive, bound on the function without its emits, so the custom rule is kept; the
     emitted values come from evaluating the function once more on inputs cut from
     differentiation (only what they need survives dead-code elimination).
   - `shard_map`: rebuilt with `jax.shard_map`; one value per device, stacked on a new
     leading axis sharded over the manual mesh axes.
   - `closed_call`, `core_call`: inlined.
   - `while` (`lax.while_loop`, `fori_loop` with traced bounds): a ValueError, since the
     number of iterations is unknown; the message suggests `scan`.
   - anything else: a ValueError naming the primitive. An emit is never dropped.

   A name may be emitted once per `collect` (once per iteration inside a scan, once per
   branch that can run inside a cond); a second emit of it is a ValueError.
3. **Carry updates back.** The arguments are flattened and rebuilt for the trace, and
   the function's in-place updates of nnx objects among them are passed out of the
   program and written back to the caller's objects (`_carry.py`).
4. Every recorded value goes through `lax.stop_gradient` and becomes
   `Log(value, name=name)`, in the order of first emission.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from jaxmodules.logstate._carry import Arguments, fn_name, is_dynamic
from jaxmodules.logstate._emit import SUPPORTED, emit_p, naming
from jaxmodules.logstate._log import Log

try:  # keeps each rebuilt operation's source location and name stack, as eval_jaxpr does
    from jax.extend import source_info_util as _source_info
except ImportError:  # pragma: no cover - older jax
    from jax._src import source_info_util as _source_info  # type: ignore[no-redef]

R = TypeVar("R")


class _Record(NamedTuple):
    name: str
    tree: Any  # the value's PyTreeDef
    leaves: list[Any]


class _Meta(NamedTuple):
    name: str
    tree: Any
    n_leaves: int


def _leaf_types(leaves: Sequence[Any]) -> tuple[tuple[tuple[int, ...], Any], ...]:
    return tuple((tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves)


class _Level:
    """The values emitted at one scan level, by name, in the order of first emission."""

    def __init__(self, discard: bool = False) -> None:
        self.records: dict[str, _Record] = {}
        self.discard = discard  # evaluating a function only for its outputs

    def add(self, name: str, tree: Any, leaves: list[Any]) -> None:
        if self.discard:
            return
        if name in self.records:
            raise ValueError(
                f"emit({name!r}): this name is emitted twice in one collect at the same "
                "scan level (a name is recorded once per collect, once per iteration inside "
                "a scan); give the two emits different names, for instance with "
                "scope(...) around code that runs once per layer. (A lax.cond whose "
                "predicate is batched by a vmap inside collect runs every branch: put "
                "that vmap outside collect instead.)"
            )
        self.records[name] = _Record(name, tree, list(leaves))

    def meta(self) -> list[_Meta]:
        return [_Meta(r.name, r.tree, len(r.leaves)) for r in self.records.values()]

    def leaves(self, order: Sequence[str] | None = None) -> list[Any]:
        names = list(self.records) if order is None else order
        return [x for name in names for x in self.records[name].leaves]

    def extend(self, meta: Sequence[_Meta], leaves: Sequence[Any]) -> None:
        """Add values that a rebuilt sub-program passed out as extra outputs."""
        it = iter(leaves)
        for m in meta:
            self.add(m.name, m.tree, [next(it) for _ in range(m.n_leaves)])


def _closed(jaxpr: Any) -> Any:
    return jaxpr if isinstance(jaxpr, ClosedJaxpr) else ClosedJaxpr(jaxpr, ())


def _sub_jaxprs(params: dict[str, Any]) -> Iterator[Any]:
    for value in params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, Jaxpr):
                yield item


@contextlib.contextmanager
def _context_of(eqn: Any) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        info = eqn.source_info
        stack.enter_context(
            _source_info.user_context(
                info.traceback,
                name_stack=_source_info.current_name_stack() + info.name_stack,
            )
        )
        ctx = getattr(eqn, "ctx", None)
        if ctx is not None:
            stack.enter_context(ctx.manager)
        yield


def _bind(primitive: Any, params: dict[str, Any], invals: Sequence[Any]) -> Any:
    bind_params = primitive.get_bind_params(params)
    if isinstance(bind_params, tuple):  # jax before 0.7: (sub-functions, parameters)
        subfuns, bind_params = bind_params
        return primitive.bind(*subfuns, *invals, **bind_params)
    return primitive.bind(*invals, **bind_params)


def _cut(x: Any) -> Any:
    """`stop_gradient` where it applies (integer, boolean and key arrays pass as they are)."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.inexact):
        return lax.stop_gradient(x)
    return x


def _scan_split(params: dict[str, Any], n_in: int) -> tuple[int, int]:
    """(number of consts, number of carries) of a scan equation."""
    if "num_consts" in params:  # jax up to 0.11
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].update(list(range(n_in))).unpack()
    return len(list(consts)), len(list(carry))


# The parameters of each equation kind collect rebuilds, every one of which it keeps (or
# refuses where it cannot: a platform-dependent cond, a scan with _split_transpose).
# `linear` (scan) is a hint for transposition that a rebuilt scan recomputes. A test
# compares these with the parameters the installed jax's equations carry.
KNOWN_PARAMS = {
    "jit": {
        "jaxpr",
        "in_shardings",
        "out_shardings",
        "in_layouts",
        "out_layouts",
        "donated_invars",
        "ctx_mesh",
        "name",
        "keep_unused",
        "inline",
        "compiler_options_kvs",
    },
    "scan": {
        "reverse",
        "length",
        "jaxpr",
        "unroll",
        "ft_in",
        "ft_out",
        "num_consts",
        "num_carry",
        "linear",
        "_split_transpose",
    },
    "cond": {"branches", "branches_platforms"},
    "remat2": {"jaxpr", "prevent_cse", "differentiated", "policy"},
    "custom_jvp_call": {
        "call_jaxpr",
        "jvp_jaxpr_fun",
        "jvp_jaxpr_thunk",
        "num_consts",
        "symbolic_zeros",
    },
    "custom_vjp_call": {
        "call_jaxpr",
        "fwd_jaxpr_thunk",
        "num_consts",
        "bwd",
        "out_trees",
        "symbolic_zeros",
    },
    "shard_map": {
        "mesh",
        "in_specs",
        "out_specs",
        "jaxpr",
        "check_vma",
        "newly_manual_axes",
        "manual_axes",
        "axis_names",
    },
}
KNOWN_PARAMS["pjit"] = KNOWN_PARAMS["jit"]

_SUPPORTED = (
    "jit/pjit, scan (fori_loop with static bounds, lax.map), cond/switch, checkpoint/remat, "
    "custom_jvp, custom_vjp, shard_map"
)


class _Interpreter:
    """Evaluates a jaxpr on real values, threading emitted values out of sub-programs."""

    def __init__(self) -> None:
        self._holds: dict[int, bool] = {}
        self._keep: list[Any] = []  # keeps memoised jaxprs alive, so ids stay unique

    # ------------------------------------------------------------------ inspection

    def holds_emit(self, jaxpr: Any) -> bool:
        key = id(jaxpr)
        if key not in self._holds:
            self._keep.append(jaxpr)
            self._holds[key] = any(
                eqn.primitive is emit_p or self.eqn_holds_emit(eqn) for eqn in jaxpr.eqns
            )
        return self._holds[key]

    def eqn_holds_emit(self, eqn: Any) -> bool:
        return any(self.holds_emit(j) for j in _sub_jaxprs(eqn.params))

    def emit_names(self, jaxpr: Any) -> list[str]:
        names: list[str] = []
        for eqn in jaxpr.eqns:
            if eqn.primitive is emit_p:
                names.append(eqn.params["name"])
            for sub in _sub_jaxprs(eqn.params):
                names += self.emit_names(sub)
        return names

    def first_emit(self, eqn: Any) -> str:
        names = [n for j in _sub_jaxprs(eqn.params) for n in self.emit_names(j)]
        return names[0] if names else "?"

    # ------------------------------------------------------------------ evaluation

    def eval_closed(self, closed: Any, args: Sequence[Any], level: _Level) -> list[Any]:
        closed = _closed(closed)
        return self.eval(closed.jaxpr, closed.consts, args, level)

    def eval(
        self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], level: _Level
    ) -> list[Any]:
        env: dict[Any, Any] = {}

        def read(v: Any) -> Any:
            return v.val if isinstance(v, Literal) else env[v]

        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = value
        for var, value in zip(jaxpr.invars, args, strict=True):
            env[var] = value
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            if eqn.primitive is emit_p:
                level.add(eqn.params["name"], eqn.params["tree"], invals)
                continue
            with _context_of(eqn):
                if not self.eqn_holds_emit(eqn):
                    outs = _bind(eqn.primitive, eqn.params, invals)
                else:
                    outs = self.rebuild(eqn, invals, level)
            if not eqn.primitive.multiple_results:
                outs = [outs]
            for var, value in zip(eqn.outvars, outs, strict=True):
                env[var] = value
        return [read(v) for v in jaxpr.outvars]

    def run_sub(
        self, closed: Any, box: list[list[_Meta]], discard: bool = False
    ) -> Callable[..., tuple[list[Any], list[Any]]]:
        """A function evaluating `closed`; returns (outputs, emitted leaves), metadata in box."""

        def run(*args: Any) -> tuple[list[Any], list[Any]]:
            sub = _Level(discard)
            outs = self.eval_closed(closed, args, sub)
            box.append(sub.meta())
            return list(outs), sub.leaves()

        return run

    def rebuild(self, eqn: Any, invals: list[Any], level: _Level) -> list[Any]:
        name = eqn.primitive.name
        if name in ("pjit", "jit"):
            return self.rebuild_jit(eqn, invals, level)
        if name == "scan":
            return self.rebuild_scan(eqn, invals, level)
        if name == "cond":
            return self.rebuild_cond(eqn, invals, level)
        if name in ("remat2", "checkpoint"):
            return self.rebuild_remat(eqn, invals, level)
        if name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
            return self.rebuild_custom(eqn, invals, level)
        if name == "shard_map":
            return self.rebuild_shard_map(eqn, invals, level)
        if name in ("closed_call", "core_call"):
            return self.eval_closed(eqn.params["call_jaxpr"], invals, level)
        if name == "while":
            raise ValueError(
                f"emit({self.first_emit(eqn)!r}) is inside a lax.while_loop (or a "
                "lax.fori_loop with traced bounds): a while loop runs an unknown number of "
                "times, so collect cannot stack its values. Use lax.scan, or fori_loop with "
                "Python int bounds (jax runs it as a scan)."
            )
        raise ValueError(
            f"emit({self.first_emit(eqn)!r}) is inside a {name!r} operation, which collect "
            f"cannot thread values out of (it handles {_SUPPORTED}); move the emit out of "
            "it, or return the value from it by hand as a Log"
        )

    def retrace(self, closed: Any, invals: Sequence[Any]) -> tuple[Any, list[list[_Meta]]]:
        """`closed` without its emits: a jaxpr with the emitted values as extra outputs."""
        box: list[list[_Meta]] = []
        inner = self.run_sub(closed, box)

        def run(*args: Any) -> list[Any]:
            outs, leaves = inner(*args)
            return [*outs, *leaves]

        return jax.make_jaxpr(run)(*invals), box

    def rebuild_jit(self, eqn: Any, invals: list[Any], level: _Level) -> list[Any]:
        # The same primitive and parameters (donation, shardings, layouts, compiler
        # options, mesh), on the program with the emitted values as extra outputs.
        new, box = self.retrace(eqn.params["jaxpr"], invals)
        n_out = len(eqn.outvars)
        params = dict(eqn.params, jaxpr=new)
        for key, default in _jit_output_defaults().items():
            if key in params:
                params[key] = (*params[key], *[default] * (len(new.out_avals) - n_out))
        outs = _bind(eqn.primitive, params, invals)
        level.extend(box[-1], outs[n_out:])
        return list(outs[:n_out])

    def rebuild_scan(self, eqn: Any, invals: list[Any], level: _Level) -> list[Any]:
        params = eqn.params
        if params.get("_split_transpose"):
            raise ValueError(
                f"emit({self.first_emit(eqn)!r}) is inside a lax.scan with _split_transpose "
                "set, which collect cannot rebuild with that setting; emit outside it"
            )
        n_consts, n_carry = _scan_split(params, len(invals))
        consts = invals[:n_consts]
        init = invals[n_consts : n_consts + n_carry]
        xs = invals[n_consts + n_carry :]
        box: list[list[_Meta]] = []
        inner = self.run_sub(params["jaxpr"], box)

        def body(carry: list[Any], x: list[Any]) -> tuple[list[Any], Any]:
            outs, leaves = inner(*consts, *carry, *x)
            return outs[:n_carry], (outs[n_carry:], leaves)

        carry, (ys, leaves) = lax.scan(
            body,
            init,
            xs,
            length=params["length"],
            reverse=params["reverse"],
            unroll=params["unroll"],
        )
        level.extend(box[-1], leaves)
        return [*carry, *ys]

    def rebuild_cond(self, eqn: Any, invals: list[Any], level: _Level) -> list[Any]:
        if eqn.params.get("branches_platforms") is not None:
            raise ValueError(
                f"emit({self.first_emit(eqn)!r}) is inside a platform-dependent 'cond', "
                "which collect cannot rebuild; emit outside it"
            )
        index, *ops = invals
        branches = eqn.params["branches"]
        first: list[tuple[int, dict[str, Any]]] = []  # the first branch traced: its signature

        def make(i: int, closed: Any) -> Callable[..., Any]:
            def branch(*args: Any) -> tuple[list[Any], list[Any]]:
                sub = _Level()
                outs = self.eval_closed(closed, args, sub)
                signature = {r.name: (r.tree, _leaf_types(r.leaves)) for r in sub.records.values()}
                if not first:
                    first.append((i, signature))
                    first_meta.extend(sub.meta())
                else:
                    _check_branches(*first[0], i, signature, len(branches))
                return list(outs), sub.leaves([m.name for m in first_meta])

            return branch

        first_meta: list[_Meta] = []
        outs, leaves = lax.switch(index, [make(i, b) for i, b in enumerate(branches)], *ops)
        level.extend(first_meta, leaves)
        return list(outs)

    def rebuild_remat(self, eqn: Any, invals: list[Any], level: _Level) -> list[Any]:
        # jax.checkpoint traces the program with the extra outputs (its constants become
        # inputs, as the primitive wants); the equation it makes is bound with the
        # original's parameters (policy, prevent_cse, differentiated), none lost.
        params = eqn.params
        box: list[list[_Meta]] = []
        run = self.run_sub(params["jaxpr"], box)
        traced = jax.make_jaxpr(
            jax.checkpoint(run, prevent_cse=params["prevent_cse"], policy=params["policy"])
        )(*invals)
        (made,) = traced.eqns

        def read(v: Any) -> Any:
            return v.val if isinstance(v, Literal) else env[v]

        env = dict(zip(traced.jaxpr.constvars, traced.consts, strict=True))
        env.update(zip(traced.jaxpr.invars, invals, strict=True))
        outs = _bind(
            eqn.primitive, dict(params, jaxpr=made.params["jaxpr"]), [read(v) for v in made.invars]
        )
        env.update(zip(made.outvars, outs, strict=True))
        flat = [read(v) for v in traced.jaxpr.outvars]  # fn's outputs, then emitted values
        n_out = len(eqn.outvars)
        level.extend(box[-1], flat[n_out:])
        return flat[:n_out]

    def rebuild_custom(self, eqn: Any, invals: list[Any], level: _Level) -> list[Any]:
        key = "call_jaxpr" if "call_jaxpr" in eqn.params else "fun_jaxpr"
        closed = _closed(eqn.params[key])
        # The outputs, and their custom derivative, from the function without its emits.
        params = dict(eqn.params)
        params[key] = self.without_emits(closed)
        outs = _bind(eqn.primitive, params, invals)
        # The emitted values from the function itself, on inputs no derivative flows
        # through (the custom rule exists because differentiating it may not work).
        self.eval_closed(closed, [_cut(x) for x in invals], level)
        return list(outs)

    def without_emits(self, closed: Any) -> Any:
        run = self.run_sub(closed, [], discard=True)
        avals = [
            jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False))
            for a in closed.in_avals
        ]
        with naming(None):
            return jax.make_jaxpr(lambda *args: run(*args)[0])(*avals)

    def rebuild_shard_map(self, eqn: Any, invals: list[Any], level: _Level) -> list[Any]:
        params = eqn.params
        mesh = params["mesh"]
        box: list[list[_Meta]] = []
        inner = self.run_sub(params["jaxpr"], box)

        def run(*args: Any) -> tuple[tuple[Any, ...], list[Any]]:
            outs, leaves = inner(*args)
            # One value per device: a leading axis of 1 here, of the device count outside.
            return tuple(outs), [jnp.expand_dims(x, 0) for x in leaves]

        manual = (
            params.get("newly_manual_axes")  # jax 0.9 on
            or params.get("manual_axes")  # jax 0.8
            or params.get("axis_names")
        )
        manual = set(mesh.axis_names) if not manual else set(manual)
        axes = tuple(a for a in mesh.axis_names if a in manual)
        mapped = jax.shard_map(
            run,
            mesh=mesh,
            in_specs=tuple(params["in_specs"]),
            out_specs=(tuple(params["out_specs"]), jax.sharding.PartitionSpec(axes)),
            axis_names=manual,
            check_vma=params.get("check_vma", True),
        )
        outs, leaves = mapped(*invals)
        level.extend(box[-1], leaves)
        return list(outs)


@functools.cache
def _jit_output_defaults() -> dict[str, Any]:
    """What a jit equation's per-output parameters say for an output given no sharding or
    layout, read off a traced jit (jax's own sentinel for "unspecified" is private)."""
    with naming(None):
        eqn = jax.make_jaxpr(jax.jit(lambda x: x))(np.float32(0)).eqns[0]
    return {k: eqn.params[k][0] for k in ("out_shardings", "out_layouts") if k in eqn.params}


def _branch(i: int, count: int) -> str:
    if count == 2:  # lax.cond: branch 0 is false_fun, 1 is true_fun
        return f"branch {i} ({'true_fun' if i else 'false_fun'} of a lax.cond)"
    return f"branch {i}"


def _check_branches(
    i: int, first: dict[str, Any], j: int, other: dict[str, Any], count: int
) -> None:
    for name in [*first, *(n for n in other if n not in first)]:
        if name not in first or name not in other:
            has, lacks = (j, i) if name not in first else (i, j)
            raise ValueError(
                f"emit({name!r}): {_branch(has, count)} emits it and {_branch(lacks, count)} "
                "does not; every branch of a lax.cond/switch must emit the same names (with "
                "the same shapes and dtypes), so that the log holds the taken branch's value"
            )
        if first[name] != other[name]:
            (tree_a, types_a), (tree_b, types_b) = first[name], other[name]
            shown_a = tree_a if tree_a != tree_b else _show_types(types_a)
            shown_b = tree_b if tree_a != tree_b else _show_types(types_b)
            raise ValueError(
                f"emit({name!r}): the branches of a lax.cond/switch emit it with different "
                f"shapes: {shown_a} in {_branch(i, count)}, {shown_b} in {_branch(j, count)}; "
                "every branch must "
                "emit the same names with the same shapes and dtypes"
            )


def _show_types(types: tuple[tuple[tuple[int, ...], Any], ...]) -> str:
    return ", ".join(f"{np.dtype(d).name}{list(s)}" for s, d in types)


def _check_outputs(fn: Callable[..., Any], leaves: Sequence[Any], tree: Any) -> None:
    for i, leaf in enumerate(leaves):
        if not is_dynamic(leaf) and not isinstance(leaf, bool | int | float | complex):
            paths = [
                jax.tree_util.keystr(p)
                for p, _ in jax.tree_util.tree_flatten_with_path(
                    jax.tree_util.tree_unflatten(tree, range(len(leaves)))
                )[0]
            ]
            raise TypeError(
                f"collect({fn_name(fn)}): {fn_name(fn)} returned a {type(leaf).__name__} "
                f"(output{paths[i]}); its result may hold arrays and numbers only, as a "
                "jitted function's. Return other values from outside the collected function"
            )


Logs = collections.OrderedDict[str, Log[Any]]


def collect(fn: Callable[..., R]) -> Callable[..., tuple[R, Logs]]:
    """Wrap `fn` so that it also returns the values it `emit`s, as named `Log`s.

    `collect(fn)(*args, **kwargs)` runs `fn(*args, **kwargs)` and returns `(out, logs)`:
    `fn`'s own result and `{name: Log(value, name=name)}` for every `emit(name, value)`
    that ran, in the order of first emission. The dict is an `OrderedDict`, which jax
    flattens in that order (a plain dict would come out of `jit` sorted by name). It goes
    straight into `named_logs`, `fetch_logs` or `write_tensorboard`, or into the state a
    jitted step returns.

    `collect(fn)` is a pure function of its inputs, with no host callback: jit it, vmap
    it, differentiate it (`jax.grad(collect(loss), has_aux=True)` returns the logs as
    auxiliary output), and it compiles once per input shape. Arrays among the arguments
    are traced; other arguments (Python numbers, strings, configuration objects) are
    constants of the trace, as `jit`'s static arguments would be.

    Inside `fn`, emits work through:

    - `jax.jit`, including jitted functions nested in each other;
    - `lax.scan` (and `lax.fori_loop` with Python int bounds, `lax.map`): a value emitted
      in the body comes out stacked over the iterations, one new leading axis per scan
      level, outermost scan first;
    - `jax.vmap`: a value emitted inside a vmap gets the mapped axis at the front of the
      value (a value that does not depend on the mapped input is broadcast), behind the
      axes of any scan around the emit. A `vmap` around `collect` itself puts its axis in
      front of everything, as it does for any output;
    - `lax.cond` / `lax.switch`: the taken branch's value. Every branch must emit the
      same names with the same shapes and dtypes;
    - `jax.grad` / `jax.value_and_grad` inside `fn`: the forward values are recorded. An
      emitted value never changes a gradient (`collect` applies `lax.stop_gradient`);
    - `jax.checkpoint` / `jax.remat`: each emit is recorded once, from the forward pass,
      never from the recomputation;
    - `jax.custom_jvp` / `jax.custom_vjp` functions: the value the function emits when
      it runs. Under differentiation inside `fn`, jax runs the custom rule instead of
      the function, so the emits that count are the rule's (a rule that calls the
      function, as `fwd` often does, emits the same values);
    - `shard_map`: the value on each device, stacked along a new leading axis that is
      sharded over the manual mesh axes (so each device keeps its own). Outside
      `shard_map`, a log is an ordinary output of the program: under `jit` with sharded
      inputs it gets the sharding XLA chooses for it.

    Stateful code runs as it would without `collect`: a function that updates flax.nnx
    objects among its arguments in place (a model, an `nnx.Optimizer`, the counters of
    `nnx.Rngs`, under `nnx.jit`, `nnx.value_and_grad` or `nnx.scan`) leaves the same
    values in the caller's objects, carried back with flax's graph API. An update that
    cannot be carried back is an error on the first call: a traced value stored on a
    plain object, a dict entry or list item of an argument replaced in place, an
    attribute added to an nnx object.

    Args:
        fn: the function to run; it may take and return any pytrees of arrays.

    Returns:
        A function with `fn`'s arguments returning `(fn's result, logs)`.

    Raises:
        TypeError: if `fn` is not callable (when wrapping); when called, if an `emit` has
            a non-string name or a value `Log` refuses, or `fn` returns something other
            than arrays and numbers (the message names `fn`).
        ValueError: when called, if a name is emitted twice at one scan level, the
            branches of a `cond` disagree on what they emit, an emit sits inside a
            `lax.while_loop` (use `scan`), or inside an operation `collect` cannot
            thread values out of (the message names it), or `fn` updates an argument
            in place in a way that cannot be carried back to the caller (the message
            says what to do instead).
        RuntimeError: when wrapping, on jax older than 0.8 (see the package README).

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> from jaxmodules.logstate import collect, emit, fetch_logs, scope
        >>> def layer(x, w):
        ...     y = jnp.tanh(x @ w)
        ...     emit("act_norm", jnp.linalg.norm(y))
        ...     return y, None
        >>> def model(x, ws):
        ...     with scope("layers"):
        ...         y, _ = jax.lax.scan(layer, x, ws)
        ...     emit("out_mean", jnp.mean(y))
        ...     return y
        >>> out, logs = jax.jit(collect(model))(jnp.ones(3), jnp.ones((4, 3, 3)) / 3)
        >>> {name: log.data.shape for name, log in logs.items()}
        {'layers.act_norm': (4,), 'out_mean': ()}
        >>> round(fetch_logs(logs)["out_mean"], 4)
        0.5126
    """
    if not callable(fn):
        raise TypeError(f"collect: fn must be callable, got {type(fn).__name__}")
    if not SUPPORTED:
        raise RuntimeError(
            f"collect needs jax 0.8 or newer, this is jax {jax.__version__}: older versions "
            "cannot tell a function traced inside collect from the same function traced "
            "outside it. Log, named_logs, fetch_logs and the rest work on this jax."
        )

    @functools.wraps(fn)
    def collected(*args: Any, **kwargs: Any) -> tuple[R, Logs]:
        arguments = Arguments(fn, args, kwargs)
        shape: list[tuple[Any, int]] = []  # (output tree, number of output leaves)

        def flat(*values: Any) -> list[Any]:
            call_args, call_kwargs = arguments.rebuild(values)
            out_leaves, out_tree = jax.tree_util.tree_flatten(fn(*call_args, **call_kwargs))
            _check_outputs(fn, out_leaves, out_tree)
            updates = arguments.after(call_args, call_kwargs)
            shape.append((out_tree, len(out_leaves)))
            return [*out_leaves, *updates]

        flat.__name__ = flat.__qualname__ = fn_name(fn)
        values = arguments.values()
        with naming(""):
            closed = jax.make_jaxpr(flat)(*values)
        level = _Level()
        with naming(None):
            outs = _Interpreter().eval_closed(closed, values, level)
        out_tree, n_out = shape[-1]
        arguments.carry_back(outs[n_out:])
        logs = collections.OrderedDict(
            (r.name, Log(jax.tree_util.tree_unflatten(r.tree, [_cut(x) for x in r.leaves]), r.name))
            for r in level.records.values()
        )
        return jax.tree_util.tree_unflatten(out_tree, outs[:n_out]), logs

    return collected
