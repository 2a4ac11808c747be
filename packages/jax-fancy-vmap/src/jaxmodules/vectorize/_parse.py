"""Parser: turns a ``fancy_vmap`` format string into an immutable :class:`VmapPlan`.

Two syntaxes are accepted:

* einsum-like: ``"i : j, : j, i -> : i j"`` or, reversed, ``": i j <- i : j, : j, i"``;
* dummy function: ``"out[:, i, j] = f(A[i, :, j], B[:, j], C[i])"`` or
  ``"f(A[i], B[j]) -> out[i, j]"``.

A string that holds any of ``( ) [ ] =`` is read as the dummy-function form, anything
else as the einsum-like form.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

from ._errors import pattern_error

UNMAPPED = ":"
ELLIPSIS = "..."

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
    | (?P<ellipsis>\.\.\.)
    | (?P<arrow>->)
    | (?P<larrow><-)
    | (?P<name>[^\W\d]\w*)
    | (?P<number>\d\w*)
    | (?P<punct>[:,()\[\]=.])
    """,
    re.VERBOSE,
)
_AXIS_KINDS = ("name", UNMAPPED, ELLIPSIS)
_DUMMY_ONLY_KINDS = ("(", ")", "[", "]", "=")


@dataclass(frozen=True)
class AxisPattern:
    """The layout of one argument or one output, as the format string describes it.

    Attributes:
        axes: One entry per written token: an axis name, ``":"`` (one unmapped axis) or
            ``"..."`` (any number of unmapped axes).
        text: The pattern as written in the format string (``"i : j"`` or ``"A[i, :, j]"``).
        start: Offset of ``text`` in the format string.
        spans: ``(start, end)`` offsets of every entry of ``axes`` in the format string.
        label: The free name given in the dummy-function form (``"A"``), else ``None``.
        bare: Written without brackets in the dummy-function form (passed whole).

    Examples:
        >>> from jaxmodules.vectorize import parse_pattern
        >>> plan = parse_pattern("i : j, : j, i -> : i j")
        >>> plan.inputs[0].axes
        ('i', ':', 'j')
        >>> plan.inputs[0].named
        ('i', 'j')
    """

    axes: tuple[str, ...]
    text: str
    start: int
    spans: tuple[tuple[int, int], ...]
    label: str | None = None
    bare: bool = False

    @property
    def named(self) -> tuple[str, ...]:
        """The axis names, in the order written."""
        return tuple(axis for axis in self.axes if axis not in (UNMAPPED, ELLIPSIS))

    @property
    def has_ellipsis(self) -> bool:
        """Whether the pattern holds ``...``."""
        return ELLIPSIS in self.axes

    @property
    def unmapped_count(self) -> int:
        """How many ``:`` the pattern holds."""
        return self.axes.count(UNMAPPED)

    @property
    def end(self) -> int:
        """Offset just past ``text`` in the format string."""
        return self.start + len(self.text)

    def span_of(self, axis: str) -> tuple[int, int]:
        """Offsets of the first occurrence of ``axis`` in the format string."""
        return self.spans[self.axes.index(axis)]

    def describe(self) -> str:
        """How error messages name this pattern."""
        if self.label is not None:
            return repr(self.text)
        return f"with pattern {self.text!r}"


@dataclass(frozen=True)
class VmapPlan:
    """A parsed format string: one pattern per positional argument and per output.

    Attributes:
        fmt: The format string.
        inputs: One :class:`AxisPattern` per positional argument.
        outputs: One :class:`AxisPattern` per output; several mean ``fn`` returns a tuple.
        tuple_output: Whether ``fn`` returns a tuple (several output patterns, or one
            followed by a trailing comma).
        axis_order: The named axes, outermost ``vmap`` first (their order in the first
            output pattern).

    Examples:
        >>> from jaxmodules.vectorize import parse_pattern
        >>> plan = parse_pattern("out[:, i, j] = f(A[i, :, j], B[:, j], C[i])")
        >>> [p.axes for p in plan.inputs]
        [('i', ':', 'j'), (':', 'j'), ('i',)]
        >>> plan.outputs[0].axes, plan.axis_order
        ((':', 'i', 'j'), ('i', 'j'))
    """

    fmt: str
    inputs: tuple[AxisPattern, ...]
    outputs: tuple[AxisPattern, ...]
    tuple_output: bool
    axis_order: tuple[str, ...]


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    start: int
    end: int


def _tokenize(fmt: str) -> list[_Token]:
    tokens = []
    position = 0
    while position < len(fmt):
        match = _TOKEN_RE.match(fmt, position)
        if match is None:
            raise pattern_error(
                fmt, position, position + 1, f"unexpected character {fmt[position]!r}"
            )
        kind = match.lastgroup
        text = match.group()
        if kind == "number":
            raise pattern_error(
                fmt,
                position,
                match.end(),
                f"{text!r} is not an axis name; names start with a letter or underscore",
            )
        if kind in ("punct", "ellipsis", "arrow", "larrow"):
            kind = text
        if kind != "ws":
            tokens.append(_Token(str(kind), text, position, match.end()))
        position = match.end()
    tokens.append(_Token("end", "", len(fmt), len(fmt)))
    return tokens


def _describe_token(token: _Token) -> str:
    return "the end of the pattern" if token.kind == "end" else repr(token.text)


def _make_pattern(
    fmt: str,
    axis_tokens: list[_Token],
    *,
    text_start: int,
    text_end: int,
    label: str | None = None,
) -> AxisPattern:
    return AxisPattern(
        axes=tuple(token.text for token in axis_tokens),
        text=fmt[text_start:text_end],
        start=text_start,
        spans=tuple((token.start, token.end) for token in axis_tokens),
        label=label,
    )


def _check_separated(fmt: str, previous: _Token | None, token: _Token) -> None:
    """Axis tokens need a space (or a comma inside brackets) between them."""
    if previous is not None and previous.end == token.start:
        raise pattern_error(
            fmt,
            previous.start,
            token.end,
            f"{previous.text!r} and {token.text!r} run together; separate axes with spaces"
            " (or commas inside brackets)",
        )


# ------------------------------------------------------------------------ einsum-like


def _parse_einsum(
    fmt: str, tokens: list[_Token]
) -> tuple[list[AxisPattern], list[AxisPattern], bool]:
    arrows = [token for token in tokens if token.kind in ("->", "<-")]
    if not arrows:
        raise pattern_error(
            fmt,
            0,
            len(fmt),
            "expected '->' (inputs -> outputs) or '<-' (outputs <- inputs)",
        )
    if len(arrows) > 1:
        second = arrows[1]
        raise pattern_error(
            fmt, second.start, second.end, f"a second {second.text!r}; use one arrow"
        )
    arrow = arrows[0]
    split = tokens.index(arrow)
    left, right = tokens[:split], tokens[split + 1 : -1]
    left_boundary, right_boundary = arrow, tokens[-1]
    if arrow.kind == "->":
        inputs, _ = _einsum_list(fmt, left, left_boundary, "input")
        outputs, trailing_comma = _einsum_list(fmt, right, right_boundary, "output")
    else:
        outputs, trailing_comma = _einsum_list(fmt, left, left_boundary, "output")
        inputs, _ = _einsum_list(fmt, right, right_boundary, "input")
    return inputs, outputs, len(outputs) > 1 or trailing_comma


def _einsum_list(
    fmt: str, tokens: list[_Token], boundary: _Token, side: str
) -> tuple[list[AxisPattern], bool]:
    """Comma-separated patterns; a trailing comma is allowed on the output side only."""
    patterns: list[AxisPattern] = []
    group: list[_Token] = []
    for token in [*tokens, boundary]:
        at_boundary = token is boundary
        if token.kind == "," or at_boundary:
            if group:
                patterns.append(
                    _make_pattern(fmt, group, text_start=group[0].start, text_end=group[-1].end)
                )
            elif at_boundary and side == "output" and patterns:
                return patterns, True
            else:
                hint = (
                    "write '...' to pass an argument whole"
                    if side == "input"
                    else "every output needs a pattern"
                )
                raise pattern_error(
                    fmt,
                    token.start,
                    token.end,
                    f"empty {side} pattern before {_describe_token(token)}; {hint}",
                )
            group = []
            continue
        if token.kind not in _AXIS_KINDS:
            raise pattern_error(
                fmt,
                token.start,
                token.end,
                f"unexpected {token.text!r}; a pattern holds axis names, ':' and '...'",
            )
        _check_separated(fmt, group[-1] if group else None, token)
        group.append(token)
    return patterns, False


# ------------------------------------------------------------------------ dummy function


class _DummyParser:
    """Recursive descent over ``outputs = name(args)`` and ``name(args) -> outputs``."""

    def __init__(self, fmt: str, tokens: list[_Token]) -> None:
        self.fmt = fmt
        self.tokens = tokens
        self.position = 0

    def peek(self, offset: int = 0) -> _Token:
        return self.tokens[min(self.position + offset, len(self.tokens) - 1)]

    def advance(self) -> _Token:
        token = self.peek()
        self.position = min(self.position + 1, len(self.tokens) - 1)
        return token

    def fail(self, token: _Token, expected: str) -> ValueError:
        return pattern_error(
            self.fmt,
            token.start,
            token.end,
            f"expected {expected}, found {_describe_token(token)}",
        )

    def expect(self, kind: str, expected: str) -> _Token:
        if self.peek().kind != kind:
            raise self.fail(self.peek(), expected)
        return self.advance()

    def parse(self) -> tuple[list[AxisPattern], list[AxisPattern], bool]:
        if self.starts_with_call():
            inputs = self.call()
            self.expect("->", "'->' after the call")
            outputs, is_tuple = self.outputs()
        else:
            outputs, is_tuple = self.outputs()
            self.expect("=", "'=' between the outputs and the call")
            inputs = self.call()
        self.expect("end", "the end of the pattern")
        return inputs, outputs, is_tuple

    def starts_with_call(self) -> bool:
        offset = 0
        while self.peek(offset).kind == "name" and self.peek(offset + 1).kind == ".":
            offset += 2
        return self.peek(offset).kind == "name" and self.peek(offset + 1).kind == "("

    def dotted_name(self, expected: str) -> tuple[str, int]:
        first = self.expect("name", expected)
        end = first.end
        while self.peek().kind == ".":
            self.advance()
            end = self.expect("name", "a name after '.'").end
        return self.fmt[first.start : end], first.start

    def outputs(self) -> tuple[list[AxisPattern], bool]:
        if self.peek().kind == "(":
            self.advance()
            if self.peek().kind == ")":
                raise self.fail(self.peek(), "at least one output")
            targets, trailing = self.sequence(self.target, closer=")")
            self.expect(")", "',' or ')'")
            return targets, len(targets) > 1 or trailing
        targets = [self.target()]
        trailing = False
        while self.peek().kind == ",":
            self.advance()
            if self.peek().kind in ("=", "end"):
                trailing = True
                break
            targets.append(self.target())
        return targets, len(targets) > 1 or trailing

    def sequence(
        self, parse_item: Callable[[], AxisPattern], *, closer: str
    ) -> tuple[list[AxisPattern], bool]:
        """Comma-separated items up to ``closer``; a trailing comma is allowed."""
        items = [parse_item()]
        while self.peek().kind == ",":
            self.advance()
            if self.peek().kind == closer:
                return items, True
            items.append(parse_item())
        if self.peek().kind != closer:
            raise self.fail(self.peek(), f"',' or {closer!r}")
        return items, False

    def target(self) -> AxisPattern:
        return self.operand("an output name such as 'out'")

    def argument(self) -> AxisPattern:
        return self.operand("an argument name such as 'A'")

    def operand(self, expected: str) -> AxisPattern:
        label, start = self.dotted_name(expected)
        if self.peek().kind != "[":
            return AxisPattern(
                axes=(ELLIPSIS,),
                text=label,
                start=start,
                spans=((start, start + len(label)),),
                label=label,
                bare=True,
            )
        axis_tokens = self.brackets()
        end = self.tokens[self.position - 1].end
        return _make_pattern(self.fmt, axis_tokens, text_start=start, text_end=end, label=label)

    def brackets(self) -> list[_Token]:
        self.expect("[", "'['")
        axis_tokens: list[_Token] = []
        previous: _Token | None = None
        while self.peek().kind != "]":
            token = self.advance()
            if token.kind not in _AXIS_KINDS:
                raise self.fail(token, "an axis name, ':', '...' or ']'")
            _check_separated(self.fmt, previous, token)
            axis_tokens.append(token)
            previous = token
            if self.peek().kind == ",":
                self.advance()
                previous = None
                if self.peek().kind not in (*_AXIS_KINDS, "]"):
                    raise self.fail(self.peek(), "an axis name, ':', '...' or ']'")
            elif self.peek().kind not in (*_AXIS_KINDS, "]"):
                raise self.fail(self.peek(), "',' or ']'")
        self.advance()
        return axis_tokens

    def call(self) -> list[AxisPattern]:
        self.dotted_name("a function name such as 'f'")
        self.expect("(", "'(' after the function name")
        if self.peek().kind == ")":
            self.advance()
            return []
        arguments, _ = self.sequence(self.argument, closer=")")
        self.expect(")", "',' or ')'")
        return arguments


# ------------------------------------------------------------------------ checks


def _check_pattern(fmt: str, pattern: AxisPattern) -> None:
    seen: set[str] = set()
    for axis, (start, end) in zip(pattern.axes, pattern.spans, strict=True):
        if axis == UNMAPPED:
            continue
        if axis in seen:
            what = "'...'" if axis == ELLIPSIS else f"axis {axis!r}"
            raise pattern_error(
                fmt, start, end, f"{what} appears twice in pattern {pattern.text!r}"
            )
        seen.add(axis)


def _check_plan(fmt: str, inputs: list[AxisPattern], outputs: list[AxisPattern]) -> None:
    for pattern in (*inputs, *outputs):
        _check_pattern(fmt, pattern)
    input_axes: dict[str, tuple[int, AxisPattern]] = {}
    for index, pattern in enumerate(inputs):
        for axis in pattern.named:
            input_axes.setdefault(axis, (index, pattern))
    for output in outputs:
        for axis in output.named:
            if axis not in input_axes:
                start, end = output.span_of(axis)
                raise pattern_error(
                    fmt,
                    start,
                    end,
                    f"output axis {axis!r} appears in no input pattern, so its size is unknown",
                )
    for axis, (index, pattern) in input_axes.items():
        for output in outputs:
            if axis not in output.named:
                start, end = pattern.span_of(axis)
                raise pattern_error(
                    fmt,
                    start,
                    end,
                    f"axis {axis!r} of argument {index} {pattern.describe()} is missing from"
                    f" output pattern {output.text!r}; every mapped axis must appear in every"
                    " output (use ':' to pass an axis to fn unmapped)",
                )


def parse_pattern(fmt: str) -> VmapPlan:
    """Parse a ``fancy_vmap`` format string into a :class:`VmapPlan`.

    ``fancy_vmap`` calls this once, when it is called; use it directly to check a
    pattern or to see how it is read.

    Args:
        fmt: The format string, in the einsum-like or the dummy-function syntax.

    Returns:
        The plan: one pattern per argument and per output, and the nesting order.

    Raises:
        TypeError: ``fmt`` is not a string.
        ValueError: The pattern is malformed; the message quotes it with carets under
            the offending token.

    Examples:
        >>> from jaxmodules.vectorize import parse_pattern
        >>> plan = parse_pattern("f(A[i], B[j]) -> out[i, j]")
        >>> [p.axes for p in plan.inputs], plan.outputs[0].axes
        ([('i',), ('j',)], ('i', 'j'))
        >>> parse_pattern("i, j -> i k")
        Traceback (most recent call last):
        ...
        ValueError: fancy_vmap: output axis 'k' appears in no input pattern, so its size is unknown
            i, j -> i k
                      ^
    """
    if not isinstance(fmt, str):
        raise TypeError(f"fancy_vmap: the format must be a str, got {type(fmt).__name__}")
    return _parse_cached(fmt)


@functools.lru_cache(maxsize=512)
def _parse_cached(fmt: str) -> VmapPlan:
    tokens = _tokenize(fmt)
    if any(token.kind in _DUMMY_ONLY_KINDS for token in tokens):
        inputs, outputs, tuple_output = _DummyParser(fmt, tokens).parse()
    else:
        inputs, outputs, tuple_output = _parse_einsum(fmt, tokens)
    _check_plan(fmt, inputs, outputs)
    return VmapPlan(
        fmt=fmt,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        tuple_output=tuple_output,
        axis_order=outputs[0].named,
    )
