"""Prints the largest differences the PyTorch comparison saw, per case."""

from __future__ import annotations

from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    import sys

    module = next(
        (m for name, m in sys.modules.items() if name.endswith("test_flex_vs_torch")), None
    )
    differences = getattr(module, "DIFFERENCES", None)
    if not differences:
        return
    write = terminalreporter.write_line
    write("")
    write("largest |ours - PyTorch| (out, lse) and |ours - float64 reference| (gradients):")
    write(f"{'case':<40} {'out':>9} {'lse':>9} {'grads':>9}")
    for name, values in differences.items():
        cells = [
            f"{values[q]:9.1e}" if q in values else f"{'-':>9}" for q in ("out", "lse", "grads")
        ]
        write(f"{name:<40} {' '.join(cells)}")
    worst = {
        q: max((v.get(q, 0.0) for v in differences.values()), default=0.0)
        for q in ("out", "lse", "grads")
    }
    write(f"{'largest':<40} " + " ".join(f"{worst[q]:9.1e}" for q in ("out", "lse", "grads")))
