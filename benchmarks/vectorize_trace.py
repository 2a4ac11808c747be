"""Trace overhead of ``fancy_vmap`` against the equivalent hand-written nest of ``jax.vmap``.

For each case, the time to ``jax.make_jaxpr`` the vectorized function is measured many
times, alternating between ``fancy_vmap`` and the hand-written nest so that both see the
same machine load; the table gives the medians and their ratio. The time to parse the
pattern (once, when ``fancy_vmap`` is called) is listed separately.

Run: ``python benchmarks/vectorize_trace.py [--repeats N]``; the table is also written to
``benchmarks/results/vectorize_trace.txt``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxmodules.vectorize import fancy_vmap
from jaxmodules.vectorize._parse import _parse_cached

RESULTS = Path(__file__).parent / "results" / "vectorize_trace.txt"


def seed_fn(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    return a + jnp.sum(b) + c


def layer(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return jnp.tanh(params["w"] @ x + params["b"])


def cases() -> list[tuple[str, Callable[..., Any], str, Callable[..., Any], tuple[Any, ...]]]:
    """(name, fn, pattern, hand-written nest, arguments)."""
    ones = jnp.ones
    return [
        (
            "outer product",
            jnp.multiply,
            "i, j -> i j",
            jax.vmap(jax.vmap(jnp.multiply, in_axes=(None, 0)), in_axes=(0, None)),
            (ones(32), ones(16)),
        ),
        (
            "seed Example 2 (corrected)",
            seed_fn,
            "i : j, : j, i -> : i j",
            jax.vmap(
                jax.vmap(seed_fn, in_axes=(1, 1, None), out_axes=1),
                in_axes=(0, None, 0),
                out_axes=1,
            ),
            (ones((3, 5, 4)), ones((7, 4)), ones(3)),
        ),
        (
            "attention scores, 4 axes",
            jnp.dot,
            "scores[b, h, q, k] = dot(Q[b, q, h, :], K[b, k, h, :])",
            jax.vmap(
                jax.vmap(
                    jax.vmap(jax.vmap(jnp.dot, in_axes=(None, 0)), in_axes=(0, None)),
                    in_axes=(1, 1),
                ),
                in_axes=(0, 0),
            ),
            (ones((2, 64, 4, 16)), ones((2, 64, 4, 16))),
        ),
        (
            "pytree params x batch",
            layer,
            "m ..., n : -> m n :",
            jax.vmap(jax.vmap(layer, in_axes=(None, 0)), in_axes=(0, None)),
            ({"w": ones((4, 8, 8)), "b": ones((4, 8))}, ones((32, 8))),
        ),
    ]


def trace_seconds(target: Callable[..., Any], args: tuple[Any, ...]) -> float:
    # A fresh outer callable each time, so no trace cache keyed on it can answer.
    start = time.perf_counter()
    jax.make_jaxpr(lambda *a: target(*a))(*args)
    return time.perf_counter() - start


def parse_seconds(fmt: str, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        _parse_cached.__wrapped__(fmt)  # bypass the cache: the cost of the one real parse
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def processor_name() -> str:
    name = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # Linux leaves platform.processor() empty or vague
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return name or "(processor not reported)"


def machine() -> list[str]:
    return [
        f"machine: {platform.machine()}, {processor_name()}",
        f"cpu count: {os.cpu_count()}",
        f"platform: {platform.system()} {platform.release()}",
        f"python: {sys.version.split()[0]}",
        f"jax: {jax.__version__}, backend: {jax.default_backend()}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300, help="timed traces per function")
    parser.add_argument("--warmup", type=int, default=20)
    options = parser.parse_args()

    header = (
        f"{'case':<28} {'fancy_vmap ms':>14} {'hand-written ms':>16} {'ratio':>7} {'parse us':>9}"
    )
    lines = [*machine(), f"repeats: {options.repeats} (median)", "", header, "-" * len(header)]
    ratios = []
    for name, fn, fmt, hand, args in cases():
        vectorized = fancy_vmap(fn, fmt)
        if jax.make_jaxpr(vectorized)(*args).out_avals != jax.make_jaxpr(hand)(*args).out_avals:
            raise SystemExit(f"{name}: fancy_vmap and the hand-written nest disagree")
        for _ in range(options.warmup):
            trace_seconds(vectorized, args)
            trace_seconds(hand, args)
        ours, theirs = [], []
        for _ in range(options.repeats):
            ours.append(trace_seconds(vectorized, args))
            theirs.append(trace_seconds(hand, args))
        ours_ms, theirs_ms = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
        ratios.append(ours_ms / theirs_ms)
        parse_us = parse_seconds(fmt, options.repeats) * 1e6
        lines.append(
            f"{name:<28} {ours_ms:>14.3f} {theirs_ms:>16.3f} {ratios[-1]:>7.3f} {parse_us:>9.1f}"
        )
    lines += ["", f"geometric mean ratio: {statistics.geometric_mean(ratios):.3f}"]
    report = "\n".join(lines)
    print(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report + "\n")


if __name__ == "__main__":
    main()
