"""Error messages that quote the format string and point at the offending part of it."""

from __future__ import annotations


def pattern_error(fmt: str, start: int, end: int, message: str) -> ValueError:
    """A ``ValueError`` whose message shows ``fmt`` with carets under ``fmt[start:end]``.

    Only the line of ``fmt`` that holds ``start`` is shown, so patterns written as
    multi-line strings still get a caret in the right column.
    """
    start = max(0, min(start, len(fmt)))
    line_start = fmt.rfind("\n", 0, start) + 1
    line_end = fmt.find("\n", start)
    if line_end == -1:
        line_end = len(fmt)
    line = fmt[line_start:line_end]
    column = start - line_start
    width = max(1, min(end, line_end) - start)
    # Keep tabs so the caret lines up however the terminal renders them.
    indent = "".join("\t" if char == "\t" else " " for char in line[:column])
    return ValueError(f"fancy_vmap: {message}\n    {line}\n    {indent}{'^' * width}")
