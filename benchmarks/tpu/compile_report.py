"""The attention kernels compiled by libtpu for TPUs, on a CPU host (no TPU needed).

Each case is the call a TPU user makes (``masked_attention_via_map`` with
``implementation=None``, the choice made for the platform of the lowering, under
``jax.value_and_grad`` for training), placed on one device of a libtpu compile-only
topology (``jax.experimental.topologies.get_topology_desc``) and compiled by
``jax.jit(f).lower(...).compile()``. Per kernel (each ``tpu_custom_call`` of the
compiled program): its scoped VMEM (``scoped_memory_configs`` of its backend config);
per case: compile time and the program's temporary memory. jax's splash attention,
compiled the same way, gives the reference rows. Each compile runs in its own process.

Gates, on our kernels: the case compiles; each kernel's scoped VMEM is inside the
generation's default scoped limit; the compiled program holds our kernels (a case that
silently fell back to the block loop has none). Cases the kernels refuse on purpose are
reported with the refusal and are not gated (``EXPECTED_REFUSALS``).

    python benchmarks/tpu/compile_report.py                       # the CI run (below)
    python benchmarks/tpu/compile_report.py --full                # every case on v5e and v6e
    python benchmarks/tpu/compile_report.py --topologies v5p v4 --only 'causal-*'
    python benchmarks/tpu/compile_report.py --list

Needs ``libtpu`` beside jax (``pip install libtpu``). Exit status 1 on an offence.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import datetime
import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "benchmarks" / "results" / "attention_tpu_compile.md"
TOPOLOGIES = {"v5e": "v5e:1x1", "v6e": "v6e:1x1", "v5p": "v5p:1x1x1", "v4": "v4:1x1x1"}
# Default scoped VMEM limit per generation (what a kernel gets without
# vmem_limit_bytes): 16 MiB on v4, v5e and v5p, 32 MiB on v6e.
SCOPED_LIMIT = {"v5e": 16 << 20, "v6e": 32 << 20, "v5p": 16 << 20, "v4": 16 << 20}
LENGTH, HEADS = 8192, 16
OURS = "block_attention_"
# The CI run (no --full): every case on v5e, and on v6e the cases whose kernels differ
# in kind (bf16 and f32 tiles, a mask read from the inputs) with the splash row to compare.
# v6e's scoped limit is twice v5e's, so a case that fits v5e and is not listed here has
# only its compile on v6e left unchecked; ``--full`` compiles it.
CI_SUBSET = {
    "v6e": (
        "causal-d128-bf16-L8192-fwd+grad",
        "causal-d128-f32-L8192-fwd+grad",
        "documents-d128-bf16-L8192-fwd+grad",
        "splash-causal-d128-bf16-L8192-fwd+grad",
    ),
}
# Cases the kernels refuse when compiled, on purpose (the block loop takes them; the
# report shows the refusal). None today.
EXPECTED_REFUSALS: tuple[str, ...] = ()


@dataclass(frozen=True)
class Case:
    name: str
    d: int
    dtype: str
    length: int = LENGTH
    grad: bool = True
    reference: bool = False  # jax's splash attention: reported, never gated

    @property
    def id(self) -> str:
        kind = "fwd+grad" if self.grad else "fwd"
        return f"{self.name}-d{self.d}-{self.dtype}-L{self.length}-{kind}"


def all_cases() -> list[Case]:
    cases = [Case("causal", d, dt) for d in (64, 128, 256) for dt in ("bf16", "f32")]
    cases += [Case(n, 128, "bf16") for n in ("documents", "window", "alibi", "gqa", "dropout")]
    cases += [Case("decode", 128, "bf16", grad=False), Case("causal", 128, "bf16", 32768, False)]
    cases += [Case("splash-causal", d, "bf16", reference=True) for d in (64, 128, 256)]
    return cases


def _dtype(name: str) -> Any:
    import jax.numpy as jnp

    return {"bf16": jnp.bfloat16, "f32": jnp.float32}[name]


def _ours(case: Case, place: Callable[..., Any]) -> tuple[Callable[..., Any], tuple]:
    import jax
    import jax.numpy as jnp

    from jaxmodules.attention import masked_attention_via_map

    dt, n = _dtype(case.dtype), case.length
    q_len = 16 if case.name == "decode" else n
    q = place((1, q_len, HEADS, case.d), dt)
    kv = place((1, n, 4 if case.name == "gqa" else HEADS, case.d), dt)
    args: tuple = (q, kv, kv)
    options: dict[str, Any] = {"is_causal": True}
    if case.name == "window":
        options = {"window_size": (1024, 0)}
    elif case.name == "alibi":

        def alibi(score: Any, b: Any, h: Any, qi: Any, ki: Any) -> Any:
            slope = jnp.exp2(-0.5 * (h + 1).astype(jnp.float32))
            return score - slope * jnp.abs(qi - ki).astype(jnp.float32)

        options["score_mod"] = alibi
    elif case.name == "decode":
        options["q_offset"] = n - q_len

    def attend(q: Any, k: Any, v: Any, *extra: Any) -> Any:
        kw = dict(options)
        if case.name == "documents":
            (ids,) = extra
            kw["mask_fn"] = lambda b, h, qi, ki: ids[b, qi] == ids[b, ki]
        if case.name == "dropout":
            kw.update(dropout_rate=0.1, dropout_rng=jax.random.key(0))
        return masked_attention_via_map(q, k, v, **kw)

    if case.name == "documents":
        args = (*args, place((1, n), jnp.int32))
    if not case.grad:
        return attend, args

    def loss(*a: Any) -> Any:
        return attend(*a).astype(jnp.float32).sum()

    return jax.value_and_grad(loss, argnums=(0, 1, 2)), args


def _splash(case: Case, place: Callable[..., Any]) -> tuple[Callable[..., Any], tuple]:
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    n = case.length
    mask = masks.MultiHeadMask([masks.CausalMask((n, n)) for _ in range(HEADS)])
    kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1)
    x = place((HEADS, n, case.d), _dtype(case.dtype))

    def loss(q: Any, k: Any, v: Any) -> Any:
        return kernel(q, k, v).astype(jnp.float32).sum()

    return jax.value_and_grad(loss, argnums=(0, 1, 2)), (x, x, x)


_CALL = re.compile(r"%([\w.\-]+) = .*?custom_call_target=\"tpu_custom_call\"", re.S)
_SCOPED = re.compile(r"used_scoped_memory_configs\\?\":\[(.*?)\]")
_SIZE = re.compile(r"size\\?\":\\?\"(\d+)")


def kernels(text: str) -> list[dict[str, Any]]:
    """One row per ``tpu_custom_call`` of a compiled program: its name and scoped VMEM."""
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


def worker(case_id: str, generation: str, out: Path) -> None:
    """In a fresh process: compile one case for one generation, write JSON to ``out``."""
    import jax
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    result: dict[str, Any] = {"rows": [], "error": None, "refusal": None}
    start = time.perf_counter()
    try:
        (case,) = [c for c in all_cases() if c.id == case_id]
        topo = topologies.get_topology_desc(topology_name=TOPOLOGIES[generation], platform="tpu")
        dev = topo.devices[0]
        sharding = NamedSharding(Mesh(np.array([dev]), ("x",)), PartitionSpec())

        def place(shape: tuple[int, ...], dtype: Any) -> Any:
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        fn, args = (_splash if case.reference else _ours)(case, place)
        compiled = jax.jit(fn).lower(*args).compile()
        text = compiled.as_text()
        result["rows"] = kernels(text)
        if os.environ.get("TPU_COMPILE_DUMP"):
            Path(os.environ["TPU_COMPILE_DUMP"]).write_text(text)
        memory = compiled.memory_analysis()
        result["temp"] = getattr(memory, "temp_size_in_bytes", None)
        result["device"] = dev.device_kind
        if not case.reference and not any(OURS in r["kernel"] for r in result["rows"]):
            result["refusal"] = _refusal(case, place)
    except Exception as err:  # any failure is a finding, reported per case
        text = str(err).strip()
        result["error"] = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]
        traceback.print_exc()
    result["seconds"] = time.perf_counter() - start
    out.write_text(json.dumps(result))


def _refusal(case: Case, place: Callable[..., Any]) -> str:
    """Why the kernels refused a case on a TPU (``explain_dispatch``)."""
    import jax.numpy as jnp

    from jaxmodules.attention import explain_dispatch

    q = jnp.zeros((1, 256, HEADS, case.d), _dtype(case.dtype))
    ids = jnp.zeros((1, 256), jnp.int32)
    decision = explain_dispatch(
        q, q, q, mask_fn=lambda b, h, qi, ki: ids[b, qi] == ids[b, ki], platform="tpu"
    )["tpu"]
    return "; ".join(f"{k}: {v}" for k, v in decision.refusals.items())


def compile_case(case: Case, generation: str, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--worker", case.id, generation, str(out)]
        start = time.perf_counter()
        try:
            # Several compile-only libtpu processes at once (otherwise the second one
            # fails on libtpu's lockfile).
            env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1"}
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False, env=env
            )
            if out.exists():
                result = json.loads(out.read_text())
            else:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                result = {"rows": [], "error": f"process ended ({done.returncode}): {tail}"}
        except subprocess.TimeoutExpired:
            result = {"rows": [], "error": f"no result within {timeout:.0f} s"}
        result["wall"] = time.perf_counter() - start
    result.update(case=case, generation=generation)
    return result


def _expected_refusal(case: Case) -> bool:
    return any(fnmatch.fnmatch(case.id, p) for p in EXPECTED_REFUSALS)


def offenders(results: list[dict[str, Any]]) -> list[str]:
    problems = []
    for r in results:
        case, gen = r["case"], r["generation"]
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
    return problems


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| TPU | case | kernel | scoped VMEM MiB | temp MiB | compile s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        case = r["case"]
        head = f"| {r['generation']} | {case.id}{' (jax)' if case.reference else ''} "
        seconds = f"{r.get('seconds', r['wall']):.0f}"
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


def markdown(results: list[dict[str, Any]], problems: list[str], seconds: float) -> str:
    import jax

    verdict = "All our kernels pass." if not problems else "\n".join(f"- {p}" for p in problems)
    gens = sorted({r["generation"] for r in results})
    limits = ", ".join(f"{g} {SCOPED_LIMIT[g] >> 20} MiB" for g in gens)
    per_gen = {g: sum(r["generation"] == g for r in results) for g in gens}
    scope = " (" + ", ".join(f"{g}: {n} cases" for g, n in per_gen.items()) + ")"
    return f"""# The attention kernels compiled by libtpu

Written by `benchmarks/tpu/compile_report.py` (`nox -s tpu_compile`) on
{datetime.date.today().isoformat()}: jax {jax.__version__}, libtpu {_libtpu_version()}, on a CPU
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

{table(results)}
"""


def _in_ci_run(case: Case, generation: str) -> bool:
    """Whether the run without ``--full`` compiles ``case`` for ``generation``."""
    subset = CI_SUBSET.get(generation)
    return subset is None or case.id in subset


def _libtpu_version() -> str:
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:  # pragma: no cover - reported as unknown
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--topologies", nargs="+", default=["v5e", "v6e"], choices=TOPOLOGIES)
    parser.add_argument("--only", nargs="+", metavar="GLOB")
    parser.add_argument(
        "--full", action="store_true", help="every case on every topology (default: CI_SUBSET)"
    )
    parser.add_argument("--output", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=400)
    parser.add_argument("--no-fail", action="store_true")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.worker[1], Path(args.worker[2]))
        return 0
    cases = all_cases()
    if args.list:
        print("\n".join(c.id for c in cases))
        return 0
    if args.only:
        cases = [c for c in cases if any(fnmatch.fnmatch(c.id, p) for p in args.only)]
    start = time.perf_counter()
    every = args.full or bool(args.only)
    jobs = [(c, g) for g in args.topologies for c in cases if every or _in_ci_run(c, g)]
    with futures.ThreadPoolExecutor(args.workers) as pool:
        results = []
        for r in pool.map(lambda job: compile_case(*job, args.timeout), jobs):
            results.append(r)
            state = r["error"] or f"{len(r['rows'])} kernels"
            print(f"{r['generation']} {r['case'].id}: {state} ({r['wall']:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    problems = offenders(results)
    print(table(results))
    output = args.output or (None if args.only else REPORT)
    if output is not None:
        output.write_text(markdown(results, problems, seconds))
        print(f"wrote {output}")
    if problems:
        print(f"{len(problems)} offences:", *(f"  - {p}" for p in problems), sep="\n")
        return 0 if args.no_fail else 1
    print("all our kernels pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
