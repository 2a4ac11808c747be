"""The package README's code runs, and prints what the README says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.mark.skipif(not README.exists(), reason="README.md not shipped alongside the tests")
def test_readme_examples_run_and_print_what_it_shows() -> None:
    output = io.StringIO()
    namespace: dict[str, object] = {}
    with contextlib.redirect_stdout(output):
        for code in blocks("python"):
            exec(code, namespace)
    printed = output.getvalue()
    lines = printed.splitlines()
    assert lines[0] == "(5, 3, 4)"
    assert lines[1] == "(3, 4) True"
    shown_error = blocks("text")[-1]
    assert shown_error in printed
