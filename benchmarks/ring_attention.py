"""Ring attention on 8 simulated CPU devices: natural order against pre-ordered zigzag.

``ring_attention`` takes natural-order inputs by default and, under a causal mask,
exchanges chunks between devices into the balanced order inside the call (and sends the
output back). Pre-ordered zigzag inputs (``layout="zigzag"``) skip that. Side by side,
in one process, for the causal forward+backward step ``grad(sum(out**2))``:

- per-device temporary memory of the compiled program (XLA's ``memory_analysis``, per
  device for an SPMD program) against the sequence length: it should grow linearly in
  ``L / n``;
- bytes each device sends by collective permutes, read from the compiled program: those
  outside loops run once (the exchange, the last hop home), those inside the ring's
  loops run ``n - 1`` times (keys and values, and in the backward their gradients);
- time per step, both layouts compiled and warmed up, then timed alternately (natural,
  zigzag, natural, ...), median of the repeats; the 8 simulated devices share the
  host's cores, so the ratio is the figure to read, not the milliseconds;
- per-device memory with a ``score_mod`` that closes over learnable (traced) ALiBi
  slopes, whose gradient the same custom VJP computes;
- per-device half-chunk pairs computed under a causal mask in each order.

Writes ``benchmarks/results/ring_attention.md``.

    python benchmarks/ring_attention.py
    python benchmarks/ring_attention.py --lengths 1024 2048 4096 --time-lengths 1024 2048
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import re
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmodules.attention import ring_attention, ring_block_counts, to_zigzag

RESULTS = Path(__file__).resolve().parent / "results"
N = 8
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "f64": 8, "pred": 1}


def _step(mesh: Any, layout: str, learned_slopes: bool) -> Any:
    def loss(q, k, v, slopes):
        def alibi(s, b, h, qp, kp):
            return s - slopes[h] * jnp.abs(qp - kp)

        extra = {"score_mod": alibi} if learned_slopes else {}
        out = ring_attention(
            q, k, v, mesh=mesh, seq_axis="seq", layout=layout, is_causal=True, **extra
        )
        return jnp.sum(out * out)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def permute_bytes(hlo: str) -> tuple[int, int, int]:
    """Bytes one device sends by collective permutes: (outside loops, per loop
    iteration, count of permute instructions). Instructions in the entry computation
    run once; the others sit in the ring's scan bodies."""
    once = per_step = count = 0
    in_entry = False
    for line in hlo.splitlines():
        if line and not line.startswith(" "):
            in_entry = line.startswith("ENTRY")
        match = re.search(r"= (\w+)\[([\d,]*)\]\{[^}]*\} collective-permute\(", line)
        if not match:
            continue
        dims = [int(d) for d in match.group(2).split(",") if d]
        size = int(np.prod(dims)) * _DTYPE_BYTES[match.group(1)]
        count += 1
        if in_entry:
            once += size
        else:
            per_step += size
    return once, per_step, count


def compiled(length: int, layout: str, learned_slopes: bool, heads: int, dim: int) -> Any:
    mesh = jax.make_mesh((N,), ("seq",))
    sharding = NamedSharding(mesh, P(None, "seq"))
    shape = jax.ShapeDtypeStruct((1, length, heads, dim), jnp.float32, sharding=sharding)
    slopes = jax.ShapeDtypeStruct((heads,), jnp.float32)
    return _step(mesh, layout, learned_slopes).lower(shape, shape, shape, slopes).compile()


def timed(length: int, heads: int, dim: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each layout, timed alternately on the same data."""
    mesh = jax.make_mesh((N,), ("seq",))
    sharding = NamedSharding(mesh, P(None, "seq"))
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    natural = [jax.random.normal(key, (1, length, heads, dim)) for key in keys]
    inputs = {
        "natural": [jax.device_put(x, sharding) for x in natural],
        "zigzag": [jax.device_put(to_zigzag(x, N), sharding) for x in natural],
    }
    slopes = jnp.zeros((heads,), jnp.float32)
    steps = {layout: _step(mesh, layout, False) for layout in inputs}
    for layout, step in steps.items():  # compile and warm up
        jax.block_until_ready(step(*inputs[layout], slopes))
    times: dict[str, list[float]] = {layout: [] for layout in inputs}
    for _ in range(repeats):
        for layout, step in steps.items():
            time.sleep(0.2)
            start = time.perf_counter()
            jax.block_until_ready(step(*inputs[layout], slopes))
            times[layout].append(time.perf_counter() - start)
    return {layout: statistics.median(t) for layout, t in times.items()}


def _mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--time-lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    assert len(jax.devices()) == N
    h, d = args.heads, args.dim
    lines = [
        f"# Ring attention, {N} simulated CPU devices: natural order against zigzag",
        "",
        f"jax {jax.__version__}; B=1, H={h}, d={d}, float32, causal; forward+backward of "
        "`sum(out**2)`. Natural: the default call, chunks exchanged into the balanced "
        'order inside it. Zigzag: inputs pre-ordered, `layout="zigzag"`.',
        "",
        "## Memory and traffic per device",
        "",
        "Temporary bytes of the compiled program (`memory_analysis`); bytes sent by "
        f"collective permutes, once (outside loops) + per ring step x {N - 1} steps.",
        "",
        "| L | L / n | natural MiB | zigzag MiB | natural MiB per 1k of L / n "
        "| natural sent MiB | zigzag sent MiB | permutes natural / zigzag | all-gather |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for length in args.lengths:
        row = {}
        for layout in ("natural", "zigzag"):
            program = compiled(length, layout, False, h, d)
            text = program.as_text()
            once, per_step, count = permute_bytes(text)
            row[layout] = (
                program.memory_analysis().temp_size_in_bytes,
                once + (N - 1) * per_step,
                count,
                "all-gather" in text,
            )
        nat, zig = row["natural"], row["zigzag"]
        lines.append(
            f"| {length} | {length // N} | {_mib(nat[0])} | {_mib(zig[0])} "
            f"| {_mib(nat[0] * 1024 / (length // N))} | {_mib(nat[1])} | {_mib(zig[1])} "
            f"| {nat[2]} / {zig[2]} | {'YES' if nat[3] or zig[3] else 'none'} |"
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        "## Time per step",
        "",
        f"Median of {args.repeats} alternating runs after warm-up; host load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the start (a shared host "
        "makes this ratio noisy).",
        "",
        "| L | natural ms | zigzag ms | natural / zigzag |",
        "|---|---|---|---|",
    ]
    for length in args.time_lengths:
        t = timed(length, h, d, args.repeats)
        lines.append(
            f"| {length} | {t['natural'] * 1e3:.1f} | {t['zigzag'] * 1e3:.1f} "
            f"| {t['natural'] / t['zigzag']:.3f} |"
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        "## With learned ALiBi slopes",
        "",
        "Natural order; `score_mod` closes over a traced `(H,)` array whose gradient the "
        "ring's custom VJP computes.",
        "",
        "| L | L / n | MiB | plain MiB |",
        "|---|---|---|---|",
    ]
    for length in args.lengths:
        learned = compiled(length, "natural", True, h, d).memory_analysis().temp_size_in_bytes
        plain = compiled(length, "natural", False, h, d).memory_analysis().temp_size_in_bytes
        lines.append(f"| {length} | {length // N} | {_mib(learned)} | {_mib(plain)} |")
        print(lines[-1], flush=True)
    lines += [
        "",
        f"## Half-chunk pairs computed per device (causal, {N} devices, out of {4 * N})",
        "",
        f"- natural (the default call): {ring_block_counts(N)}",
        f"- zigzag: {ring_block_counts(N, layout='zigzag')}",
        f"- contiguous (natural, not balanced): {ring_block_counts(N, layout='contiguous')}",
        "",
    ]
    print("\n".join(lines[-5:]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ring_attention.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
