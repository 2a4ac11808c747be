"""Check that the packages' source stays in rooms a newcomer can find their way in.

Fails (exit status 1, one line per problem) when, under ``packages/*/src``:

- a source file has more than ``MAX_FILE_LINES`` lines;
- a function's body has more than ``MAX_BODY_LINES`` lines (its docstring not counted);
- modules of one package import each other in a cycle. Every ``import`` statement
  counts, module-level or inside a function, and importing ``a.b.c`` also imports the
  packages ``a.b`` and ``a`` (their ``__init__`` runs first).

Run from the repository root: ``python tools/check_layout.py`` (the ``lint`` nox session
runs it). Standard library only.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_FILE_LINES = 700
MAX_BODY_LINES = 110

ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the end of the function."""
    body = node.body
    first = body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        body = body[1:]
    if not body:
        return 0
    end = node.end_lineno or body[-1].lineno
    return end - body[0].lineno + 1


def _imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """The absolute names of the modules that ``module`` imports."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            names.add(target)
            # ``from package import submodule`` imports the submodule too.
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def check(root: Path = ROOT) -> list[str]:
    problems: list[str] = []
    for src in sorted(root.glob("packages/*/src")):
        graph: dict[str, set[str]] = {}
        for path in sorted(src.rglob("*.py")):
            shown = path.relative_to(root)
            text = path.read_text(encoding="utf-8")
            lines = len(text.splitlines())
            if lines > MAX_FILE_LINES:
                problems.append(f"{shown}: {lines} lines (at most {MAX_FILE_LINES})")
            tree = ast.parse(text, filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    body = _body_lines(node)
                    if body > MAX_BODY_LINES:
                        problems.append(
                            f"{shown}:{node.lineno}: function {node.name} has a body of "
                            f"{body} lines (at most {MAX_BODY_LINES})"
                        )
            module = _module_name(path, src)
            graph[module] = _imports(tree, module, path.name == "__init__.py")
        # Keep the package's own modules; importing a.b.c also runs a.b and a, except the
        # packages the importer itself sits in (they are already running).
        for module, targets in graph.items():
            edges = set()
            for target in targets:
                parts = target.split(".")
                for n in range(1, len(parts) + 1):
                    name = ".".join(parts[:n])
                    if name in graph and name != module and not module.startswith(name + "."):
                        edges.add(name)
            graph[module] = edges
        for cycle in _cycles(graph):
            problems.append(f"{src.relative_to(root)}: import cycle between {', '.join(cycle)}")
    return problems


def main() -> int:
    problems = check()
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} layout problem(s)", file=sys.stderr)
        return 1
    print("layout: every file, function and import graph within bounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
