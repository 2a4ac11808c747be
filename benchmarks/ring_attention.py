"""Ring attention on 8 simulated CPU devices: per-device memory and per-device work.

- Per-device temporary memory of the compiled forward+backward program (XLA's own
  ``memory_analysis``, per device for an SPMD program) against the sequence length, for
  the ring's custom VJP, and with a ``score_mod`` that closes over learnable (traced)
  ALiBi slopes, whose gradient the same VJP computes. (Plain autodiff through the ring,
  which saves every visiting key/value chunk, needed 6.9x the first column: 113.85 MiB
  at L=8192.)
- Per-device half-chunk pairs computed under a causal mask with the zigzag layout and
  with the contiguous (unbalanced) one.

Only compiles (no timing: 8 simulated devices share the host's cores). Writes
``benchmarks/results/ring_attention.md``.

    python benchmarks/ring_attention.py
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmodules.attention import ring_attention, ring_block_counts

RESULTS = Path(__file__).resolve().parent / "results"


def temp_bytes(length: int, learned_slopes: bool, heads: int, dim: int) -> tuple[int, int, bool]:
    mesh = jax.make_mesh((8,), ("seq",))
    sharding = NamedSharding(mesh, P(None, "seq"))
    shape = jax.ShapeDtypeStruct((1, length, heads, dim), jnp.float32, sharding=sharding)
    slopes_shape = jax.ShapeDtypeStruct((heads,), jnp.float32)

    def loss(q, k, v, slopes):
        def alibi(s, b, h, qp, kp):
            return s - slopes[h] * jnp.abs(qp - kp)

        extra = {"score_mod": alibi} if learned_slopes else {}
        out = ring_attention(q, k, v, mesh=mesh, seq_axis="seq", is_causal=True, **extra)
        return jnp.sum(out * out)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    compiled = grad.lower(shape, shape, shape, slopes_shape).compile()
    text = compiled.as_text()
    ok = "collective-permute" in text and "all-gather" not in text
    return compiled.memory_analysis().temp_size_in_bytes, text.count("collective-permute"), ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    assert len(jax.devices()) == 8
    lines = [
        "# Ring attention, 8 simulated CPU devices",
        "",
        f"jax {jax.__version__}; B=1, H={args.heads}, d={args.dim}, float32, causal, zigzag;",
        "temporary bytes per device of the compiled forward+backward (`memory_analysis`).",
        "",
        "| L | L / 8 | custom VJP (MiB) | with learned ALiBi slopes (MiB) "
        "| permutes, no all-gather |",
        "|---|---|---|---|---|",
    ]
    for length in args.lengths:
        ring, permutes, ok = temp_bytes(length, False, args.heads, args.dim)
        learned, _, _ = temp_bytes(length, True, args.heads, args.dim)
        lines.append(
            f"| {length} | {length // 8} | {ring / 2**20:.2f} | {learned / 2**20:.2f} "
            f"| {permutes} {'yes' if ok else 'NO'} |"
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        "Half-chunk pairs computed per device (causal, 8 devices, out of 32):",
        "",
        f"- zigzag: {ring_block_counts(8)}",
        f"- contiguous: {ring_block_counts(8, layout='contiguous')}",
        "",
    ]
    print("\n".join(lines[-5:]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ring_attention.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
