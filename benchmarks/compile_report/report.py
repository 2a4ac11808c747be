"""Gates and the markdown report, the same for every target.

A result is one case's compile: ``{"case": Case, "rows": [...], "error": str | None,
"seconds": float}``. Gates apply to our kernels only; a reference kernel that cannot be
built on the installed jax is reported as such.
"""

from __future__ import annotations

import datetime
from typing import Any


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}".removesuffix(".0")


def refused(result: dict[str, Any]) -> bool:
    """A case our dispatcher refuses today, refused as expected: listed, not gated."""
    error = result["error"] or ""
    return bool(result["case"].refused and "cannot compute this call" in error)


def offenders(results: list[dict[str, Any]], memory_limit: int) -> list[str]:
    """Every gate one of our kernels misses, one line each: a compile error, on-chip
    memory over the device's limit per block, any spill."""
    problems = []
    for result in results:
        case = result["case"]
        if case.reference or refused(result):
            continue
        if result["error"]:
            problems.append(f"{case.id}: does not compile ({result['error']})")
            continue
        if not result["rows"]:
            problems.append(f"{case.id}: compiled, but no attention kernel was found in it")
        for row in result["rows"]:
            where = f"{case.id} {row['kernel']}"
            memory = row.get("memory")
            if memory is not None and memory > memory_limit:
                problems.append(
                    f"{where}: {_kib(memory)} KiB of on-chip memory, over the "
                    f"{_kib(memory_limit)} KiB limit (cannot launch)"
                )
            spilled = row.get("spill_stores", 0) + row.get("spill_loads", 0)
            if spilled:
                problems.append(
                    f"{where}: spills ({row['spill_stores']} B stored, "
                    f"{row['spill_loads']} B loaded)"
                )
    return problems


def table(results: list[dict[str, Any]], memory_limit: int) -> str:
    lines = [
        "| case | d | dtype | kernel | threads | shared KiB | registers "
        "| spill B (stores/loads) | tensor cores | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        case = result["case"]
        head = f"| {case.name}{' (jax)' if case.reference else ''} | {case.d} | {case.dtype} "
        seconds = f"{result['seconds']:.0f}"
        if result["error"]:
            what = "**compile error**"
            if case.reference or refused(result):
                what = "not built" if case.reference else "refused, not built"
            lines.append(head + f"| {what}: {result['error'][:200]} | | | | | | {seconds} |")
            continue
        for row in result["rows"]:
            memory = row.get("memory")
            if memory is None:
                shared = "checked at lowering" if case.reference else "?"
            else:
                over = " **over**" if memory > memory_limit else ""
                shared = f"{_kib(memory)}{over}"
            lines.append(
                head + f"| {row['kernel']} | {row.get('threads', '')} | {shared} "
                f"| {row['registers']} | {row['spill_stores']} / {row['spill_loads']} "
                f"| {row.get('tensor_cores', '')} | {seconds} |"
            )
    return "\n".join(lines)


def markdown(
    results: list[dict[str, Any]],
    problems: list[str],
    info: dict[str, Any],
    seconds: float,
    history: str,
    known: list[str] | None = None,
) -> str:
    """The report file: how it was made, the verdict, the table, and what came before."""
    verdict = (
        "All our kernels pass."
        if not problems
        else f"{len(problems)} offences:\n\n" + "\n".join(f"- {p}" for p in problems)
    )
    if known:
        verdict += (
            f"\n\n{len(known)} known spills, tracked (reported, not failing the run):\n\n"
            + "\n".join(f"- {p}" for p in known)
        )
    not_built = [r["case"].id for r in results if refused(r)]
    if not_built:
        verdict += (
            "\n\nRefused by our dispatcher today, so not built (listed, not gated): "
            + ", ".join(not_built)
            + "."
        )
    missing = [r["case"].id for r in results if r["case"].reference and r["error"]]
    if missing:
        verdict += (
            "\n\nReference kernels this jax could not build (reported, not gated): "
            + ", ".join(missing)
            + "."
        )
    limit = info["memory_limit"]
    versions = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())
    return f"""# The attention kernels compiled by XLA for an H100

Written by `benchmarks/compile_report` (`nox -s gpu_compile`) on
{datetime.date.today().isoformat()}: {versions}, on a CPU host. Each case is the public
call a GPU user makes (`masked_attention_via_map(..., implementation="triton")`, and
`implementation="mosaic_gpu"` for the rows named mosaic-*), with `jax.value_and_grad`
for training, compiled by `jax.jit(f).lower(...).compile()` for the CUDA plugin's
compile-only `{info.get("device", "")}`: XLA's own GPU pipeline, ending in `ptxas` for
{info["arch"]}. Registers and spills from `ptxas -v`, run with XLA's own arguments;
threads and shared memory per block from XLA's thunk sequence, and for Mosaic GPU
kernels (a custom call, not in that sequence) from the scratch Mosaic sizes as it lowers
them. Registers of a Mosaic GPU kernel are the launch's share (3 warpgroups: 168); the
consumer warpgroups raise theirs at run time (`setmaxnreg`). Causal cases: B=1, L=8192,
16 heads (GQA: 16 query and 4 key/value heads); decoding: 16 queries of 4 heads against
8192 keys (Triton: split-K); documents: eight of 1024 (Mosaic GPU: a block mask built
beforehand, its kernels take no closed-over arrays yet); ALiBi (Mosaic GPU): slopes
computed from the head. Rows marked (jax) are jax's Mosaic GPU attention
(`jax.experimental.pallas.ops.gpu.attention_mgpu`, float16 only; its backward refuses
causal, so its gradient rows are full attention), compiled the same way.
{len(results)} compiles, one process each, in {seconds:.0f} s.

Gates, on our kernels: it compiles; shared memory at most {_kib(limit)} KiB per block
(the device's opt-in maximum); no spills.

{verdict}

{table(results, limit)}
{history}"""
