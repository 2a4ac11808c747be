"""Planning costs of masked_attention_via_map: compile at long context, block-mask
builds, traced masks, recompilation of eager calls.

Measures, on this machine:

1. Lowering + compiling ``jit(grad(attention))`` (B=1, H=1, d=64), each case in a
   fresh subprocess: seconds and the growth of the process's peak resident memory.
   Causal at L = 131,072 and 262,144 (float32); at L = 1,048,576 (bfloat16) causal, a
   window (4096, 0), and causal with 8 documents whose segment ids are traced
   (``mask_fn`` on them); L = 8192 (bfloat16) as the reference of a small program. The
   plan's device memory: ``BlockMask.nbytes`` of the plan each case builds.
2. ``create_block_mask`` for a static ``mask_fn`` (documents of 3,000 tokens, causal)
   at L = 32,768, B=H=1: first call (compiles its builder) and a second call with a new
   function object of the same code; and at L = 1,048,576 with a window (4096, 0):
   seconds, peak host memory growth, plan bytes, sparsity.
3. Eight traced causal documents at L = 8192 (H=4, d=64): forward with the segment ids
   passed to the jitted function, so the block mask is built inside the call, against
   the plain causal forward, timed alternately in one process (median of repeats).
4. Five identical eager calls with one ``mask_fn``: XLA compilations counted with
   ``jax.monitoring``.

Writes ``benchmarks/results/attention_planning.md``.

    python benchmarks/attention_planning.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodules.attention import create_block_mask, masked_attention_via_map

RESULTS = Path(__file__).resolve().parent / "results"

_COMPILE_PROBE = """
import json, resource, sys, time
import jax, jax.numpy as jnp
from jaxmodules.attention import create_block_mask, masked_attention_via_map

def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0

case, length, dtype = sys.argv[1], int(sys.argv[2]), jnp.dtype(sys.argv[3])
spec = jax.ShapeDtypeStruct((1, length, 1, 64), dtype)
ids_spec = jax.ShapeDtypeStruct((1, length), jnp.int32)
options = {
    "causal": {"is_causal": True},
    "window": {"window_size": (4096, 0)},
    "documents": {"is_causal": True},
}[case]

def mask_fn(ids):
    if case != "documents":
        return None
    return lambda b, h, qi, ki: ids[b, qi] == ids[b, ki]

def loss(q, k, v, ids):
    out = masked_attention_via_map(q, k, v, mask_fn=mask_fn(ids), **options)
    return out.astype(jnp.float32).sum()

def plan(ids):
    return create_block_mask(mask_fn(ids), 1, 1, length, length, **options)

step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
before = rss_mib()
start = time.perf_counter()
step.lower(spec, spec, spec, ids_spec).compile()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
plan_bytes = jax.eval_shape(plan, ids_spec).nbytes  # index arrays, not the ids
print(json.dumps({"seconds": seconds, "memory_mib": peak - before, "plan_bytes": plan_bytes}))
"""


def compile_cost(case: str, length: int, dtype: str = "float32") -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _COMPILE_PROBE, case, str(length), dtype],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


_BUILD_PROBE = """
import json, resource, sys, time
import jax, jax.numpy as jnp
from jaxmodules.attention import create_block_mask

def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0

length = int(sys.argv[1])
def documents(b, h, q, k):
    return (q // 3000) == (k // 3000)

before = rss_mib()
start = time.perf_counter()
bm = create_block_mask(documents, 1, 1, length, length, window_size=(4096, 0))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "memory_mib": peak - before, "plan_bytes": bm.nbytes,
                  "sparsity": bm.sparsity(), "walk": bm.walk, "block_size": bm.block_size}))
"""


def long_build(length: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _BUILD_PROBE, str(length)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def block_mask_build(length: int) -> dict:
    def documents(b, h, q, k):
        return (q // 3000) == (k // 3000)

    def documents_again(b, h, q, k):
        return (q // 3000) == (k // 3000)

    start = time.perf_counter()
    first = create_block_mask(documents, 1, 1, length, length, is_causal=True)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    create_block_mask(documents_again, 1, 1, length, length, is_causal=True)
    again_s = time.perf_counter() - start
    return {
        "first_s": first_s,
        "again_s": again_s,
        "block_size": first.block_size,
        "sparsity": first.sparsity(),
    }


def traced_documents(length: int, repeats: int) -> dict:
    heads, documents = 4, 8
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (1, length, heads, 64)) for key in keys)
    ids = jnp.asarray((np.arange(length) * documents // length)[None].astype(np.int32))

    @jax.jit
    def causal(q, k, v, ids):
        return masked_attention_via_map(q, k, v, is_causal=True)

    @jax.jit
    def in_documents(q, k, v, ids):
        return masked_attention_via_map(
            q, k, v, is_causal=True, mask_fn=lambda b, h, qi, ki: ids[b, qi] == ids[b, ki]
        )

    runs = {"causal": causal, "documents": in_documents}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn(q, k, v, ids).block_until_ready()
    for _ in range(repeats):
        for name, fn in runs.items():
            time.sleep(0.25)
            start = time.perf_counter()
            fn(q, k, v, ids).block_until_ready()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {**medians, "ratio": medians["documents"] / medians["causal"]}


def eager_compiles(calls: int) -> list[int]:
    compiles: list[str] = []

    def listener(event: str, *args: object, **kwargs: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q, k, v = (jax.random.normal(key, (1, 512, 4, 64)) for key in keys)
    ids = jnp.asarray(np.arange(512) // 100)

    def same_document(b, h, qi, ki):
        return ids[qi] == ids[ki]

    counts = []
    for _ in range(calls + 1):
        before = len(compiles)
        masked_attention_via_map(q, k, v, mask_fn=same_document).block_until_ready()
        counts.append(len(compiles) - before)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    cases = [
        ("causal", 131_072, "float32"),
        ("causal", 262_144, "float32"),
        ("causal", 8192, "bfloat16"),
        ("causal", 1 << 20, "bfloat16"),
        ("window", 1 << 20, "bfloat16"),
        ("documents", 1 << 20, "bfloat16"),
    ]
    compile_rows = {case: compile_cost(*case) for case in cases}
    build = block_mask_build(32_768)
    long = long_build(1 << 20)
    documents = traced_documents(8192, args.repeats)
    counts = eager_compiles(5)

    lines = [
        "# Planning costs",
        "",
        "`python benchmarks/attention_planning.py`",
        "",
        f"- jax {jax.__version__}, backend {jax.default_backend()}, "
        f"Python {platform.python_version()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        "## Lower + compile `jit(grad(attention))`, B=1, H=1, d=64, one process per case",
        "",
        "`documents`: causal and 8 documents, `mask_fn` on traced segment ids. Plan: the "
        "device bytes of the block mask the case builds.",
        "",
        "| case | L | dtype | seconds | peak host memory growth (MiB) | plan bytes |",
        "|---|---:|---|---:|---:|---:|",
    ]
    lines += [
        f"| {case} | {length:,} | {dtype} | {row['seconds']:.2f} | {row['memory_mib']:.0f} "
        f"| {row['plan_bytes']:,} |"
        for (case, length, dtype), row in compile_rows.items()
    ]
    lines += [
        "",
        "## `create_block_mask`, static `mask_fn` (causal documents), L = 32,768",
        "",
        f"- first call (compiles the builder): {build['first_s']:.2f} s",
        f"- same code, new function object: {build['again_s']:.3f} s",
        f"- block size {tuple(build['block_size'])}, sparsity {build['sparsity']:.3f}",
        "",
        "## `create_block_mask`, static `mask_fn` (documents of 3,000), window (4096, 0), "
        "L = 1,048,576",
        "",
        f"- {long['seconds']:.2f} s, peak host memory growth {long['memory_mib']:.0f} MiB; "
        f"block size {tuple(long['block_size'])}, sparsity {long['sparsity']:.4f}, "
        f"plan `{long['walk']}`, {long['plan_bytes']:,} bytes",
        "",
        "## Eight traced causal documents, L = 8192, H=4, d=64, forward",
        "",
        "Block mask built inside the jitted call from the segment ids; the work is 0.125 "
        "of the causal forward.",
        "",
        f"- causal: {documents['causal'] * 1e3:.1f} ms, documents: "
        f"{documents['documents'] * 1e3:.1f} ms, ratio **{documents['ratio']:.3f}**",
        "",
        "## Eager calls with one `mask_fn` (L=512, H=4)",
        "",
        f"- XLA compilations per call: {counts} (first call, then 5 identical calls)",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "attention_planning.md").write_text(text)


if __name__ == "__main__":
    main()
