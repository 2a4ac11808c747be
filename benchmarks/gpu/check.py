"""The GPU check of the attention kernels, in parts that each fit a few minutes.

On the GPU machine (its own ``python3`` with jax, the CUDA plugin, triton, pytest and
numpy; nothing installed, no package index), from the repository root, in one line::

    PYTHONPATH=packages/jax-block-attention/src:packages/jax-fancy-vmap/src:packages/jax-logstate/src python3 benchmarks/gpu/check.py --results "$OUT"

That runs, each part in its own process with its own time limit and each result written
the moment it exists (``attention_gpu_check.md`` and ``attention_gpu_check.log`` in
``--results``, default ``benchmarks/results``):

1. ``smoke`` (at most 3 min): every kernel compiled for this GPU (forward, dQ, dK/dV,
   split-K decoding) on small inputs: d = 64, 128, 256; bfloat16, float16, float32;
   causal, packed documents, a bias, ``score_mod`` with array gradients, GQA, decoding.
   Each case reports its compile time and its largest error (output and every
   gradient) against dense attention written from the definition, in float32 at full
   matmul precision, on the same GPU.
2. ``benchmark`` (at most 3.5 min): the targets, bfloat16, B=2, H=16, d=128, L=16384,
   against ``jax.nn.dot_product_attention(implementation="cudnn")``: causal forward (at
   most 1.5x cuDNN) and forward+backward (at most 2x), and 16 packed documents (at least
   3x faster than cuDNN with the equivalent dense mask). ``implementation="mosaic_gpu"``
   is timed beside them (not gated; it refuses the documents' ``mask_fn``, which closes
   over the ids): its numbers decide its order against Triton for ``implementation=None``.
3. ``tuning`` (at most 3 min): ``benchmarks/gpu/tune.py`` at L=16384, to
   ``attention_gpu_tuning.md``.

The three parts take at most 9.5 minutes, so the one command fits a 10-minute limit;
``--parts`` runs some of them (for instance ``--parts tuning`` in a second call).
``--parts tests`` also runs the Pallas, backend, dispatch, cuDNN and drop-in test files
compiled on the GPU
(``nox -s gpu_check`` runs every part, on a machine with a package index). Without a GPU
the script says so and exits 0 (1 with ``--strict``);
``python benchmarks/gpu/check.py --part-inline smoke --tiny`` runs the smoke part on
tiny inputs in interpret mode, on any machine, to check the script.
"""  # noqa: E501

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "packages" / "jax-block-attention" / "tests"
TUNE = ROOT / "benchmarks" / "gpu" / "tune.py"

# Seconds per part. Each is above the compile time of every case in it (about 3 s per
# kernel and 10 s per case on an H200's host, the benchmark's four programs per column
# included) with room for the runs themselves.
PART_LIMITS = {"smoke": 180, "benchmark": 210, "tuning": 180, "tests": 420}
DEFAULT_PARTS = ("smoke", "benchmark", "tuning")
# The test files whose kernels run compiled on a GPU (the "tests" part).
GPU_TEST_FILES = (
    "test_pallas_kernels.py",
    "test_backends.py",
    "test_dispatch.py",
    "test_cudnn.py",
    "test_drop_in.py",
    "test_mosaic_gpu.py",
)

# Largest |ours - reference| / (1 + |reference|) a smoke case may show, by dtype.
SMOKE_TOLERANCE = {"float32": 2e-4, "bfloat16": 5e-2, "float16": 2e-2}


class Results:
    """Markdown lines appended to ``attention_gpu_check.md`` as they come."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "attention_gpu_check.md"

    def line(self, text: str = "") -> None:
        with open(self.path, "a") as f:
            f.write(text + "\n")
        print(text, flush=True)


def _silence_deprecations() -> None:
    # jax announces on every Triton lowering that Pallas Triton will be removed (see
    # docs/ring.md); the check is about the kernels as they are.
    warnings.filterwarnings("ignore", "The Pallas Triton backend is deprecated", DeprecationWarning)


# ---------------------------------------------------------------------------- smoke


def _smoke_cases() -> list[dict[str, Any]]:
    cases = [
        {"name": "causal", "d": d, "dtype": dtype}
        for d in (64, 128, 256)
        for dtype in ("bfloat16", "float16", "float32")
    ]
    for name in ("documents", "bias", "score_mod", "gqa", "decode"):
        cases.append({"name": name, "d": 128, "dtype": "bfloat16"})
    return cases


def _smoke_program(
    case: dict[str, Any], implementation: str, length: int = 512
) -> tuple[Callable, tuple]:
    """``value_and_grad`` of a weighted sum of the output (decoding: the output only)
    and its inputs, for ``implementation``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxmodules.attention import masked_attention_via_map

    d, dtype, name = case["d"], jnp.dtype(case["dtype"]), case["name"]
    batch, heads = 1, 4
    q_len, kv_heads = length, heads
    if name == "gqa":
        kv_heads = 1
    if name == "decode":
        q_len, length, kv_heads = 16, 8 * length, 1
    keys = jax.random.split(jax.random.PRNGKey(d), 6)
    q = jax.random.normal(keys[0], (batch, q_len, heads, d), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, d), jnp.float32).astype(dtype)
    weights = jax.random.normal(keys[3], (batch, q_len, heads, d), jnp.float32)
    extra: tuple[Any, ...] = ()
    if name == "documents":
        extra = (jnp.asarray(np.arange(length)[None] * 5 // length, jnp.int32),)
    elif name == "bias":
        extra = (
            jax.random.normal(keys[4], (batch, heads, q_len, length), jnp.float32).astype(dtype),
        )
    elif name == "score_mod":
        extra = (jnp.linspace(0.01, 0.1, heads), jax.random.normal(keys[5], (8, heads)))

    def score_mod(score, b, h, qi, ki):
        slopes, table = extra_arrays["score_mod"]
        bucket = jnp.clip(qi - ki, -3, 4) + 3
        return score + table[bucket, h] - slopes[h] * jnp.abs(qi - ki)

    extra_arrays: dict[str, Any] = {}
    offset = length - q_len

    def attend(q, k, v, *extra):
        if implementation == "dense":
            return dense(q, k, v, *extra)
        options: dict[str, Any] = {"is_causal": True, "implementation": implementation}
        if name == "documents":
            (ids,) = extra
            options["mask_fn"] = lambda b, h, qi, ki: ids[b, qi] == ids[b, ki]
        elif name == "bias":
            options["bias"] = extra[0]
        elif name == "score_mod":
            extra_arrays["score_mod"] = extra
            options["score_mod"] = score_mod
        elif name == "decode":
            options["q_offset"] = offset
        return masked_attention_via_map(q, k, v, **options)

    def dense(q, k, v, *extra):
        """The same attention from its definition, dense, float32 at full precision."""
        highest = jax.lax.Precision.HIGHEST
        groups = heads // kv_heads
        kf = jnp.repeat(k.astype(jnp.float32), groups, axis=2)
        vf = jnp.repeat(v.astype(jnp.float32), groups, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kf, precision=highest)
        s = s * d**-0.5
        qi = jnp.arange(q_len)[:, None] + offset
        ki = jnp.arange(length)[None, :]
        visible = (ki <= qi)[None, None]
        if name == "documents":
            (ids,) = extra
            visible = visible & (ids[:, None, :, None] == ids[:, None, None, :])
        elif name == "bias":
            s = s + extra[0].astype(jnp.float32)
        elif name == "score_mod":
            extra_arrays["score_mod"] = extra
            b = jnp.arange(batch)[:, None, None, None]
            h = jnp.arange(heads)[None, :, None, None]
            s = score_mod(s, b, h, qi[None, None], ki[None, None])
        p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", p, vf, precision=highest)
        return out.astype(q.dtype)

    if name == "decode":
        return jax.jit(attend), (q, k, v)
    n_grads = 3 + (len(extra) if name in ("bias", "score_mod") else 0)

    def loss(*args: Any) -> Any:
        return jnp.sum(attend(*args).astype(jnp.float32) * weights)

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(n_grads)))), (q, k, v, *extra)


def _largest_error(got: Any, want: Any) -> float:
    import jax
    import numpy as np

    errors = [
        float(np.max(np.abs(a - b) / (1 + np.abs(b))))
        for a, b in zip(
            jax.tree.leaves(jax.tree.map(lambda x: np.asarray(x, np.float64), got)),
            jax.tree.leaves(jax.tree.map(lambda x: np.asarray(x, np.float64), want)),
            strict=True,
        )
    ]
    return max(errors)


def run_smoke(results: Results, length: int = 512) -> int:
    import jax

    _silence_deprecations()
    results.line("| case | d | dtype | compile s | largest error vs dense | verdict |")
    results.line("|---|---|---|---:|---:|---|")
    failures = 0
    for case in _smoke_cases():
        head = f"| {case['name']} | {case['d']} | {case['dtype']} "
        try:
            program, inputs = _smoke_program(case, "pallas", length)
            start = time.perf_counter()
            got = jax.block_until_ready(program(*inputs))
            compile_s = time.perf_counter() - start
            reference, _ = _smoke_program(case, "dense", length)
            want = jax.block_until_ready(reference(*inputs))
            error = _largest_error(got, want)
        except Exception as err:  # a kernel that does not compile or launch is the finding
            failures += 1
            message = " ".join(str(err).split())[:200]
            results.line(head + f"| - | - | fails: {type(err).__name__}: {message} |")
            continue
        ok = error <= SMOKE_TOLERANCE[case["dtype"]]
        failures += not ok
        results.line(head + f"| {compile_s:.1f} | {error:.1e} | {'ok' if ok else '**too far**'} |")
    return 1 if failures else 0


# ------------------------------------------------------------------------ benchmark


def _median_time(fn: Callable, inputs: tuple, repeats: int = 5) -> float:
    import jax

    jax.block_until_ready(fn(*inputs))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_benchmark(results: Results, length: int = 16384) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxmodules.attention import masked_attention_via_map

    _silence_deprecations()
    batch, heads, d, documents = 2, 16, 128, 16
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (
        jax.random.normal(key, (batch, length, heads, d), jnp.float32).astype(jnp.bfloat16)
        for key in keys
    )
    ids = jnp.asarray(
        np.broadcast_to(np.arange(length) * documents // length, (batch, length)), jnp.int32
    )

    def ours(mask: str, implementation: str = "pallas") -> Callable:
        def attend(q, k, v, ids):
            if mask == "causal":
                return masked_attention_via_map(
                    q, k, v, is_causal=True, implementation=implementation
                )
            return masked_attention_via_map(
                q,
                k,
                v,
                mask_fn=lambda b, h, qi, ki: ids[b, qi] == ids[b, ki],
                implementation=implementation,
            )

        return attend

    def cudnn(mask: str) -> Callable:
        def attend(q, k, v, ids):
            if mask == "causal":
                return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
            dense = (ids[:, :, None] == ids[:, None, :])[:, None]
            return jax.nn.dot_product_attention(q, k, v, mask=dense, implementation="cudnn")

        return attend

    def program(attend: Callable, mode: str) -> Callable:
        if mode == "fwd":
            return jax.jit(attend)

        def loss(q, k, v, ids):
            return jnp.sum(attend(q, k, v, ids).astype(jnp.float32))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    # (mask, pass, target): ours / cuDNN at most, or (documents) cuDNN / ours at least.
    targets = [
        ("causal", "fwd", "ours <= 1.5x cuDNN", lambda r: r <= 1.5),
        ("causal", "fwd+bwd", "ours <= 2x cuDNN", lambda r: r <= 2.0),
        ("documents", "fwd", "cuDNN >= 3x ours", lambda r: 1 / r >= 3.0),
        ("documents", "fwd+bwd", "cuDNN >= 3x ours", lambda r: 1 / r >= 3.0),
    ]
    results.line(
        f"bfloat16, B={batch}, H={heads}, d={d}, L={length}, {documents} documents; "
        "medians of 5 runs, ours (Triton) and cuDNN alternating per row; Mosaic GPU "
        '(implementation="mosaic_gpu") beside them, not gated until its numbers decide '
        "the order of implementation=None"
    )
    results.line()
    results.line(
        "| mask | pass | ours ms | cuDNN ms | ours / cuDNN | target | met | mosaic_gpu ms |"
    )
    results.line("|---|---|---:|---:|---:|---|---|---:|")
    missed = 0
    inputs = (q, k, v, ids)
    for mask, mode, target, met in targets:
        times = {}
        runs = (
            ("ours", ours(mask)),
            ("cudnn", cudnn(mask)),
            ("mosaic_gpu", ours(mask, "mosaic_gpu")),
        )
        for name, attend in runs:
            try:
                times[name] = _median_time(program(attend, mode), inputs)
            except Exception as err:
                times[name] = None
                print(f"{mask} {mode} {name}: {type(err).__name__}: {err}"[:400], flush=True)
        ours_s, cudnn_s, mgpu = times["ours"], times["cudnn"], _ms(times["mosaic_gpu"])
        if ours_s is None or cudnn_s is None:
            missed += 1
            results.line(
                f"| {mask} | {mode} | {_ms(ours_s)} | {_ms(cudnn_s)} | - | {target} | no run "
                f"| {mgpu} |"
            )
            continue
        ratio = ours_s / cudnn_s
        ok = met(ratio)
        missed += not ok
        results.line(
            f"| {mask} | {mode} | {_ms(ours_s)} | {_ms(cudnn_s)} | {ratio:.2f} | {target} "
            f"| {'yes' if ok else '**no**'} | {mgpu} |"
        )
    return 1 if missed else 0


def _ms(seconds: float | None) -> str:
    return "failed" if seconds is None else f"{seconds * 1e3:.2f}"


# ----------------------------------------------------------------------------- parts


def _run_part(part: str, args: argparse.Namespace, results: Results) -> int:
    """One part in its own process (a hung compile cannot stall the others), its output
    appended to the log as it comes."""
    if part == "tuning":
        command = [
            sys.executable,
            str(TUNE),
            "--repeats",
            "5",
            "--output",
            str(args.results / "attention_gpu_tuning.md"),
        ]
    elif part == "tests":
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(ROOT),
            "-q",
            "-W",
            "ignore:The Pallas Triton backend is deprecated:DeprecationWarning",
            *(str(TESTS / name) for name in GPU_TEST_FILES),
        ]
    else:
        command = [sys.executable, __file__, "--part-inline", part, "--results", str(args.results)]
    limit = PART_LIMITS[part]
    results.line()
    results.line(f"## {part} (limit {limit} s)")
    results.line()
    log = args.results / "attention_gpu_check.log"
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            status = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            status = 124
    seconds = time.perf_counter() - start
    if part in ("tuning", "tests"):
        results.line(
            f"see attention_gpu_check.log{' and attention_gpu_tuning.md' * (part == 'tuning')}"
        )
    results.line()
    verdict = "timed out" if status == 124 else f"status {status}"
    results.line(f"{part}: {verdict} after {seconds:.0f} s")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", choices=list(PART_LIMITS), default=DEFAULT_PARTS)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--strict", action="store_true", help="fail (status 1) without a GPU")
    parser.add_argument("--part-inline", choices=["smoke", "benchmark"], help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.results = args.results.resolve()
    results = Results(args.results)
    if args.part_inline == "smoke":
        return run_smoke(results, 32 if args.tiny else 512)
    if args.part_inline == "benchmark":
        return run_benchmark(results)

    import jax

    if jax.default_backend() != "gpu":
        print(
            f"SKIPPED: the GPU check needs a GPU; jax {jax.__version__} sees backend "
            f"{jax.default_backend()!r} ({jax.devices()[0].device_kind})",
            flush=True,
        )
        return 1 if args.strict else 0
    device = jax.devices()[0]
    results.line(f"# GPU check, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    results.line()
    results.line(
        f"{device.device_kind}, jax {jax.__version__}, Python {sys.version.split()[0]}; "
        f"parts: {', '.join(args.parts)}"
    )
    statuses = {part: _run_part(part, args, results) for part in args.parts}
    (args.results / "attention_gpu_check.json").write_text(json.dumps(statuses, indent=1))
    results.line()
    results.line(", ".join(f"{part}: {status}" for part, status in statuses.items()))
    return 0 if all(status == 0 for status in statuses.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.exit(main())
