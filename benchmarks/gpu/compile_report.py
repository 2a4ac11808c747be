"""The attention kernels compiled by the real Triton compiler for Hopper and Ampere, on a CPU.

Off a GPU the Pallas kernels run in interpret mode, and their CUDA lowering stops at
Triton IR (TTIR). The decisions that make or break a kernel on a GPU (layouts, software
pipelining, shared memory, registers) happen later, in the Triton compiler. That
compiler runs without a GPU, so this script runs it on every kernel, as a GPU user gets
them:

1. Each case calls the public API (``masked_attention_via_map(...,
   implementation="pallas")``, ``jax.grad`` for the backward) with jax believing its
   default backend is a GPU (so the compiled, not interpreted, kernels with their GPU
   defaults are built) and exports it with ``jax.export(..., platforms=["cuda"])``
   under an abstract H100 device where the jax version asks for one.
2. Each ``pallas_call``'s TTIR is captured as Pallas lowers it; its launch settings
   (kernel name, ``num_warps``, ``num_stages``) are read from the ``backend_config`` of
   the exported ``__gpu$xla.gpu.triton`` custom call.
3. ``triton.compile`` (the ``triton`` package, 3.6.0 on the GPU machines) compiles the
   TTIR for sm_90 (H100/H200) and sm_80 (A100): PTX and the shared memory per program.
   The wheel's ``ptxas -v`` gives registers and spill bytes; the PTX shows whether the
   dots use ``wgmma`` (Hopper tensor cores) or ``mma.sync``, and whether loads go
   through ``cp.async``.

jax's own Pallas GPU attention (``jax.experimental.pallas.ops.gpu.attention.mha``) goes
through the same steps as reference rows.

The run fails (status 1, offenders listed) on:

- a case that does not lower or a kernel that does not compile;
- shared memory over the device's limit per block (227 KiB on sm_90, 163 KiB on sm_80):
  such a kernel cannot launch;
- on sm_90: a bfloat16/float16 kernel spilling more bytes than jax's ``mha`` at the same
  head dimension (its largest kernel spill there, at most 64 B; 64 B where no ``mha``
  row has that head dimension), or any kernel spilling more than 256 B.

Spills on sm_80 are reported, not gated.

    python benchmarks/gpu/compile_report.py              # everything; writes the report
    python benchmarks/gpu/compile_report.py --only 'causal-d256-*' --no-fail
    python benchmarks/gpu/compile_report.py --only '*-f32' --arch 90 --keep /tmp/kernels

A filtered run (``--only``, ``--arch``) prints its table and writes the report only with
``--output``. ``--keep DIR`` leaves each kernel's TTIR and PTX there. Needs ``jax`` and
``triton==3.6.0`` (``nox -s gpu_compile`` installs them); nothing is cached across
runs (Triton's cache goes to a temporary folder).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import dataclasses
import datetime
import fnmatch
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "benchmarks" / "results" / "attention_gpu_compile.md"

TRITON_CALL = "__gpu$xla.gpu.triton"
ARCHS = {90: "sm_90", 80: "sm_80"}
# Shared memory one block may use (the opt-in maximum), bytes.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
SPILL_LIMIT = 256  # bytes, any kernel on sm_90
HALF_SPILL_CAP = 64  # bytes: a 16-bit kernel's allowance never exceeds this
# The device jax lowers for when it asks for one (jax >= 0.12 without a GPU).
ABSTRACT_GPU = ("NVIDIA H100 80GB HBM3", 132)

DTYPES = ("bf16", "f16", "f32")
HEAD_DIMS = (64, 128, 256)


# ------------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One exported program: ``build()`` returns the function and its abstract inputs."""

    name: str  # causal, documents, bias, score_mod, gqa, decode, mha
    d: int
    dtype: str
    build: Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]
    reference: bool = False  # jax's own mha

    @property
    def id(self) -> str:
        return f"{self.name}-d{self.d}-{self.dtype}"


def _jnp_dtype(name: str) -> Any:
    import jax.numpy as jnp

    return {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}[name]


def _value_and_grads(attend: Callable[..., Any], n_args: int) -> Callable[..., Any]:
    """The forward and every gradient: what training runs (forward, dQ, dK/dV kernels)."""
    import jax
    import jax.numpy as jnp

    def loss(*args: Any) -> Any:
        return attend(*args).astype(jnp.float32).sum()

    return jax.value_and_grad(loss, argnums=tuple(range(n_args)))


def _ours(
    name: str,
    d: int,
    dtype: str,
    *,
    batch: int = 2,
    length: int = 2048,
    heads: int = 16,
    kv_heads: int | None = None,
) -> Case:
    """A case of ``masked_attention_via_map(..., implementation="pallas")``.

    B=2, L=2048, 16 heads: 512 query-block programs, enough that the forward is not
    split along the keys (as at the benchmark size), so each kernel is the one a GPU user
    trains with."""

    def build() -> tuple[Callable[..., Any], tuple[Any, ...]]:
        import jax
        import jax.numpy as jnp

        from jaxmodules.attention import masked_attention_via_map

        dt = _jnp_dtype(dtype)
        hkv = kv_heads or heads
        q = jax.ShapeDtypeStruct((batch, length, heads, d), dt)
        kv = jax.ShapeDtypeStruct((batch, length, hkv, d), dt)
        if name in ("causal", "gqa"):

            def attend(q, k, v):
                return masked_attention_via_map(q, k, v, is_causal=True, implementation="pallas")

            return _value_and_grads(attend, 3), (q, kv, kv)
        if name == "documents":
            ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)

            def attend_documents(q, k, v, ids):
                def mask_fn(b, h, qi, ki):
                    return ids[b, qi] == ids[b, ki]

                return masked_attention_via_map(
                    q, k, v, is_causal=True, mask_fn=mask_fn, implementation="pallas"
                )

            grads = _value_and_grads(attend_documents, 3)
            return (lambda q, k, v, ids: grads(q, k, v, ids)), (q, kv, kv, ids)
        if name == "bias":
            bias = jax.ShapeDtypeStruct((batch, heads, length, length), dt)

            def attend_bias(q, k, v, bias):
                return masked_attention_via_map(
                    q, k, v, is_causal=True, bias=bias, implementation="pallas"
                )

            return _value_and_grads(attend_bias, 4), (q, kv, kv, bias)
        if name == "score_mod":
            # ALiBi slopes per head and a relative-position table read at a bucket of
            # q - k and the head: traced arrays that get gradients.
            slopes = jax.ShapeDtypeStruct((heads,), jnp.float32)
            table = jax.ShapeDtypeStruct((8, heads), jnp.float32)

            def attend_score_mod(q, k, v, slopes, table):
                def score_mod(score, b, h, qi, ki):
                    bucket = jnp.clip(qi - ki, -3, 4) + 3
                    return score + table[bucket, h] - slopes[h] * jnp.abs(qi - ki)

                return masked_attention_via_map(
                    q, k, v, is_causal=True, score_mod=score_mod, implementation="pallas"
                )

            return _value_and_grads(attend_score_mod, 5), (q, kv, kv, slopes, table)
        if name == "dropout":
            # The keep decisions are a uint32 hash computed inside every kernel.
            rng = jax.random.key(0)

            def attend_dropout(q, k, v):
                return masked_attention_via_map(
                    q,
                    k,
                    v,
                    is_causal=True,
                    dropout_rate=0.1,
                    dropout_rng=rng,
                    implementation="pallas",
                )

            return _value_and_grads(attend_dropout, 3), (q, kv, kv)
        raise ValueError(f"unknown case {name!r}")

    return Case(name, d, dtype, build)


def _decode(d: int, dtype: str) -> Case:
    """Decoding with a KV cache: 16 new queries of 4 heads against 2048 cached keys (one
    KV head). Few programs, so the compiled forward splits the key lists (split-K)."""

    def build() -> tuple[Callable[..., Any], tuple[Any, ...]]:
        import jax

        from jaxmodules.attention import masked_attention_via_map

        dt = _jnp_dtype(dtype)
        q = jax.ShapeDtypeStruct((1, 16, 4, d), dt)
        kv = jax.ShapeDtypeStruct((1, 2048, 1, d), dt)

        def attend(q, k, v):
            return masked_attention_via_map(
                q, k, v, is_causal=True, q_offset=2048 - 16, implementation="pallas"
            )

        return attend, (q, kv, kv)

    return Case("decode", d, dtype, build)


def _mha(d: int, dtype: str) -> Case:
    """jax's own Pallas GPU attention, causal, forward and backward, same sizes."""

    def build() -> tuple[Callable[..., Any], tuple[Any, ...]]:
        import warnings

        import jax

        with warnings.catch_warnings():
            # Newer jax points to another package for this module; it still lowers.
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu import attention as jax_attention

        dt = _jnp_dtype(dtype)
        x = jax.ShapeDtypeStruct((2, 2048, 16, d), dt)

        def attend(q, k, v):
            return jax_attention.mha(q, k, v, None, causal=True)

        return _value_and_grads(attend, 3), (x, x, x)

    return Case("mha", d, dtype, build, reference=True)


def all_cases() -> list[Case]:
    """Every kernel at every head dimension and dtype for causal attention; the other
    features (each adds code to the kernels) at d=128 in bfloat16; jax's ``mha`` at
    d=64 and 128 in bfloat16."""
    cases = [_mha(d, "bf16") for d in (64, 128)]
    cases += [_ours("causal", d, dtype) for d in HEAD_DIMS for dtype in DTYPES]
    cases += [
        _ours("documents", 128, "bf16"),
        _ours("bias", 128, "bf16"),
        _ours("score_mod", 128, "bf16"),
        _ours("dropout", 128, "bf16"),
        _ours("gqa", 128, "bf16", heads=16, kv_heads=4),
        _decode(128, "bf16"),
    ]
    return cases


# ----------------------------------------------------------------------- lowering to TTIR


@dataclasses.dataclass
class Kernel:
    case: str
    name: str
    num_warps: int
    num_stages: int
    ttir: str


@contextlib.contextmanager
def _captured_ttir() -> Iterator[list[tuple[str, str]]]:
    """(kernel name, TTIR text) of every ``pallas_call`` Pallas lowers meanwhile."""
    from jax._src.pallas.triton import lowering

    original = lowering.lower_jaxpr_to_triton_module
    captured: list[tuple[str, str]] = []

    def capture(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        text = result.module.operation.get_asm()
        match = re.search(r"tt\.func public @([\w$.]+)", text)
        captured.append((match.group(1) if match else "?", text))
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield captured
    finally:
        lowering.lower_jaxpr_to_triton_module = original


@contextlib.contextmanager
def gpu_lowering() -> Iterator[None]:
    """What lowering for CUDA needs off a GPU: ``jax.default_backend()`` says ``"gpu"``
    (the library then builds the compiled kernels with their GPU defaults), and on jax
    versions that ask for one (0.12+), an abstract H100 is the device lowered for."""
    import jax

    abstract = contextlib.nullcontext()
    sharding = jax.sharding
    if hasattr(sharding, "AbstractDevice") and hasattr(sharding, "use_abstract_mesh"):
        try:
            device = sharding.AbstractDevice(
                device_kind=ABSTRACT_GPU[0], num_cores=ABSTRACT_GPU[1], platform="gpu"
            )
            mesh = sharding.AbstractMesh((), (), abstract_device=device)
            abstract = sharding.use_abstract_mesh(mesh)
        except TypeError:  # older AbstractDevice/AbstractMesh: lowering needs no device
            pass
    original = jax.default_backend
    jax.default_backend = lambda: "gpu"  # type: ignore[assignment]
    try:
        with abstract:
            yield
    finally:
        jax.default_backend = original  # type: ignore[assignment]


_IR_STRING = re.compile(r'ir = "(?:[^"\\]|\\.)*"')


def _launch_settings(module_text: str) -> list[tuple[str, int, int]]:
    """(name, num_warps, num_stages) of every Triton custom call of an exported module."""
    settings = []
    for line in module_text.splitlines():
        if TRITON_CALL not in line or "backend_config" not in line:
            continue
        line = _IR_STRING.sub("", line)
        name = re.search(r'name = "([^"]+)"', line)
        warps = re.search(r"num_warps = (\d+)", line)
        stages = re.search(r"num_stages = (\d+)", line)
        if not (name and warps and stages):
            raise RuntimeError(f"unreadable {TRITON_CALL} backend_config: {line[:300]}")
        settings.append((name.group(1), int(warps.group(1)), int(stages.group(1))))
    return settings


def lower_case(case: Case) -> list[Kernel]:
    """The Triton kernels of ``case``, exported for CUDA, with their launch settings."""
    import warnings

    import jax
    from jax import export

    fn, args = case.build()
    with _captured_ttir() as captured, gpu_lowering(), warnings.catch_warnings():
        # jax 0.12+ announces the removal of Pallas Triton on every lowering; the
        # report is about the kernels as they are today.
        warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated")
        exported = export.export(
            jax.jit(fn),
            platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
        )(*args)
        text = exported.mlir_module()
    settings = _launch_settings(text)
    kernels = []
    for name, ttir in captured:  # in lowering order: forward first
        index = next((i for i, (n, _, _) in enumerate(settings) if n == name), None)
        if index is None:
            raise RuntimeError(f"{case.id}: no {TRITON_CALL} custom call for kernel {name!r}")
        _, warps, stages = settings.pop(index)
        kernels.append(Kernel(case.id, name, warps, stages, ttir))
    if settings:
        raise RuntimeError(f"{case.id}: no TTIR captured for the custom calls {settings}")
    if not kernels:
        raise RuntimeError(f"{case.id}: the exported program holds no Triton kernel")
    return kernels


# ---------------------------------------------------------------------- Triton compile


def _ptxas() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def compile_ttir(
    ttir: str, cc: int, num_warps: int, num_stages: int, keep: str | None = None, tag: str = ""
) -> dict[str, Any]:
    """Compile one TTIR for compute capability ``cc``: shared memory, registers, spills
    and the instructions the PTX uses; ``{"error": ...}`` when it does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ttir"
        path.write_text(ttir)
        # Triton runs ptxas -v itself (to build the cubin, with its own flags) and prints
        # that log when asked: one ptxas run per kernel, the slow step for large ones.
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(
                    str(path),
                    target=GPUTarget("cuda", cc, 32),
                    options={"num_warps": num_warps, "num_stages": num_stages},
                )
        except Exception as err:  # any compiler failure is a finding, reported per kernel
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            return {"error": f"{type(err).__name__}: {first}"[:300]}
        ptx = compiled.asm["ptx"]
        info = log.getvalue()
        if "Used" not in info:  # a Triton that does not print the log: run ptxas here
            ptx_path = Path(tmp) / "kernel.ptx"
            ptx_path.write_text(ptx)
            gpu_name = "sm_90a" if cc == 90 else f"sm_{cc}"
            ptxas = subprocess.run(
                [_ptxas(), "-v", f"--gpu-name={gpu_name}", str(ptx_path), "-o", os.devnull],
                capture_output=True,
                text=True,
                check=False,
            )
            if ptxas.returncode != 0:
                return {"error": "ptxas: " + ptxas.stderr.strip()[-300:]}
            info = ptxas.stderr
        if keep:
            out = Path(keep)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{tag}.ttir").write_text(ttir)
            (out / f"{tag}.sm{cc}.ptx").write_text(ptx)
    registers = re.search(r"Used (\d+) registers", info)
    stores = re.search(r"(\d+) bytes spill stores", info)
    loads = re.search(r"(\d+) bytes spill loads", info)
    if "wgmma" in ptx:
        tensor_cores = "wgmma"
    elif "mma.sync" in ptx:
        tensor_cores = "mma.sync"
    else:
        tensor_cores = "none"
    return {
        "shared": int(compiled.metadata.shared),
        "registers": int(registers.group(1)) if registers else -1,
        "spill_stores": int(stores.group(1)) if stores else 0,
        "spill_loads": int(loads.group(1)) if loads else 0,
        "tensor_cores": tensor_cores,
        "cp_async": "cp.async" in ptx,
    }


def _worker_init(cache: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache


# --------------------------------------------------------------------------------- run


@dataclasses.dataclass
class Row:
    case: Case
    kernel: str
    num_warps: int
    num_stages: int
    cc: int
    result: dict[str, Any]

    @property
    def spill(self) -> int:
        return int(self.result.get("spill_stores", 0))


def expected_refusal(case: Case) -> str | None:
    """The package's own reason to keep a case off the compiled kernels (its dispatcher
    then sends the call to the block loop), or ``None``."""
    from jaxmodules.attention._pallas._tuning import compiled_problem

    if case.reference:
        return None
    width = max(16, 1 << (case.d - 1).bit_length())
    return compiled_problem(width, _jnp_dtype(case.dtype))


def run(
    cases: list[Case],
    archs: tuple[int, ...],
    workers: int = 2,
    keep: str | None = None,
    refused: list[str] | None = None,
) -> tuple[list[Row], list[str]]:
    """Lower every case and compile its kernels for every architecture (``workers``
    processes compile while the main process lowers the next case). Returns the rows
    and the cases that did not lower; cases that ``implementation="pallas"`` refuses
    for the package's documented reason go to ``refused`` instead (a refusal with any
    other message, or no refusal, is reported as usual)."""
    rows: list[Row] = []
    lowering_errors: list[str] = []
    refused = [] if refused is None else refused
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        context = multiprocessing.get_context("spawn")
        pool: Any
        if workers > 1:
            pool = futures.ProcessPoolExecutor(
                workers, mp_context=context, initializer=_worker_init, initargs=(cache,)
            )
        else:
            pool = _Inline()
        with pool:
            pending = []
            for case in cases:
                start = time.perf_counter()
                try:
                    kernels = lower_case(case)
                except Exception as err:
                    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
                    reason = expected_refusal(case)
                    if reason is not None and isinstance(err, ValueError) and reason in message:
                        refused.append(f"{case.id}: {reason}")
                        print(f"{case.id}: refused as documented ({reason})", flush=True)
                        continue
                    error = f"{case.id}: {type(err).__name__}: {message}"[:400]
                    if case.reference:
                        # jax's own kernel is missing from this jax (0.12.1 removed the
                        # Pallas Triton ops): reported, not a failure of ours.
                        refused.append(f"{error} (reference not built)")
                        print(f"{case.id}: reference not built ({error})", flush=True)
                        continue
                    lowering_errors.append(error)
                    print(f"{case.id}: does not lower ({lowering_errors[-1]})", flush=True)
                    continue
                print(
                    f"{case.id}: {len(kernels)} kernels lowered in "
                    f"{time.perf_counter() - start:.1f} s",
                    flush=True,
                )
                for kernel in kernels:
                    for cc in archs:
                        tag = f"{case.id}.{kernel.name}"
                        job = pool.submit(
                            compile_ttir,
                            kernel.ttir,
                            cc,
                            kernel.num_warps,
                            kernel.num_stages,
                            keep,
                            tag,
                        )
                        pending.append((case, kernel, cc, job))
            for case, kernel, cc, job in pending:
                rows.append(
                    Row(case, kernel.name, kernel.num_warps, kernel.num_stages, cc, job.result())
                )
    return rows, lowering_errors


class _Inline:
    """A one-process stand-in for the process pool."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        done: futures.Future[Any] = futures.Future()
        done.set_result(fn(*args))
        return done


def spill_allowance(rows: list[Row]) -> dict[int, int]:
    """Per head dimension, the spill bytes a 16-bit kernel may have on sm_90: the most
    jax's ``mha`` spills there, at most ``HALF_SPILL_CAP``."""
    allowance: dict[int, int] = {}
    for row in rows:
        if row.case.reference and row.cc == 90 and "error" not in row.result:
            allowance[row.case.d] = max(allowance.get(row.case.d, 0), row.spill)
    return {d: min(spill, HALF_SPILL_CAP) for d, spill in allowance.items()}


def offenders(rows: list[Row], lowering_errors: list[str]) -> list[str]:
    """Every gate a kernel misses, one line each (jax's ``mha`` rows are not gated)."""
    problems = [f"{error} (does not lower)" for error in lowering_errors]
    allowance = spill_allowance(rows)
    for row in rows:
        if row.case.reference:
            continue
        where = f"{row.case.id} {row.kernel} {ARCHS[row.cc]}"
        if "error" in row.result:
            problems.append(f"{where}: does not compile ({row.result['error']})")
            continue
        shared = row.result["shared"]
        if shared > SHARED_LIMIT[row.cc]:
            problems.append(
                f"{where}: {_kib(shared)} KiB of shared memory, over the "
                f"{_kib(SHARED_LIMIT[row.cc])} KiB limit (cannot launch)"
            )
        if row.cc != 90:
            continue
        if row.spill > SPILL_LIMIT:
            problems.append(f"{where}: spills {row.spill} B, over {SPILL_LIMIT} B")
        elif row.case.dtype in ("bf16", "f16"):
            limit = allowance.get(row.case.d, HALF_SPILL_CAP)
            if row.spill > limit:
                problems.append(
                    f"{where}: spills {row.spill} B, more than jax's mha at d={row.case.d} "
                    f"({limit} B)"
                )
    return problems


def _kib(n: int) -> str:
    return f"{n / 1024:.0f}" if n % 1024 == 0 else f"{n / 1024:.1f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| case | d | dtype | kernel | warps | stages | arch | shared KiB | registers "
        "| spill B (stores/loads) | tensor cores | cp.async |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = (
            f"| {row.case.name}{' (jax)' if row.case.reference else ''} | {row.case.d} "
            f"| {row.case.dtype} | {row.kernel} | {row.num_warps} | {row.num_stages} "
            f"| {ARCHS[row.cc]} "
        )
        r = row.result
        if "error" in r:
            lines.append(head + f"| compile error: {r['error']} | | | | |")
            continue
        over = " **over**" if r["shared"] > SHARED_LIMIT[row.cc] else ""
        lines.append(
            head + f"| {_kib(r['shared'])}{over} | {r['registers']} "
            f"| {r['spill_stores']} / {r['spill_loads']} | {r['tensor_cores']} "
            f"| {'yes' if r['cp_async'] else 'no'} |"
        )
    return "\n".join(lines)


def report(
    rows: list[Row], problems: list[str], seconds: float, refused: list[str] | None = None
) -> str:
    import jax
    import triton

    allowance = spill_allowance(rows)
    verdict = (
        "All kernels pass."
        if not problems
        else f"{len(problems)} offences:\n\n" + "\n".join(f"- {p}" for p in problems)
    )
    if refused:
        verdict += (
            '\n\nRefused by `implementation="pallas"`, as documented (with '
            "`implementation=None` these calls run on the block loop):\n\n"
            + "\n".join(f"- {r}" for r in refused)
        )
    return f"""# The attention kernels compiled for sm_90 and sm_80

Written by `benchmarks/gpu/compile_report.py` (`nox -s gpu_compile`) on
{datetime.date.today().isoformat()}: jax {jax.__version__}, triton {triton.__version__}, on a
CPU. Each kernel is the compiled Pallas kernel a GPU user gets (exported for CUDA with
`jax.export`), compiled by `triton.compile` for each architecture; registers and spills
from the wheel's `ptxas -v`. Causal cases: B=2, L=2048, 16 heads (GQA: 16 query and 4
key/value heads); decoding: 16 queries of 4 heads against 2048 keys (split-K). Rows
marked (jax) are jax's own `jax.experimental.pallas.ops.gpu.attention.mha`, compiled the
same way. {len(rows)} compilations in {seconds:.0f} s.

Gates: a kernel must compile; shared memory at most 227 KiB (sm_90) and 163 KiB (sm_80);
on sm_90 spills at most {SPILL_LIMIT} B, and for bfloat16/float16 at most what jax's `mha`
spills at the same head dimension (measured in this run: {
        ", ".join(f"d={d}: {b} B" for d, b in sorted(allowance.items())) or "none"
    }; {HALF_SPILL_CAP} B elsewhere).

{verdict}

{table(rows)}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="GLOB",
        help="case ids to run, as shell patterns over 'CASE-dD-DTYPE' (e.g. causal-d256-*, "
        "*-f32, gqa-*; cases: mha causal documents bias score_mod dropout gqa decode)",
    )
    parser.add_argument("--arch", nargs="+", type=int, choices=sorted(ARCHS), default=None)
    parser.add_argument("--no-fail", action="store_true", help="report only; exit 0")
    parser.add_argument("--output", type=Path, help=f"report path (default {REPORT})")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--keep", help="keep each kernel's TTIR and PTX in this folder")
    parser.add_argument("--workers", type=int, default=2, help="compiling processes")
    parser.add_argument("--list", action="store_true", help="print the case ids and stop")
    args = parser.parse_args(argv)

    cases = all_cases()
    if args.list:
        print("\n".join(case.id for case in cases))
        return 0
    if args.only:
        chosen = [c for c in cases if any(fnmatch.fnmatch(c.id, p) for p in args.only)]
        # The spill allowance comes from jax's mha: keep its rows at the chosen d.
        dims = {c.d for c in chosen}
        chosen = [c for c in cases if c in chosen or (c.reference and c.d in dims)]
        if not chosen:
            parser.error(f"--only {args.only} matches none of: {[c.id for c in cases]}")
        cases = chosen
    archs = tuple(args.arch or sorted(ARCHS, reverse=True))
    start = time.perf_counter()
    refused: list[str] = []
    rows, lowering_errors = run(cases, archs, workers=args.workers, keep=args.keep, refused=refused)
    seconds = time.perf_counter() - start
    problems = offenders(rows, lowering_errors)
    # A case the package refuses must really be refused: lowering it is an offence.
    for case in cases:
        reason = expected_refusal(case)
        if reason is not None and not any(r.startswith(f"{case.id}:") for r in refused):
            problems.append(f"{case.id}: expected the refusal '{reason}', but it lowered")
    print(table(rows))
    output = args.output or (None if args.only or args.arch else REPORT)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report(rows, problems, seconds, refused))
        print(f"wrote {output}")
    if args.json is not None:
        data = [
            {
                "case": row.case.id,
                "kernel": row.kernel,
                "num_warps": row.num_warps,
                "num_stages": row.num_stages,
                "arch": ARCHS[row.cc],
                **row.result,
            }
            for row in rows
        ]
        args.json.write_text(json.dumps(data, indent=1))
    print(f"{len(rows)} compilations in {seconds:.0f} s")
    if problems:
        print(f"{len(problems)} offences:", *(f"  - {p}" for p in problems), sep="\n")
        return 0 if args.no_fail else 1
    print("all kernels pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
