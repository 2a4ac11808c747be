"""Ring attention's gradient compiled by libtpu for a TPU v5e 2x2 slice, on a CPU host.

One training step's attention as a context-parallel user runs it: ``ring_attention`` over
four devices of libtpu's compile-only ``v5e:2x2`` topology, the sequence split along the
ring (L = 32768, 8192 per device), B=1, H=8, d=128, bfloat16, causal, under
``jax.value_and_grad``. Per backend of the ring's steps (``implementation=None``, which
picks the Mosaic TPU kernels on a TPU, and ``"xla"``, the block loop): compile time, the
program's temporary memory per device, its generated code size, and the collectives in
the compiled program (a ring permutes key/value chunks and never all-gathers them).

    python benchmarks/tpu/ring_compile.py            # both, one process each
    python benchmarks/tpu/ring_compile.py --output benchmarks/results/attention_tpu_ring.md

Needs ``libtpu`` beside jax (``pip install libtpu``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

LENGTH, HEADS, HEAD_DIM = 32768, 8, 128
IMPLEMENTATIONS = {"kernel": None, "block loop": "xla"}


def worker(name: str, out: Path) -> None:
    """In a fresh process: compile the ring gradient with one step backend."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxmodules.attention import ring_attention

    topology = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    mesh = Mesh(np.array(topology.devices), ("seq",))
    spec = NamedSharding(mesh, PartitionSpec(None, "seq"))
    x = jax.ShapeDtypeStruct((1, LENGTH, HEADS, HEAD_DIM), jnp.bfloat16, sharding=spec)

    def loss(q: Any, k: Any, v: Any) -> Any:
        out = ring_attention(
            q, k, v, mesh=mesh, seq_axis="seq", is_causal=True,
            implementation=IMPLEMENTATIONS[name],
        )  # fmt: skip
        return out.astype(jnp.float32).sum()

    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    seconds = time.perf_counter() - start
    text = compiled.as_text()
    memory = compiled.memory_analysis()

    def count(op: str) -> int:
        return len(re.findall(rf"= [^=]*? {op}(?:-start)?\(", text))

    result = {
        "seconds": seconds,
        "temp": getattr(memory, "temp_size_in_bytes", None),
        "argument": getattr(memory, "argument_size_in_bytes", None),
        "code": getattr(memory, "generated_code_size_in_bytes", None),
        "permutes": count("collective-permute"),
        "all_gathers": count("all-gather"),
        "kernels": text.count('custom_call_target="tpu_custom_call"'),
    }
    out.write_text(json.dumps(result))


def run(name: str, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1"}
        command = [sys.executable, __file__, "--worker", name, str(out)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0 or not out.exists():
            return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        return json.loads(out.read_text())


def markdown(results: dict[str, dict[str, Any]]) -> str:
    import jax

    mib = 1 << 20
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | {r['error']} | | | | | |")
            continue
        rows.append(
            f"| {name} | {r['seconds']:.1f} | {r['temp'] / mib:.0f} | "
            f"{r['temp'] / r['argument'] * 3:.1f}x | {r['code'] / 1e6:.1f} | "
            f"{r['permutes']} / {r['all_gathers']} | {r['kernels']} |"
        )
    return f"""# Ring attention's gradient compiled for TPU v5e 2x2

Written by `benchmarks/tpu/ring_compile.py` on {datetime.date.today().isoformat()}: jax
{jax.__version__}, libtpu compile-only topology `v5e:2x2` on a CPU host. `ring_attention`
under `jax.value_and_grad`, L = {LENGTH} split over 4 devices, B=1, H={HEADS},
d={HEAD_DIM}, bfloat16, causal. "kernel": the ring's steps with `implementation=None`
(the Mosaic TPU kernels on a TPU); "block loop": `implementation="xla"`. Temp: the
program's temporary memory per device, and its ratio to one input's local shard. Code:
generated code size.

| steps | compile s | temp MiB | temp / input | code MB | permutes / gathers | kernels |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--output", type=Path)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]))
        return 0
    results = {name: run(name, args.timeout) for name in IMPLEMENTATIONS}
    text = markdown(results)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
