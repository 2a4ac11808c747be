"""The format-string parser: both syntaxes, the plan it builds, and its error messages."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxmodules.vectorize import VmapPlan, parse_pattern


def axes_of(plan: VmapPlan) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]], bool]:
    return [p.axes for p in plan.inputs], [p.axes for p in plan.outputs], plan.tuple_output


SEED_EXAMPLE_2 = ([("i", ":", "j"), (":", "j"), ("i",)], [(":", "i", "j")], False)


@pytest.mark.parametrize(
    "fmt",
    [
        "i : j, : j, i -> : i j",
        ": i j <- i : j, : j, i",
        "out[:, i, j] = f(A[i, :, j], B[:, j], C[i])",
        "output[:, i, j] = complex_fn(A[i, :, j], B[:, j], C[i])",
        "f(A[i, :, j], B[:, j], C[i]) -> out[:, i, j]",
        "out[: i j] = f(A[i : j], B[: j], C[i])",
        "out[:,i,j]=f(A[i,:,j],B[:,j],C[i])",
        "  out[ :, i ,j ]  =  f( A[i, : ,j], B[:,j] , C[i] , )  ",
        "i : j,\n: j,\ni\n-> : i j",
    ],
)
def test_every_spelling_of_the_seed_example_gives_the_same_plan(fmt: str) -> None:
    plan = parse_pattern(fmt)
    assert axes_of(plan) == SEED_EXAMPLE_2
    assert plan.axis_order == ("i", "j")
    assert plan.fmt == fmt


def test_pattern_text_and_spans_point_into_the_format() -> None:
    fmt = "out[:, i, j] = f(A[i, :, j], B[:, j], C[i])"
    plan = parse_pattern(fmt)
    for pattern in (*plan.inputs, *plan.outputs):
        assert fmt[pattern.start : pattern.end] == pattern.text
        for axis, (start, end) in zip(pattern.axes, pattern.spans, strict=True):
            assert fmt[start:end] == axis
    assert [p.label for p in plan.inputs] == ["A", "B", "C"]
    assert plan.outputs[0].label == "out"


def test_multi_character_names_digits_underscores_and_unicode() -> None:
    plan = parse_pattern("batch_1 : head2, _x -> head2 batch_1 _x :")
    assert axes_of(plan)[0] == [("batch_1", ":", "head2"), ("_x",)]
    assert plan.axis_order == ("head2", "batch_1", "_x")
    assert parse_pattern("α β -> β α").axis_order == ("β", "α")


def test_ellipsis_and_whole_arguments() -> None:
    plan = parse_pattern("out[i] = model.apply(params, x[i, ...], rng)")
    assert [p.axes for p in plan.inputs] == [("...",), ("i", "..."), ("...",)]
    assert [p.text for p in plan.inputs] == ["params", "x[i, ...]", "rng"]
    einsum = parse_pattern("..., i ..., ... -> i")
    assert [p.axes for p in einsum.inputs] == [("...",), ("i", "..."), ("...",)]
    assert parse_pattern("f(A[]) -> out[]").inputs[0].axes == ()


@pytest.mark.parametrize(
    ("fmt", "outputs", "is_tuple"),
    [
        ("i, j -> i j, j i", [("i", "j"), ("j", "i")], True),
        ("i j, j i <- i, j", [("i", "j"), ("j", "i")], True),
        ("i -> i,", [("i",)], True),
        ("i -> i", [("i",)], False),
        ("(a[i, j], b[j, i]) = f(A[i], B[j])", [("i", "j"), ("j", "i")], True),
        ("a[i, j], b[j, i] = f(A[i], B[j])", [("i", "j"), ("j", "i")], True),
        ("f(A[i], B[j]) -> a[i, j], b[j, i]", [("i", "j"), ("j", "i")], True),
        ("f(A[i], B[j]) -> (a[i, j], b[j, i])", [("i", "j"), ("j", "i")], True),
        ("(a[i, j],) = f(A[i], B[j])", [("i", "j")], True),
        ("a[i, j], = f(A[i], B[j])", [("i", "j")], True),
        ("(a[i, j]) = f(A[i], B[j])", [("i", "j")], False),
    ],
)
def test_tuple_outputs(fmt: str, outputs: list[tuple[str, ...]], is_tuple: bool) -> None:
    plan = parse_pattern(fmt)
    assert [p.axes for p in plan.outputs] == outputs
    assert plan.tuple_output is is_tuple


def test_dummy_form_without_arguments_or_named_axes() -> None:
    plan = parse_pattern("out = f()")
    assert plan.inputs == () and plan.axis_order == ()
    assert plan.outputs[0].axes == ("...",)


def test_plan_is_immutable_and_parsing_is_cached() -> None:
    plan = parse_pattern("i, j -> i j")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.fmt = "x"  # type: ignore[misc]
    assert parse_pattern("i, j -> i j") is plan
    assert hash(plan) == hash(parse_pattern("i, j -> i j"))


def caret_target(message: str) -> str:
    """The characters of the quoted pattern line that sit above the carets."""
    lines = message.splitlines()
    quoted, carets = lines[-2], lines[-1]
    start = carets.index("^")
    return quoted[start : start + carets.count("^")]


@pytest.mark.parametrize(
    ("fmt", "message", "under_caret"),
    [
        ("i, j -> i j k", "output axis 'k' appears in no input pattern", "k"),
        ("i j i -> i j", "axis 'i' appears twice in pattern 'i j i'", "i"),
        ("i ... : ... -> i", "'...' appears twice in pattern 'i ... : ...'", "..."),
        ("out[i, i] = f(A[i])", "axis 'i' appears twice in pattern 'out[i, i]'", "i"),
        ("i, jj -> i", "axis 'jj' of argument 1 with pattern 'jj' is missing", "jj"),
        ("i, j -> i j, i", "is missing from output pattern 'i'", "j"),
        ("out[i] = f(A[i], B[j])", "axis 'j' of argument 1 'B[j]' is missing", "j"),
        ("i j", "expected '->' (inputs -> outputs) or '<-'", "i j"),
        ("i -> i -> i", "a second '->'; use one arrow", "->"),
        ("i -> i <- i", "a second '<-'; use one arrow", "<-"),
        ("i, , j -> i j", "empty input pattern before ','", ","),
        (", i -> i", "empty input pattern before ','", ","),
        ("-> i", "empty input pattern before '->'", "->"),
        ("i, -> i", "empty input pattern before '->'", "->"),
        ("i ->", "empty output pattern before the end of the pattern", ""),
        ("i -> , i", "empty output pattern before ','", ","),
        ("i:j -> i j", "'i' and ':' run together", "i:"),
        ("...i -> i", "'...' and 'i' run together", "...i"),
        ("1i -> i", "'1i' is not an axis name", "1i"),
        ("i $ j -> i", "unexpected character '$'", "$"),
        ("i .. -> i", "unexpected '.'", "."),
        ("i - > i", "unexpected character '-'", "-"),
        ("out[i = f(A[i])", "expected ',' or ']', found '='", "="),
        ("out[i,,j] = f(A[i], B[j])", "expected an axis name, ':', '...' or ']', found ','", ","),
        ("out[, i] = f(A[i])", "expected an axis name, ':', '...' or ']', found ','", ","),
        ("out[i] = f(A[i]", "expected ',' or ')', found the end of the pattern", ""),
        ("out[i] f(A[i])", "expected '=' between the outputs and the call, found 'f'", "f"),
        ("out[i] = (A[i])", "expected a function name such as 'f', found '('", "("),
        ("out[i] = f A[i]", "expected '(' after the function name, found 'A'", "A"),
        ("f(A[i]) = out[i]", "expected '->' after the call, found '='", "="),
        ("f(A[i]) -> out[i] x", "expected the end of the pattern, found 'x'", "x"),
        ("f(A[i]) ->", "expected an output name such as 'out', found the end", ""),
        ("() = f(A[i])", "expected at least one output, found ')'", ")"),
        ("out[i] = f(A[i], 3)", "'3' is not an axis name", "3"),
        ("out[i] = f(A[(i)])", "expected an axis name, ':', '...' or ']', found '('", "("),
        ("out[i] = f.(A[i])", "expected a name after '.', found '('", "("),
        ("out[i] = f(A[i]) = g(B[i])", "expected the end of the pattern, found '='", "="),
        ("out[i.j] = f(A[i])", "expected ',' or ']', found '.'", "."),
        # Notation from other tools: what it is, and what to write instead.
        ("b d => b", "'=>' is not an arrow here; write '->'", "=>"),
        ("out[b] => f(x[b])", "'=>' is not an arrow here; write '->'", "=>"),
        ("(b t) d -> (b t)", "grouping axes in parentheses, as einops does", "(b t)"),
        ("x[b, (b t)] -> out[b]", "name it once ('bt'), or map them as separate", "(b t)"),
        ("out[i] = f(A[( i  j )])", "grouping axes in parentheses", "( i  j )"),
    ],
)
def test_malformed_patterns_are_value_errors_with_a_caret(
    fmt: str, message: str, under_caret: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        parse_pattern(fmt)
    text = str(info.value)
    assert text.startswith("fancy_vmap: ")
    assert text.splitlines()[-2].strip() == fmt.strip()
    assert caret_target(text) == under_caret


def test_caret_lands_on_the_right_line_of_a_multiline_pattern() -> None:
    fmt = "i : j,\n  : k,\n  i\n-> : i j"
    with pytest.raises(ValueError, match="axis 'k' of argument 1") as info:
        parse_pattern(fmt)
    assert info.value.args[0].splitlines()[-2] == "      : k,"
    assert caret_target(str(info.value)) == "k"


@pytest.mark.parametrize("fmt", ["", "   ", "\n\t"])
def test_an_empty_pattern_says_so(fmt: str) -> None:
    with pytest.raises(ValueError, match=r"^fancy_vmap: empty pattern\n"):
        parse_pattern(fmt)


def test_non_string_format_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="the format must be a str, got list"):
        parse_pattern(["i -> i"])  # type: ignore[arg-type]


# ---------------------------------------------------------------- fuzz

FUZZ_PIECES = [
    "i", "j", "ab", "x_1", "_", "é", "1", "f", "out", "A",
    ":", "...", "..", ".", ",", "->", "<-", "-", "<", ">",
    "(", ")", "[", "]", "=", " ", " ", " ", "\n", "$",
]  # fmt: skip


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(st.sampled_from(FUZZ_PIECES), max_size=24)
    | st.text(alphabet="ij :.,-<>()[]=fA1_", max_size=30)
)
def test_fuzz_random_strings_only_ever_raise_value_error(pieces: list[str] | str) -> None:
    fmt = pieces if isinstance(pieces, str) else "".join(pieces)
    try:
        plan = parse_pattern(fmt)
    except ValueError as error:
        text = str(error)
        assert text.startswith("fancy_vmap: ") and "^" in text.splitlines()[-1]
        return
    # Whatever parses is internally consistent.
    assert plan.outputs
    for pattern in (*plan.inputs, *plan.outputs):
        assert fmt[pattern.start : pattern.end] == pattern.text
        assert len(set(pattern.named)) == len(pattern.named)
    assert set(plan.axis_order) == {axis for p in plan.inputs for axis in p.named}
