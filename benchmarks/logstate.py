"""Cost of reading Logs out of a large state, relative to flattening it with jax.

The state is a model-sized pytree: 100 blocks of 99 parameter arrays each and one `Log`
per block, 10,000 leaves in all. Each operation is timed many times and its median per
call is compared with the median of `jax.tree_util.tree_leaves` on the same state.

Run: python benchmarks/logstate.py   (writes benchmarks/results/logstate.txt)
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import timeit
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import jax
import numpy as np

from jaxmodules.logstate import (
    Log,
    fetch_logs,
    list_of_logs,
    map_logs,
    named_logs,
    reset_logs,
)

BLOCKS = 100
ARRAYS_PER_BLOCK = 99
REPEATS = 21
RESULTS = Path(__file__).parent / "results" / "logstate.txt"


def make_state() -> dict:
    rng = np.random.default_rng(0)
    host = rng.normal(size=(BLOCKS * ARRAYS_PER_BLOCK, 4)).astype(np.float32)
    arrays = iter(jax.device_put(list(host)))  # one batched transfer
    norms = iter(jax.device_put(list(rng.normal(size=BLOCKS).astype(np.float32))))
    blocks = []
    for _ in range(BLOCKS):
        attn = {f"w{j:02d}": next(arrays) for j in range(ARRAYS_PER_BLOCK // 2)}
        mlp = {f"w{j:02d}": next(arrays) for j in range(ARRAYS_PER_BLOCK - len(attn))}
        blocks.append({"attn": attn, "mlp": mlp, "stats": {"act_norm": Log(next(norms))}})
    return {"blocks": blocks}


class TrainState:
    """A plain (non-pytree) holder, like the one in the package README."""

    def __init__(self, state: dict) -> None:
        self.params = state["blocks"]
        self.step = 0


def measure(operations: dict[str, Callable[[], object]], number: int) -> dict[str, list[float]]:
    """Seconds per call, one sample per round; the operations take turns in every round,
    so a slow spell of a shared machine hits the baseline and the others alike."""
    samples: dict[str, list[float]] = {name: [] for name in operations}
    for _ in range(REPEATS):
        for name, fn in operations.items():
            samples[name].append(timeit.timeit(fn, number=number) / number)
    return samples


def machine_info() -> list[str]:
    device = jax.devices()[0]
    return [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"python: {sys.version.split()[0]} ({platform.python_implementation()})",
        f"platform: {platform.platform()}",
        f"processor: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
        f"jax {jax.__version__}, jaxlib {version('jaxlib')}, numpy {np.__version__}",
        f"device: {device.platform} ({device.device_kind})",
    ]


def main() -> None:
    state = make_state()
    plain = TrainState(state)
    n_leaves = len(jax.tree_util.tree_leaves(state))
    n_logs = len(list_of_logs(state))
    if (n_leaves, n_logs) != (BLOCKS * (ARRAYS_PER_BLOCK + 1), BLOCKS):
        raise RuntimeError(f"unexpected state: {n_leaves} leaves, {n_logs} Logs")

    baseline = "jax.tree_util.tree_leaves(state)"
    operations: dict[str, Callable[[], object]] = {
        baseline: lambda: jax.tree_util.tree_leaves(state),
        "list_of_logs(state)": lambda: list_of_logs(state),
        "named_logs(state)": lambda: named_logs(state),
        "list_of_logs(plain TrainState)": lambda: list_of_logs(plain),
        "named_logs(plain TrainState)": lambda: named_logs(plain),
        "map_logs(lambda x: x, state)": lambda: map_logs(lambda x: x, state),
        "reset_logs(state)": lambda: reset_logs(state),
        "fetch_logs(state)": lambda: fetch_logs(state),
    }
    for fn in operations.values():
        fn()  # warm up: compile reset_logs's zeros, fill caches
    samples = measure(operations, number=5)
    base = samples[baseline]

    lines = [
        "jaxmodules.logstate: reading Logs out of a state",
        f"state: {n_leaves} leaves (jax.tree_util.tree_leaves), {n_logs} Logs; "
        f"medians of {REPEATS} interleaved rounds (ratio: median of the per-round ratios)",
        *machine_info(),
        "",
        f"{'operation':<44} {'median ms':>10} {'x tree_leaves':>14}",
    ]
    for name, times in samples.items():
        ratio = statistics.median(t / b for t, b in zip(times, base, strict=True))
        lines.append(f"{name:<44} {statistics.median(times) * 1e3:>10.3f} {ratio:>14.2f}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
