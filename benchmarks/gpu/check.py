"""The GPU check of the attention backends, in one command.

Run on a machine with an NVIDIA GPU (sm80+), in an environment with ``jax[cuda12]``,
``pytest``, ``matplotlib`` and this repository's packages installed (``nox -s
gpu_check`` builds one)::

    python benchmarks/gpu/check.py            # tests, then the benchmark
    python benchmarks/gpu/check.py --quick    # shorter benchmark

1. The Pallas tests (``tests/test_pallas_kernels.py``, ``test_backends.py``,
   ``test_dispatch.py``, ``test_cudnn.py``) and the drop-in tests. On a GPU the
   kernels run compiled through Triton, not in interpret mode (``interpret=None`` means
   "interpret only off a GPU"); the script stops if the default backend is not a GPU.
2. ``benchmarks/attention.py --impl pallas --dtype bfloat16`` at B=2, H=16, d=128
   (causal and 16 packed documents), with jax.nn's XLA and cuDNN implementations as
   columns, written to ``benchmarks/results/attention_gpu.md``, ``.json`` and ``.png``;
   then a short ``--impl xla`` run (the block loop) to ``attention_gpu_xla.md``.
3. ``benchmarks/gpu/tune.py``: the kernel's block sizes, backward tiles and warps
   against cuDNN at L=16384, to ``attention_gpu_tuning.md``.

Each part has a timeout (tests 4 min, benchmarks 6 + 3, tuning 5). Where one command
may run at most 10 minutes, run the parts in separate calls: ``--skip-benchmark
--skip-tuning``, then ``--skip-tests --skip-tuning``, then ``--skip-tests
--skip-benchmark``.

Without a GPU it prints why and exits with status 0 (nothing checked), or 1 with
``--strict``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "packages" / "jax-block-attention" / "tests"
BENCHMARK = ROOT / "benchmarks" / "attention.py"
TUNE = ROOT / "benchmarks" / "gpu" / "tune.py"


def _run(command: list[str], timeout: float) -> int:
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    try:
        status = subprocess.run(command, cwd=ROOT, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout:.0f} s", flush=True)
        return 124
    print(f"status {status} after {time.perf_counter() - start:.0f} s", flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="L=4096 only in the benchmark")
    parser.add_argument("--strict", action="store_true", help="fail (status 1) without a GPU")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-benchmark", action="store_true")
    parser.add_argument("--skip-tuning", action="store_true")
    args = parser.parse_args(argv)

    import jax

    backend = jax.default_backend()
    if backend != "gpu":
        print(
            f"SKIPPED: the GPU check needs a GPU; jax {jax.__version__} sees backend "
            f"{backend!r} ({jax.devices()[0].device_kind})",
            flush=True,
        )
        return 1 if args.strict else 0
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    env_python = sys.executable
    statuses = {}
    if not args.skip_tests:
        statuses["tests"] = _run(
            [
                env_python,
                "-m",
                "pytest",
                "-c",
                str(ROOT / "pyproject.toml"),
                "--rootdir",
                str(ROOT),
                "-q",
                *(
                    str(TESTS / name)
                    for name in (
                        "test_pallas_kernels.py",
                        "test_backends.py",
                        "test_dispatch.py",
                        "test_cudnn.py",
                    )
                ),
                str(TESTS / "test_drop_in.py"),
            ],
            timeout=240,
        )
    if not args.skip_benchmark:
        lengths = ["4096"] if args.quick else ["4096", "16384"]
        common = [
            "--dtype",
            "bfloat16",
            "--batch",
            "2",
            "--heads",
            "16",
            "--dim",
            "128",
            "--masks",
            "causal",
            "documents",
            "--documents",
            "16",
            "--repeats",
            "5",
            "--settle",
            "0.1",
            "--max-dense-length",
            "4096",
        ]
        statuses["benchmark pallas"] = _run(
            [
                env_python,
                str(BENCHMARK),
                "--impl",
                "pallas",
                "--lengths",
                *lengths,
                "--memory-lengths",
                lengths[-1],
                "--name",
                "attention_gpu",
                *common,
            ],
            timeout=360,
        )
        statuses["benchmark xla"] = _run(
            [
                env_python,
                str(BENCHMARK),
                "--impl",
                "xla",
                "--lengths",
                "4096",
                "--memory-lengths",
                "4096",
                "--modes",
                "fwd",
                "--name",
                "attention_gpu_xla",
                *common,
            ],
            timeout=180,
        )
    if not args.skip_tuning:
        statuses["tuning"] = _run([env_python, str(TUNE)], timeout=300)
    print(", ".join(f"{name}: {status}" for name, status in statuses.items()), flush=True)
    return 0 if all(status == 0 for status in statuses.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.exit(main())
