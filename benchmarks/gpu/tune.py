"""Tile sizes of the fused Pallas kernel against cuDNN, on one GPU, in one run.

For causal attention at the size of the GPU targets (bfloat16, B=2, H=16, d=128,
L=16384 by default) it times the Pallas kernel's forward and forward+backward for
several block sizes (the block mask's, which are the forward's tiles), backward slices
(``backward_tile``: keys per dQ tile, queries per dK/dV tile) and warps per program,
alternating with ``jax.nn.dot_product_attention(implementation="cudnn")`` as reference,
and reports each median, its ratio to cuDNN and the achieved TFLOP/s (causal: half the
dense FLOPs; backward counted as 2.5 forwards, as FlashAttention does). Then decoding:
16 new queries per row against all L keys, forward only, with the key lists split into
1, the default number of and 16 shares (``kv_splits``), against cuDNN without a mask.

    python benchmarks/gpu/tune.py                    # writes results/attention_gpu_tuning.md
    python benchmarks/gpu/tune.py --length 4096      # shorter
    python benchmarks/gpu/tune.py --smoke            # tiny, interpret mode: checks the script

The winning configuration is what the Pallas backend (``_pallas/_entry.py``) should
default to on that GPU.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxmodules.attention import _pallas as pallas
from jaxmodules.attention import create_block_mask

RESULTS = Path(__file__).resolve().parents[1] / "results"

# (block size, backward tile, warps). The forward has no backward tile (None); a tile
# as large as the block walks whole blocks.
FORWARD_CONFIGS = [((128, 128), None, w) for w in (4, 8)] + [
    ((128, 64), None, 4),
    ((128, 64), None, 8),
    ((64, 64), None, 4),
]
BACKWARD_CONFIGS = [
    ((128, 128), 32, 4),
    ((128, 128), 32, 8),
    ((128, 128), 64, 8),
    ((128, 128), 128, 8),
    ((128, 64), 32, 4),
    ((64, 64), 32, 4),
    ((64, 64), 64, 4),
]


def _time(fn: Callable[..., Any], inputs: tuple, repeats: int) -> float:
    jax.block_until_ready(fn(*inputs))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _try_time(label: str, fn: Callable[..., Any], inputs: tuple, repeats: int) -> float | None:
    """``_time``, or ``None`` (reported) when the program does not compile or run, so
    that one configuration Triton rejects does not end the sweep."""
    try:
        return _time(fn, inputs, repeats)
    except Exception as err:
        print(f"{label}: failed ({type(err).__name__}: {err})", flush=True)
        return None


def _ms(seconds: float | None, digits: int = 2) -> str:
    return "failed" if seconds is None else f"{seconds * 1e3:.{digits}f}"


def _ratio(ours: float | None, reference: float | None) -> str:
    return "-" if ours is None or reference is None else f"{ours / reference:.2f}"


def _program(attend: Callable[..., jax.Array], mode: str) -> Callable[..., Any]:
    if mode == "fwd":
        return jax.jit(attend)

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _pallas(
    args: argparse.Namespace,
    block: tuple[int, int],
    tile: int | None,
    warps: int | None,
    *,
    q_len: int | None = None,
    causal: bool = True,
    kv_splits: int | None = None,
) -> Callable[..., jax.Array]:
    length = args.length
    block_mask = create_block_mask(
        None,
        args.batch,
        args.heads,
        q_len or length,
        length,
        is_causal=causal,
        block_size=block,
    )
    scale = args.dim**-0.5

    def attend(q, k, v):
        out, _ = pallas.attend(
            q,
            k,
            v,
            block_mask,
            scale,
            interpret=args.smoke or None,
            backward_tile=tile,
            num_warps=warps,
            kv_splits=kv_splits,
        )
        return out

    return attend


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def _xla(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


DECODE_QUERIES = 16
DECODE_SPLITS = (1, None, 16)  # None: the kernel's default


def _decode_rows(args: argparse.Namespace, inputs: tuple, on_gpu: bool) -> list[tuple]:
    """Decoding: the last DECODE_QUERIES queries against every key, no mask."""
    q = inputs[0][:, -DECODE_QUERIES:]
    k, v = inputs[1], inputs[2]

    def reference(q, k, v):
        if on_gpu:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")

    reference_s = _try_time("decode reference", jax.jit(reference), (q, k, v), args.repeats)
    rows = []
    for splits in DECODE_SPLITS:
        attend = _pallas(
            args,
            (DECODE_QUERIES, 128),
            None,
            None,
            q_len=DECODE_QUERIES,
            causal=False,
            kv_splits=splits,
        )
        label = f"decode   kv_splits={splits}"
        ours_s = _try_time(label, jax.jit(attend), (q, k, v), args.repeats)
        rows.append(("decode", splits, ours_s, reference_s))
        print(
            f"{label}: {_ms(ours_s, 3)} ms, reference {_ms(reference_s, 3)} ms, "
            f"ratio {_ratio(ours_s, reference_s)}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode")
    parser.add_argument("--output", type=Path, default=RESULTS / "attention_gpu_tuning.md")
    args = parser.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    if args.smoke:
        args.length, args.batch, args.heads, args.dim, args.repeats = 256, 1, 2, 64, 1
    elif not on_gpu:
        raise SystemExit("tune.py times compiled GPU kernels; without a GPU use --smoke")
    shape = (args.batch, args.length, args.heads, args.dim)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    dtype = jnp.bfloat16
    inputs = tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
    # Causal attention: half the dense 4 B H L^2 d; the backward is 2.5 forwards.
    forward_flops = 2.0 * args.batch * args.heads * args.length**2 * args.dim
    flops = {"fwd": forward_flops, "fwd+bwd": 3.5 * forward_flops}
    reference = _cudnn if on_gpu else _xla
    reference_name = "cuDNN" if on_gpu else "XLA"

    rows: list[tuple[Any, ...]] = []
    for mode, configs in (("fwd", FORWARD_CONFIGS), ("fwd+bwd", BACKWARD_CONFIGS)):
        reference_program = _program(reference, mode)
        for block, tile, warps in configs:
            label = f"{mode:8s} block={block} tile={tile} warps={warps}"
            ours = _program(_pallas(args, block, tile, warps), mode)
            ours_s = _try_time(label, ours, inputs, args.repeats)
            if ours_s is None:
                rows.append((mode, block, tile, warps, None, None))
                continue
            reference_s = _try_time(reference_name, reference_program, inputs, args.repeats)
            rows.append((mode, block, tile, warps, ours_s, reference_s))
            print(
                f"{label}: {_ms(ours_s)} ms, {reference_name} {_ms(reference_s)} ms, "
                f"ratio {_ratio(ours_s, reference_s)}, "
                f"{flops[mode] / ours_s / 1e12:.0f} TFLOP/s",
                flush=True,
            )

    decode = _decode_rows(args, inputs, on_gpu)

    device = jax.devices()[0]
    lines = [
        "# Pallas kernel tile sizes",
        "",
        "`python benchmarks/gpu/tune.py" + (" --smoke`" if args.smoke else "`"),
        "",
        f"- {getattr(device, 'device_kind', device)}, jax {jax.__version__}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- causal, bfloat16, B={args.batch}, H={args.heads}, d={args.dim}, L={args.length}; "
        f"median of {args.repeats}, alternating with {reference_name}",
        "",
        f"| pass | block | backward tile | warps | ours (ms) | {reference_name} (ms) | ratio "
        "| TFLOP/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, block, tile, warps, ours_s, reference_s in rows:
        if ours_s is None:
            lines.append(f"| {mode} | {block[0]}x{block[1]} | {tile} | {warps} | failed | | | |")
            continue
        lines.append(
            f"| {mode} | {block[0]}x{block[1]} | {tile or '-'} | {warps} "
            f"| {_ms(ours_s)} | {_ms(reference_s)} | {_ratio(ours_s, reference_s)} "
            f"| {flops[mode] / ours_s / 1e12:.1f} |"
        )
    # Decoding reads every key once: bytes of K and V over the time.
    kv_bytes = 2 * inputs[1].size * inputs[1].dtype.itemsize
    lines += [
        "",
        f"Decoding: {DECODE_QUERIES} queries per row against L={args.length} keys, no mask.",
        "",
        f"| kv_splits | ours (ms) | {reference_name} (ms) | ratio | K/V read (GB/s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for _, splits, ours_s, reference_s in decode:
        bandwidth = "-" if ours_s is None else f"{kv_bytes / ours_s / 1e9:.0f}"
        lines.append(
            f"| {splits or 'default'} | {_ms(ours_s, 3)} | {_ms(reference_s, 3)} "
            f"| {_ratio(ours_s, reference_s)} | {bandwidth} |"
        )
    if not args.smoke:
        args.output.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.output}")
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
