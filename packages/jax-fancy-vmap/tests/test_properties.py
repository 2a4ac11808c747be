"""Property tests: generated patterns and shapes against a plain Python loop (numpy)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jaxmodules.vectorize import AxisPattern, VmapPlan, fancy_vmap, parse_pattern

NAMES = ["i", "j", "k", "batch", "h2", "_x", "seq_len"]
Tokens = list[str]


@dataclass(frozen=True)
class Problem:
    """A valid pattern (as token lists) with sizes for every axis it needs."""

    inputs: list[Tokens]
    outputs: list[Tokens]
    tuple_output: bool
    sizes: dict[str, int]
    arg_shapes: list[tuple[int, ...]]
    fn_out_shapes: list[tuple[int, ...]]


small_dims = st.lists(st.integers(1, 3), max_size=2).map(tuple)


def shape_for(draw: st.DrawFn, tokens: Tokens, sizes: dict[str, int]) -> tuple[int, ...]:
    shape: list[int] = []
    for token in tokens:
        if token == ":":
            shape.append(draw(st.integers(1, 3)))
        elif token == "...":
            shape.extend(draw(small_dims))
        else:
            shape.append(sizes[token])
    return tuple(shape)


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    names = draw(st.lists(st.sampled_from(NAMES), max_size=3, unique=True))
    sizes = {name: draw(st.integers(1, 3)) for name in names}
    n_args = draw(st.integers(1, 3))
    owners = {name: draw(st.sets(st.integers(0, n_args - 1), min_size=1)) for name in names}
    inputs = []
    for index in range(n_args):
        tokens = [name for name in names if index in owners[name]]
        tokens += [":"] * draw(st.integers(0, 2))
        if draw(st.booleans()):
            tokens.append("...")
        inputs.append(draw(st.permutations(tokens)) or ["..."])
    outputs, fn_out_shapes = [], []
    for _ in range(draw(st.integers(1, 2))):
        colons = draw(st.integers(0, 2))
        ellipsis = draw(st.booleans()) or not (names or colons)
        tokens = list(names) + [":"] * colons + (["..."] if ellipsis else [])
        outputs.append(draw(st.permutations(tokens)))
        # Without ':' or '...' fn's axes follow the named axes: any rank fits.
        extra = draw(small_dims) if ellipsis or not colons else ()
        fn_out_shapes.append(tuple(draw(st.integers(1, 3)) for _ in range(colons)) + extra)
    tuple_output = len(outputs) > 1 or draw(st.booleans())
    arg_shapes = [shape_for(draw, tokens, sizes) for tokens in inputs]
    return Problem(inputs, outputs, tuple_output, sizes, arg_shapes, fn_out_shapes)


def render_einsum(draw: st.DrawFn, problem: Problem) -> str:
    def side(patterns: list[Tokens]) -> str:
        space = draw(st.sampled_from([" ", "  ", "\t"]))
        comma = draw(st.sampled_from([",", ", ", " , ", ",\n"]))
        return comma.join(space.join(p) for p in patterns)

    left = side(problem.inputs)
    right = side(problem.outputs)
    if problem.tuple_output and len(problem.outputs) == 1:
        right += ","
    return f"{left} -> {right}" if draw(st.booleans()) else f"{right} <- {left}"


def render_dummy(draw: st.DrawFn, problem: Problem) -> str:
    def operand(name: str, tokens: Tokens) -> str:
        if tokens == ["..."] and draw(st.booleans()):
            return name  # passed whole
        separator = draw(st.sampled_from([", ", ",", " ", " , "]))
        return f"{name}[{separator.join(tokens)}]"

    args = ", ".join(operand(f"A{n}", p) for n, p in enumerate(problem.inputs))
    outs = ", ".join(operand(f"out{n}", p) for n, p in enumerate(problem.outputs))
    if problem.tuple_output and len(problem.outputs) == 1:
        outs += ","
    if problem.tuple_output and draw(st.booleans()):
        outs = f"({outs})"
    return f"{outs} = fn({args})" if draw(st.booleans()) else f"fn({args}) -> {outs}"


def render(draw: st.DrawFn, problem: Problem) -> str:
    return draw(st.sampled_from([render_einsum, render_dummy]))(draw, problem)


def named(tokens: Tokens) -> list[str]:
    return [t for t in tokens if t not in (":", "...")]


def index_for(tokens: Tokens, at: dict[str, int]) -> tuple[Any, ...]:
    """numpy index picking one element along every named axis, all of every other axis."""
    index: list[Any] = []
    for token in tokens:
        index.append(Ellipsis if token == "..." else slice(None) if token == ":" else at[token])
    if "..." not in tokens:
        index.append(Ellipsis)  # output axes follow the named ones when nothing says where
    return tuple(index)


def output_shape(tokens: Tokens, sizes: dict[str, int], fn_shape: tuple[int, ...]) -> tuple:
    """Where fn's axes land: ':' take one each, '...' the rest, else after the named axes."""
    if "..." not in tokens and ":" not in tokens:
        tokens = [*tokens, "..."]
    rest = list(fn_shape)
    shape: list[int] = []
    for position, token in enumerate(tokens):
        if token == ":":
            shape.append(rest.pop(0))
        elif token == "...":
            taken = len(rest) - tokens[position:].count(":")
            shape.extend(rest[:taken])
            rest = rest[taken:]
        else:
            shape.append(sizes[token])
    return tuple(shape)


def make_fn(weights: list[np.ndarray], bases: list[np.ndarray], tuple_output: bool) -> Any:
    """Works on numpy and jax arrays alike; every output element depends on every input."""

    def fn(*args: Any) -> Any:
        total = 0.0
        for arg, weight in zip(args, weights, strict=True):
            total = total + (arg * weight).sum()
        outputs = tuple(total * base + k for k, base in enumerate(bases))
        return outputs if tuple_output else outputs[0]

    return fn


def loop_reference(problem: Problem, fn: Any, args: list[np.ndarray]) -> list[np.ndarray]:
    names = list(problem.sizes)
    results = [
        np.zeros(output_shape(tokens, problem.sizes, fn_shape))
        for tokens, fn_shape in zip(problem.outputs, problem.fn_out_shapes, strict=True)
    ]
    for point in itertools.product(*(range(problem.sizes[n]) for n in names)):
        at = dict(zip(names, point, strict=True))
        elements = [arg[index_for(t, at)] for t, arg in zip(problem.inputs, args, strict=True)]
        value = fn(*elements)
        values = value if problem.tuple_output else (value,)
        for result, tokens, part in zip(results, problem.outputs, values, strict=True):
            result[index_for(tokens, at)] = part
    return results


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_patterns_match_a_python_loop(data: st.DataObject) -> None:
    problem = data.draw(problems())
    fmt = render(data.draw, problem)
    rng = np.random.default_rng(len(fmt))
    args = [rng.normal(size=shape) for shape in problem.arg_shapes]
    element_shapes = [
        arg[index_for(tokens, dict.fromkeys(problem.sizes, 0))].shape
        for tokens, arg in zip(problem.inputs, args, strict=True)
    ]
    weights = [rng.normal(size=shape) for shape in element_shapes]
    bases = [rng.normal(size=shape) for shape in problem.fn_out_shapes]
    fn = make_fn(weights, bases, problem.tuple_output)

    vectorized = fancy_vmap(fn, fmt)
    if data.draw(st.integers(0, 3)) == 0:  # jit compiles are slow; a quarter is plenty
        vectorized = jax.jit(vectorized)
    result = vectorized(*(jnp.asarray(a, jnp.float32) for a in args))
    expected = loop_reference(problem, fn, args)

    parts = result if problem.tuple_output else (result,)
    assert isinstance(parts, tuple) and len(parts) == len(expected)
    for part, reference in zip(parts, expected, strict=True):
        assert part.shape == reference.shape, fmt
        np.testing.assert_allclose(np.asarray(part), reference, rtol=2e-4, atol=2e-4, err_msg=fmt)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_rendered_patterns_parse_back_identically_in_both_syntaxes(data: st.DataObject) -> None:
    problem = data.draw(problems())
    for renderer in (render_einsum, render_dummy):
        fmt = renderer(data.draw, problem)
        plan = parse_pattern(fmt)
        assert [list(p.axes) for p in plan.inputs] == problem.inputs, fmt
        assert [list(p.axes) for p in plan.outputs] == problem.outputs, fmt
        assert plan.tuple_output is problem.tuple_output, fmt
        assert list(plan.axis_order) == named(problem.outputs[0]), fmt


FUZZ_PIECES = ["i", "j", "ab", ":", "...", ".", ",", " ", "->", "<-", "(", ")", "[", "]", "=", "f"]


@st.composite
def mutated_formats(draw: st.DrawFn) -> str:
    """A valid format with a few random edits: close to the grammar, often just outside it."""
    fmt = render(draw, draw(problems()))
    for _ in range(draw(st.integers(0, 2))):
        position = draw(st.integers(0, len(fmt)))
        edit = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.sampled_from(FUZZ_PIECES))
        if edit == "insert":
            fmt = fmt[:position] + piece + fmt[position:]
        elif edit == "delete":
            fmt = fmt[:position] + fmt[position + draw(st.integers(1, 3)) :]
        else:
            fmt = fmt[:position] + piece + fmt[position + 1 :]
    return fmt


def arguments_for(
    draw: st.DrawFn, plan: VmapPlan, sizes: dict[str, int]
) -> tuple[list[jax.Array], bool]:
    """Arguments that fit the plan, except now and then a random shape that may not."""
    args, all_fit = [], True
    for pattern in plan.inputs:
        shape = shape_for(draw, list(pattern.axes), sizes)
        if draw(st.integers(0, 9)) == 0:
            shape = draw(st.lists(st.integers(1, 3), max_size=4).map(tuple))
            all_fit = False
        args.append(jnp.asarray(np.random.default_rng(len(shape)).normal(size=shape)))
    return args, all_fit


def fn_shape_for(draw: st.DrawFn, pattern: AxisPattern) -> tuple[tuple[int, ...], bool]:
    """A shape for fn's own output; mostly one that fits the output pattern."""
    colons = pattern.unmapped_count
    if draw(st.integers(0, 9)) == 0:
        return draw(st.lists(st.integers(1, 2), max_size=3).map(tuple)), False
    rank = colons if colons and not pattern.has_ellipsis else colons + draw(st.integers(0, 2))
    return tuple(draw(st.integers(1, 2)) for _ in range(rank)), True


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=mutated_formats(), data=st.data())
def test_fuzz_mutated_patterns_end_to_end_only_raise_value_error(
    fmt: str, data: st.DataObject
) -> None:
    try:
        plan = parse_pattern(fmt)
    except ValueError:
        event("rejected by the parser")
        return
    sizes = {axis: data.draw(st.integers(1, 3)) for axis in plan.axis_order}
    args, all_fit = arguments_for(data.draw, plan, sizes)
    fn_shapes = []
    for pattern in plan.outputs:
        shape, fits = fn_shape_for(data.draw, pattern)
        fn_shapes.append(shape)
        all_fit = all_fit and fits

    def fn(*elements: jax.Array) -> Any:
        total = sum((jnp.sum(e) for e in elements), jnp.float32(0))
        parts = tuple(total * jnp.ones(shape) for shape in fn_shapes)
        return parts if plan.tuple_output else parts[0]

    try:
        result = fancy_vmap(fn, fmt)(*args)
    except ValueError as error:
        assert str(error).startswith("fancy_vmap: ")
        # A parsed pattern called with arguments and an fn that fit it must run.
        assert not all_fit, f"{fmt!r} rejected a call that fits it: {error}"
        event("parsed, call rejected")
        return
    event("parsed and ran")
    parts = result if plan.tuple_output else (result,)
    assert len(parts) == len(plan.outputs)
    if all_fit:
        for part, pattern, fn_shape in zip(parts, plan.outputs, fn_shapes, strict=True):
            assert part.shape == output_shape(list(pattern.axes), sizes, fn_shape), fmt
