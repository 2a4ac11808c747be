"""The repository README: its examples run and print what their comments say, and CI
runs its test command."""

import contextlib
import io
import re
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.DOTALL)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_prints_what_it_promises(code):
    if "ring_attention(" in code:
        # conftest.py gives this process four CPU devices: the ring really is a ring.
        assert jax.device_count() > 1, "the ring_attention example needs several devices"
    # Each `print(...)  # expected` line promises its output in the trailing comment.
    promised = [
        line.split("#", 1)[1].strip()
        for line in code.splitlines()
        if line.startswith("print(") and "#" in line
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    assert out.getvalue().splitlines() == promised


def test_ci_runs_the_readme_test_command():
    # The Quickstart's first shell block: the demo, then the full test run.
    quickstart = TEXT.split("## Quickstart", 1)[1]
    commands = re.search(r"```bash\n(.*?)```", quickstart, flags=re.DOTALL)
    assert commands is not None, "the Quickstart has no bash block"
    demo, test = commands.group(1).strip().splitlines()
    assert demo.endswith(" -s demo") and demo.removesuffix(" -s demo") == test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci, f".ci/run does not run the README's test command {test!r}"
