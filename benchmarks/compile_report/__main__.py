"""Compile every case for a target, one subprocess each; gate, print and write the report.

    PYTHONPATH=benchmarks python -m compile_report --target cuda            # the CI run
    PYTHONPATH=benchmarks python -m compile_report --target cuda --full     # every case
    PYTHONPATH=benchmarks python -m compile_report --only 'causal-*' --no-fail
    PYTHONPATH=benchmarks python -m compile_report --list
    PYTHONPATH=benchmarks python -m compile_report --target tpu             # v5e, v6e (CI)
    PYTHONPATH=benchmarks python -m compile_report --target tpu --full      # every case
    PYTHONPATH=benchmarks python -m compile_report --target tpu --topologies v5p v4

Exit status 1 when one of our kernels misses a gate (``--no-fail``: report only). A
filtered run (``--only``, ``--device``) prints its table and writes the report only with
``--output``. ``--keep DIR`` leaves each compile's files there (CUDA: XLA's dump and the
``ptxas`` logs; TPU: the compiled program's text).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import fnmatch
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from compile_report import TARGETS
from compile_report.cases import Case, all_cases, in_ci_run

ROOT = Path(__file__).resolve().parents[2]
REPORT = {
    "cuda": ROOT / "benchmarks" / "results" / "attention_gpu_compile.md",
    "tpu": ROOT / "benchmarks" / "results" / "attention_tpu_compile.md",
}
HISTORY = "\n## History\n"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def worker(target_name: str, case_id: str, workdir: Path, device: str | None) -> None:
    """In the subprocess: compile one case, write ``result.json`` in ``workdir``."""
    target = importlib.import_module(f"compile_report.{target_name}")
    target.setup(workdir)
    import warnings

    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    result: dict[str, Any] = {"rows": [], "error": None}
    start = time.perf_counter()
    try:
        dev, info = target.device(device)
        sharding = NamedSharding(Mesh(np.array([dev]), ("x",)), PartitionSpec())
        result["info"] = {
            **info,
            "device": dev.device_kind,
            "versions": {"jax": jax.__version__, **target.versions()},
        }
        (case,) = [c for c in all_cases() if c.id == case_id and target_name in c.targets]

        def place(shape: tuple[int, ...], dtype: Any) -> Any:
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        with warnings.catch_warnings():
            # jax 0.12+ announces the removal of Pallas Triton on every lowering.
            warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated")
            fn, args = case.build(place)
            compiled = target.compile_on(dev, fn, args)
        result["rows"] = target.kernels(workdir, compiled, case.reference)
        if hasattr(target, "case_facts"):
            result.update(target.case_facts(compiled, case, result["rows"]))
    except Exception as err:  # any failure is a finding, reported per case
        result["error"] = _first_line(err)
        traceback.print_exc()
    result["seconds"] = time.perf_counter() - start
    (workdir / "result.json").write_text(json.dumps(result))


def compile_case(
    target: str, case: Case, timeout: float, keep: Path | None, device: str | None
) -> dict[str, Any]:
    """Run ``worker`` for ``case`` in a fresh process; a crash or a timeout is an error."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        command = [sys.executable, "-m", "compile_report", "--target", target]
        command += ["--worker", case.id, "--workdir", str(workdir)]
        command += ["--device", device] if device else []
        here = str(Path(__file__).resolve().parent.parent)
        paths = [here, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, env=env, check=False
            )
            result_file = workdir / "result.json"
            if result_file.exists():
                result = json.loads(result_file.read_text())
            else:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                result = {"rows": [], "error": f"process ended ({done.returncode}): {tail}"}
            log = done.stderr
        except subprocess.TimeoutExpired:
            result = {"rows": [], "error": f"no result within {timeout:.0f} s"}
            log = ""
        # The worker's own time (the compile, without the process's start) beside the wall.
        result["compile_seconds"] = result.get("seconds")
        result["seconds"] = time.perf_counter() - start
        if keep is not None:
            kept = keep / case.id if device is None else keep / device / case.id
            shutil.copytree(workdir, kept, dirs_exist_ok=True)
            (kept / "stderr.txt").write_text(log)
    result["case"] = case
    result["device"] = device
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--target", choices=TARGETS, default="cuda")
    parser.add_argument("--only", nargs="+", metavar="GLOB", help="case ids, shell patterns")
    parser.add_argument("--no-fail", action="store_true", help="report only; exit 0")
    parser.add_argument("--output", type=Path, help="report path")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--keep", type=Path, help="keep each compile's dumps here")
    parser.add_argument("--workers", type=int, default=2, help="compiles at once")
    parser.add_argument("--timeout", type=float, help="seconds per compile (CUDA 300, TPU 400)")
    parser.add_argument("--list", action="store_true", help="print the case ids and stop")
    parser.add_argument("--full", action="store_true", help="every case (default: the CI run)")
    parser.add_argument("--device", help="another device the target describes (a filtered run)")
    parser.add_argument(
        "--topologies", nargs="+", metavar="GEN", help="tpu: the TPU generations (v5e v6e v5p v4)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.target, args.worker, args.workdir, args.device)
        return 0

    target = importlib.import_module(f"compile_report.{args.target}")
    topologies = getattr(target, "TOPOLOGIES", None)
    if args.topologies and (topologies is None or not set(args.topologies) <= set(topologies)):
        known = f"one of {sorted(topologies)}" if topologies else "--target tpu only"
        parser.error(f"--topologies {' '.join(args.topologies)}: {known}")
    devices = args.topologies or ([args.device] if args.device else list(target.DEVICES))
    timeout = args.timeout or target.TIMEOUT
    cases = [c for c in all_cases() if args.target in c.targets]
    if args.list:
        print("\n".join(case.id for case in cases))
        return 0
    if args.only:
        cases = [c for c in cases if any(fnmatch.fnmatch(c.id, p) for p in args.only)]
        if not cases:
            parser.error(f"--only {args.only} matches no case (see --list)")
    every = args.full or bool(args.only)
    jobs = [(c, d) for d in devices for c in cases if every or in_ci_run(c, d)]
    start = time.perf_counter()
    with futures.ThreadPoolExecutor(args.workers) as pool:
        submitted = [
            pool.submit(compile_case, args.target, c, timeout, args.keep, d) for c, d in jobs
        ]
        results = []
        for job in submitted:
            results.append(job.result())
            r = results[-1]
            state = r["error"] or f"{len(r['rows'])} kernels"
            where = f"{r['device']} " if topologies else ""  # a TPU generation
            print(f"{where}{r['case'].id}: {state} ({r['seconds']:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    info = next((r["info"] for r in results if "info" in r), None)
    if info is None:
        print("no compile reached the device; errors:", *(r["error"] for r in results), sep="\n")
        return 0 if args.no_fail else 1
    problems, known = target.gate(results, info)
    print(target.table(results, info))
    output = args.output or (None if args.only or args.device else REPORT[args.target])
    if output is not None:
        old = output.read_text() if output.exists() else ""
        history = old[old.index(HISTORY) :] if HISTORY in old else ""
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(target.markdown(results, problems, info, seconds, history, known))
        print(f"wrote {output}")
    if args.json is not None:
        rows = [
            {
                "case": r["case"].id,
                **({"device": r["device"]} if r["device"] else {}),
                "error": r["error"],
                "rows": r["rows"],
            }
            for r in results
        ]
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"{len(results)} compiles in {seconds:.0f} s")
    if known:
        print(f"{len(known)} known spills (KNOWN_MOSAIC_SPILLS):", *known, sep="\n  - ")
    if problems:
        print(f"{len(problems)} offences:", *(f"  - {p}" for p in problems), sep="\n")
        return 0 if args.no_fail else 1
    print("all our kernels pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
