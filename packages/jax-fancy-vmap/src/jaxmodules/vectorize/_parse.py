"""Parser: turns a ``fancy_vmap`` format string into an immutable `VmapPlan`.

Both syntaxes are two comma-separated lists of patterns, read by one list parser. The
einsum-like form (``"i : j, : j, i -> : i j"``, reversed ``": i j <- i : j, : j, i"``)
writes each pattern as axis tokens separated by spaces. The dummy-function form
(``"out[:, i, j] = f(A[i, :, j], B[:, j], C[i])"`` or ``"f(A[i], B[j]) -> out[i, j]"``)
puts a frame round the two lists and lowers each operand ``A[i, :, j]`` to the axis
tokens between its brackets. A string that holds any of ``( ) [ ] =`` is read as the
dummy-function form, anything else as the einsum-like form.
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
    r"(?P<ws>\s+)|(?P<name>[^\W\d]\w*)|(?P<number>\d\w*)|(?P<punct>\.\.\.|->|<-|[:,()\[\]=.])"
)
_AXIS_KINDS = ("name", UNMAPPED, ELLIPSIS)
_DUMMY_ONLY_KINDS = ("(", ")", "[", "]", "=")
_AXIS_OR_CLOSE = "an axis name, ':', '...' or ']'"
_EMPTY_HINTS = {
    "input": "write '...' to pass an argument whole",
    "output": "every output needs a pattern",
}


@dataclass(frozen=True)
class AxisPattern:
    """The layout of one argument or one output, as the format string describes it.

    A stable, read-only record returned inside a `VmapPlan`.

    Attributes:
        axes: One entry per written token: an axis name, ``":"`` (one unmapped axis) or
            ``"..."`` (any number of unmapped axes). An argument passed whole reads
            ``("...",)``.
        text: The pattern as written in the format string (``"i : j"`` or ``"A[i, :, j]"``).
        start: Offset of ``text`` in the format string.
        spans: ``(start, end)`` offsets of every entry of ``axes`` in the format string.
        label: The free name given in the dummy-function form (``"A"``), else ``None``.

    Examples:
        >>> from jaxmodules.vectorize import parse_pattern
        >>> plan = parse_pattern("i : j, : j, i -> : i j")
        >>> plan.inputs[0].axes, plan.inputs[0].named
        (('i', ':', 'j'), ('i', 'j'))
        >>> parse_pattern("out[i] = f(A[i], params)").inputs[1].axes
        ('...',)
    """

    axes: tuple[str, ...]
    text: str
    start: int
    spans: tuple[tuple[int, int], ...]
    label: str | None = None

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


def describe(pattern: AxisPattern) -> str:
    """How error messages name a pattern."""
    return repr(pattern.text) if pattern.label is not None else f"with pattern {pattern.text!r}"


@dataclass(frozen=True)
class VmapPlan:
    """A parsed format string: one pattern per positional argument and per output.

    A stable, read-only record; `parse_pattern` returns it.

    Attributes:
        fmt: The format string.
        inputs: One `AxisPattern` per positional argument.
        outputs: One `AxisPattern` per output; several mean ``fn`` returns a tuple.
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
    tokens, position = [], 0
    while position < len(fmt):
        match = _TOKEN_RE.match(fmt, position)
        if match is None:
            raise pattern_error(
                fmt, position, position + 1, f"unexpected character {fmt[position]!r}"
            )
        kind, text = str(match.lastgroup), match.group()
        if kind == "number":
            raise pattern_error(
                fmt,
                position,
                match.end(),
                f"{text!r} is not an axis name; names start with a letter or underscore",
            )
        if kind != "ws":
            tokens.append(_Token(text if kind == "punct" else kind, text, position, match.end()))
        position = match.end()
    return [*tokens, _Token("end", "", len(fmt), len(fmt))]


def _describe_token(token: _Token) -> str:
    return "the end of the pattern" if token.kind == "end" else repr(token.text)


class _Parser:
    """A cursor over the tokens; ``patterns`` is the list parser both syntaxes share."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.tokens = _tokenize(fmt)
        self.position = 0

    def peek(self, offset: int = 0) -> _Token:
        return self.tokens[min(self.position + offset, len(self.tokens) - 1)]

    def advance(self) -> _Token:
        token = self.peek()
        self.position = min(self.position + 1, len(self.tokens) - 1)
        return token

    def error(self, token: _Token, message: str) -> ValueError:
        return pattern_error(self.fmt, token.start, token.end, message)

    def expect(self, kind: str, expected: str) -> _Token:
        if self.peek().kind != kind:
            found = _describe_token(self.peek())
            raise self.error(self.peek(), f"expected {expected}, found {found}")
        return self.advance()

    def patterns(
        self, item: Callable[[], AxisPattern], closers: tuple[str, ...], trailing_ok: bool
    ) -> tuple[list[AxisPattern], bool]:
        """Comma-separated patterns; returns them and whether a trailing comma ended them."""
        items = [item()]
        while self.peek().kind == ",":
            self.advance()
            if trailing_ok and self.peek().kind in closers:
                return items, True
            items.append(item())
        return items, False

    def axes(self, stop: tuple[str, ...], bracketed: bool) -> list[_Token]:
        """Axis tokens up to a token in ``stop``, apart by spaces (or commas in brackets)."""
        group: list[_Token] = []
        after_comma = False
        while self.peek().kind not in stop:
            token = self.advance()
            if bracketed and token.kind == "," and group and not after_comma:
                after_comma = True
                continue
            if token.kind not in _AXIS_KINDS and not bracketed:
                message = f"unexpected {token.text!r}; a pattern holds axis names, ':' and '...'"
                raise self.error(token, message)
            if token.kind not in _AXIS_KINDS:
                wanted = _AXIS_OR_CLOSE if not group or after_comma else "',' or ']'"
                raise self.error(token, f"expected {wanted}, found {_describe_token(token)}")
            if group and not after_comma and group[-1].end == token.start:
                raise pattern_error(
                    self.fmt,
                    group[-1].start,
                    token.end,
                    f"{group[-1].text!r} and {token.text!r} run together; separate axes with"
                    " spaces (or commas inside brackets)",
                )
            group.append(token)
            after_comma = False
        return group

    def pattern(
        self, group: list[_Token], start: int, end: int, label: str | None = None
    ) -> AxisPattern:
        spans = tuple((token.start, token.end) for token in group)
        axes = tuple(token.text for token in group)
        return AxisPattern(axes, self.fmt[start:end], start, spans, label)

    # ---------------------------------------------------------------- einsum-like

    def einsum(self) -> tuple[list[AxisPattern], list[AxisPattern], bool]:
        arrows = [token for token in self.tokens if token.kind in ("->", "<-")]
        if not arrows:
            message = "expected '->' (inputs -> outputs) or '<-' (outputs <- inputs)"
            raise pattern_error(self.fmt, 0, len(self.fmt), message)
        if len(arrows) > 1:
            raise self.error(arrows[1], f"a second {arrows[1].text!r}; use one arrow")
        arrow = arrows[0].kind
        sides = ("input", "output") if arrow == "->" else ("output", "input")
        lists = {}
        for side, closer in zip(sides, (arrow, "end"), strict=True):
            item = functools.partial(self.einsum_item, side, closer)
            lists[side] = self.patterns(item, (closer,), side == "output")
            self.advance()
        outputs, trailing = lists["output"]
        return lists["input"][0], outputs, len(outputs) > 1 or trailing

    def einsum_item(self, side: str, closer: str) -> AxisPattern:
        group = self.axes((",", closer), bracketed=False)
        if not group:
            hint = _EMPTY_HINTS[side]
            found = _describe_token(self.peek())
            raise self.error(self.peek(), f"empty {side} pattern before {found}; {hint}")
        return self.pattern(group, group[0].start, group[-1].end)

    # ---------------------------------------------------------------- dummy function

    def dummy(self) -> tuple[list[AxisPattern], list[AxisPattern], bool]:
        offset = 0  # call first if the string opens with a (dotted) name and '('
        while self.peek(offset).kind == "name" and self.peek(offset + 1).kind == ".":
            offset += 2
        if self.peek(offset).kind == "name" and self.peek(offset + 1).kind == "(":
            inputs = self.call()
            self.expect("->", "'->' after the call")
            outputs, is_tuple = self.outputs()
        else:
            outputs, is_tuple = self.outputs()
            self.expect("=", "'=' between the outputs and the call")
            inputs = self.call()
        self.expect("end", "the end of the pattern")
        return inputs, outputs, is_tuple

    def outputs(self) -> tuple[list[AxisPattern], bool]:
        target = functools.partial(self.operand, "an output name such as 'out'")
        if self.peek().kind != "(":
            outputs, trailing = self.patterns(target, ("=", "end"), True)
            return outputs, len(outputs) > 1 or trailing
        self.advance()
        if self.peek().kind == ")":
            raise self.error(self.peek(), "expected at least one output, found ')'")
        outputs, trailing = self.patterns(target, (")",), True)
        self.expect(")", "',' or ')'")
        return outputs, len(outputs) > 1 or trailing

    def call(self) -> list[AxisPattern]:
        self.dotted_name("a function name such as 'f'")
        self.expect("(", "'(' after the function name")
        arguments: list[AxisPattern] = []
        if self.peek().kind != ")":
            argument = functools.partial(self.operand, "an argument name such as 'A'")
            arguments, _ = self.patterns(argument, (")",), True)
        self.expect(")", "',' or ')'")
        return arguments

    def dotted_name(self, expected: str) -> tuple[str, int]:
        first = last = self.expect("name", expected)
        while self.peek().kind == ".":
            self.advance()
            last = self.expect("name", "a name after '.'")
        return self.fmt[first.start : last.end], first.start

    def operand(self, expected: str) -> AxisPattern:
        """``A[i, :, j]`` lowered to its axis tokens; a bare ``A`` to ``...`` (whole)."""
        label, start = self.dotted_name(expected)
        if self.peek().kind != "[":
            return AxisPattern((ELLIPSIS,), label, start, ((start, start + len(label)),), label)
        self.advance()
        group = self.axes(("]",), bracketed=True)
        return self.pattern(group, start, self.advance().end, label)


# ---------------------------------------------------------------- checks


def _check_plan(fmt: str, inputs: list[AxisPattern], outputs: list[AxisPattern]) -> None:
    for pattern in (*inputs, *outputs):
        seen: set[str] = set()
        for axis, (start, end) in zip(pattern.axes, pattern.spans, strict=True):
            if axis in seen:
                what = "'...'" if axis == ELLIPSIS else f"axis {axis!r}"
                message = f"{what} appears twice in pattern {pattern.text!r}"
                raise pattern_error(fmt, start, end, message)
            if axis != UNMAPPED:
                seen.add(axis)
    input_axes: dict[str, tuple[int, AxisPattern]] = {}
    for index, pattern in enumerate(inputs):
        for axis in pattern.named:
            input_axes.setdefault(axis, (index, pattern))
    for output in outputs:
        for axis in output.named:
            if axis not in input_axes:
                raise pattern_error(
                    fmt,
                    *output.span_of(axis),
                    f"output axis {axis!r} appears in no input pattern, so its size is unknown",
                )
    for axis, (index, pattern) in input_axes.items():
        for output in outputs:
            if axis not in output.named:
                raise pattern_error(
                    fmt,
                    *pattern.span_of(axis),
                    f"axis {axis!r} of argument {index} {describe(pattern)} is missing from"
                    f" output pattern {output.text!r}; every mapped axis must appear in every"
                    " output (use ':' to pass an axis to fn unmapped)",
                )


def parse_pattern(fmt: str) -> VmapPlan:
    """Parse a ``fancy_vmap`` format string into a `VmapPlan`.

    ``fancy_vmap`` calls this once, when it is called; use it directly to check a
    pattern or to see how it is read.

    Args:
        fmt: The format string, in the einsum-like or the dummy-function syntax.

    Returns:
        The plan: one pattern per argument and per output, and the nesting order.

    Raises:
        TypeError: ``fmt`` is not a string.
        ValueError: The pattern is empty or malformed; the message quotes it with
            carets under the offending token.

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


# Two or more names in parentheses with no comma between them: einops' axis grouping.
_GROUPING_RE = re.compile(r"\(\s*[^\W\d]\w*(?:\s+[^\W\d]\w*)+\s*\)")


def _check_foreign_syntax(fmt: str) -> None:
    """Notation from other tools that would otherwise fail with a puzzling message."""
    arrow = fmt.find("=>")
    if arrow >= 0:
        raise pattern_error(
            fmt, arrow, arrow + 2, "'=>' is not an arrow here; write '->' (inputs -> outputs)"
        )
    group = _GROUPING_RE.search(fmt)
    if group:
        names = group.group()[1:-1].split()
        raise pattern_error(
            fmt,
            group.start(),
            group.end(),
            f"grouping axes in parentheses, as einops does with {group.group()!r}, is not "
            "supported: each name maps one axis. Reshape the array so the grouped axes "
            f"are one ({' * '.join(names)}) and name it once ({''.join(names)!r}), or map "
            f"them as separate axes ({' '.join(names)!r})",
        )


@functools.lru_cache(maxsize=512)
def _parse_cached(fmt: str) -> VmapPlan:
    if not fmt.strip():
        raise pattern_error(fmt, 0, len(fmt), "empty pattern")
    _check_foreign_syntax(fmt)
    parser = _Parser(fmt)
    dummy = any(token.kind in _DUMMY_ONLY_KINDS for token in parser.tokens)
    inputs, outputs, tuple_output = parser.dummy() if dummy else parser.einsum()
    _check_plan(fmt, inputs, outputs)
    return VmapPlan(fmt, tuple(inputs), tuple(outputs), tuple_output, outputs[0].named)
