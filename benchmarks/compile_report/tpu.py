"""The TPU target: libtpu's compiler for TPU generations, on a host without a TPU.

libtpu's compile-only topologies (``get_topology_desc("v5e:1x1", platform="tpu")``)
give a device to place the inputs on; ``jax.jit(f).lower(...).compile()`` runs libtpu's
compiler as on a TPU machine. Per kernel (each ``tpu_custom_call`` of the compiled
program): its scoped VMEM, the sizes in ``used_scoped_memory_configs`` of its backend
config; per case: the program's temporary memory (``memory_analysis()``). A device is
a TPU generation (``TOPOLOGIES``); a plain run compiles for ``DEVICES``.

Gates, on our kernels: the case compiles; each kernel's scoped VMEM is inside the
generation's default scoped limit; the compiled program holds our kernels (a case that
silently fell back to the block loop has none). Cases the kernels refuse on purpose are
reported with the refusal and are not gated (``EXPECTED_REFUSALS``).

Needs ``libtpu`` beside jax (``pip install libtpu``).
"""

from __future__ import annotations

import datetime
import fnmatch
import os
import re
from pathlib import Path
from typing import Any

from compile_report.cases import HEADS, Case, jnp_dtype

NAME = "tpu"
TOPOLOGIES = {"v5e": "v5e:1x1", "v6e": "v6e:1x1", "v5p": "v5p:1x1x1", "v4": "v4:1x1x1"}
DEVICES = ("v5e", "v6e")
TIMEOUT = 400  # seconds per compile: a float32 case takes about a minute on two busy cores
# Default scoped VMEM limit per generation (what a kernel gets without
# vmem_limit_bytes): 16 MiB on v4, v5e and v5p, 32 MiB on v6e.
SCOPED_LIMIT = {"v5e": 16 << 20, "v6e": 32 << 20, "v5p": 16 << 20, "v4": 16 << 20}
OURS = "block_attention_"
# Cases the kernels refuse when compiled, on purpose (the block loop takes them; the
# report shows the refusal). None today.
EXPECTED_REFUSALS: tuple[str, ...] = ()


def setup(workdir: Path) -> None:
    """Before jax is imported: several compile-only libtpu processes at once (otherwise
    the second one fails on libtpu's lockfile), and no metadata server to ask."""
    del workdir
    os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    os.environ["TPU_SKIP_MDS_QUERY"] = "1"


def device(name: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The compile-only device of one TPU generation (``TOPOLOGIES``; v5e by default)."""
    from jax.experimental import topologies

    generation = name or DEVICES[0]
    if generation not in TOPOLOGIES:
        raise ValueError(f"device: expected one of {sorted(TOPOLOGIES)}, got {generation!r}")
    topology = topologies.get_topology_desc(topology_name=TOPOLOGIES[generation], platform="tpu")
    return topology.devices[0], {"memory_limit": SCOPED_LIMIT[generation], "arch": generation}


def compile_on(dev: Any, fn: Any, args: tuple[Any, ...]) -> Any:
    """Compile for ``dev``: the inputs are placed on it."""
    import jax

    del dev
    return jax.jit(fn).lower(*args).compile()


_CALL = re.compile(r"%([\w.\-]+) = .*?custom_call_target=\"tpu_custom_call\"", re.S)
_SCOPED = re.compile(r"used_scoped_memory_configs\\?\":\[(.*?)\]")
_SIZE = re.compile(r"size\\?\":\\?\"(\d+)")


def parse_kernels(text: str) -> list[dict[str, Any]]:
    """One row per ``tpu_custom_call`` of a compiled program's text: its name and scoped
    VMEM (bytes)."""
    rows = []
    # One entry per instruction: an instruction's attributes may span several lines.
    for line in re.split(r"\n(?=\s*(?:ROOT )?%)", text):
        match = _CALL.search(line)
        if match is None:
            continue
        scoped = _SCOPED.search(line)
        sizes = [int(s) for s in _SIZE.findall(scoped.group(1))] if scoped else []
        rows.append({"kernel": match.group(1).rsplit(".", 1)[0], "vmem": sum(sizes)})
    return rows


def kernels(workdir: Path, compiled: Any, reference: bool) -> list[dict[str, Any]]:
    """Every ``tpu_custom_call`` of the compiled program (``--keep`` keeps its text as
    ``program.txt``); the gates pick ours by name."""
    del reference
    text = compiled.as_text()
    (workdir / "program.txt").write_text(text)
    return parse_kernels(text)


def case_facts(compiled: Any, case: Case, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per case: the program's temporary memory, and why the kernels refused it when
    the program holds none of ours."""
    memory = compiled.memory_analysis()
    facts: dict[str, Any] = {"temp": getattr(memory, "temp_size_in_bytes", None)}
    if not case.reference and not any(OURS in r["kernel"] for r in rows):
        facts["refusal"] = _refusal(case)
    return facts


def _refusal(case: Case) -> str:
    """Why the kernels refused a case on a TPU (``explain_dispatch``)."""
    import jax.numpy as jnp

    from jaxmodules.attention import explain_dispatch

    q = jnp.zeros((1, 256, HEADS, case.d), jnp_dtype(case.dtype))
    ids = jnp.zeros((1, 256), jnp.int32)
    decision = explain_dispatch(
        q, q, q, mask_fn=lambda b, h, qi, ki: ids[b, qi] == ids[b, ki], platform="tpu"
    )["tpu"]
    return "; ".join(f"{k}: {v}" for k, v in decision.refusals.items())


def versions() -> dict[str, str]:
    """libtpu's version, for the report's header."""
    from importlib import metadata

    try:
        return {"libtpu": metadata.version("libtpu")}
    except metadata.PackageNotFoundError:  # pragma: no cover - reported as unknown
        return {"libtpu": "?"}


def _expected_refusal(case: Case) -> bool:
    return any(fnmatch.fnmatch(case.id, p) for p in EXPECTED_REFUSALS)


def gate(results: list[dict[str, Any]], info: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Every gate one of our kernels misses, one line each, per generation (``device``
    of each result); no offence is known and tracked here."""
    del info
    problems = []
    for r in results:
        case, gen = r["case"], r["device"]
        where = f"{gen} {case.id}"
        if case.reference:
            continue
        if r["error"]:
            problems.append(f"{where}: does not compile ({r['error']})")
            continue
        ours = [row for row in r["rows"] if OURS in row["kernel"]]
        if not ours and not _expected_refusal(case):
            problems.append(f"{where}: no tpu_custom_call of ours (fell back to the block loop)")
        for row in ours:
            if row["vmem"] > SCOPED_LIMIT[gen]:
                problems.append(
                    f"{where} {row['kernel']}: {row['vmem'] / 2**20:.1f} MiB scoped VMEM, over "
                    f"the {SCOPED_LIMIT[gen] >> 20} MiB default limit"
                )
    return problems, []


def table(results: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """The markdown table: one row per kernel of ours (every kernel of a reference case),
    or one row saying why a case has none."""
    del info
    lines = [
        "| TPU | case | kernel | scoped VMEM MiB | temp MiB | compile s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        case = r["case"]
        head = f"| {r['device']} | {case.id}{' (jax)' if case.reference else ''} "
        # The compile in its process (libtpu's start and jax's import left out).
        compile_seconds = r.get("compile_seconds")
        seconds = f"{r['seconds'] if compile_seconds is None else compile_seconds:.0f}"
        if r["error"]:
            lines.append(head + f"| **compile error**: {r['error'][:200]} | | | {seconds} |")
            continue
        temp = r.get("temp")
        temp_text = "" if temp is None else f"{temp / 2**20:.0f}"
        rows = r["rows"] if case.reference else [x for x in r["rows"] if OURS in x["kernel"]]
        if not rows:
            why = r.get("refusal") or "no kernel"
            lines.append(
                head + f"| block loop (refused: {why[:160]}) | | {temp_text} | {seconds} |"
            )
        for row in rows:
            vmem = f"{row['vmem'] / 2**20:.2f}" if row["vmem"] else "not stated"
            lines.append(head + f"| {row['kernel']} | {vmem} | {temp_text} | {seconds} |")
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
    del known
    verdict = "All our kernels pass." if not problems else "\n".join(f"- {p}" for p in problems)
    gens = sorted({r["device"] for r in results})
    limits = ", ".join(f"{g} {SCOPED_LIMIT[g] >> 20} MiB" for g in gens)
    per_gen = {g: sum(r["device"] == g for r in results) for g in gens}
    scope = " (" + ", ".join(f"{g}: {n} cases" for g, n in per_gen.items()) + ")"
    versions = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())
    return f"""# The attention kernels compiled by libtpu

Written by `benchmarks/compile_report --target tpu` (`nox -s tpu_compile`) on
{datetime.date.today().isoformat()}: {versions}, on a CPU
host with libtpu's compile-only topologies ({", ".join(TOPOLOGIES[g] for g in gens)}). Each
case is `masked_attention_via_map(q, k, v, ...)` with `implementation=None` as a TPU user
calls it (fwd+grad: under `jax.value_and_grad`), B=1, {HEADS} query heads (GQA: 4 key/value
heads), compiled by `jax.jit(f).lower(...).compile()`; decoding: 16 queries against the
keys. Scoped VMEM per kernel from each `tpu_custom_call`'s `scoped_memory_configs`; temp:
the program's temporary memory (`memory_analysis()`). Rows marked (jax) are splash
attention (`make_splash_mha`, `CausalMask`, forward and gradients), compiled the same way.
{len(results)} compiles, one process each, in {seconds:.0f} s{scope}.

Gates, on our kernels: compiles; scoped VMEM inside the default scoped limit ({limits});
the program holds our `tpu_custom_call`s (no silent fallback to the block loop). The
documents case is a `mask_fn` reading segment ids that are an input of the program
(`ids[b, q] == ids[b, k]`): the reads are made per query row and per key column before
the kernels, which get them as tiles.

{verdict}

{table(results, info)}
{history}"""
