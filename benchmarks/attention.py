"""masked_attention_via_map against jax.nn.dot_product_attention, time and memory.

Everything runs in one process. For each mask and sequence length both implementations
are jitted, compiled and warmed up, then timed alternately (ours, XLA, ours, XLA, ...)
and the median of the repeats is reported, so that slow drifts of a shared machine hit
both columns alike. A short pause before every timed run lets the system settle after
the dense version releases its large buffers (``--settle``). Memory is XLA's compiled
``temp_size_in_bytes`` (scratch buffers beyond inputs and outputs) of the forward and
of the gradient.

Masks: causal, none, sliding window (128, 0), four equal documents (segment ids passed to
the jitted function, so the block skipping is decided on device). The dense reference
gets the equivalent ``is_causal`` / ``local_window_size`` / boolean ``mask`` argument.

Writes ``benchmarks/results/attention_<backend>.md``, ``.json`` and ``.png`` and copies
the plot to ``docs/assets/attention_benchmark.png``.

    python benchmarks/attention.py                 # full CPU run (about 15 min, 2 cores)
    python benchmarks/attention.py --max-dense-length 16384   # time dense at 16384 too
    python benchmarks/attention.py --quick         # a couple of minutes
    python benchmarks/attention.py --dtype bfloat16 --impl pallas  # on a GPU

``--impl`` picks the backend of ``masked_attention_via_map`` ("ours"): ``xla`` (the block
loop), ``pallas`` (the fused kernel; interpret mode, so only for tiny runs, off a GPU),
``cudnn`` or ``auto`` (``implementation=None``). On a GPU with float16/bfloat16 inputs
(or with ``--impl cudnn``) ``jax.nn``'s cuDNN implementation is timed as a third column.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodules.attention import masked_attention_via_map

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
DOCS_PLOT = ROOT.parent / "docs" / "assets" / "attention_benchmark.png"

MASKS = ("causal", "unmasked", "window", "documents")
MODES = ("fwd", "fwd+bwd")
WINDOW = (128, 0)
DOCUMENTS = 4


# ----------------------------------------------------------------------------- inputs


def _segment_ids(batch: int, length: int, documents: int = DOCUMENTS) -> jax.Array:
    ids = np.minimum(np.arange(length) * documents // length, documents - 1)
    return jnp.asarray(np.broadcast_to(ids, (batch, length)).astype(np.int32))


def _inputs(args: argparse.Namespace, length: int) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.PRNGKey(length), 3)
    shape = (args.batch, length, args.heads, args.dim)
    dtype = jnp.dtype(args.dtype)
    q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
    return q, k, v, _segment_ids(args.batch, length, args.documents)


def _ours(mask: str, impl: str = "xla") -> Callable[..., jax.Array]:
    implementation = None if impl == "auto" else impl

    def attention(q, k, v, ids):
        options: dict[str, Any] = {"implementation": implementation}
        if mask == "causal":
            options["is_causal"] = True
        elif mask == "window":
            options["window_size"] = WINDOW
        elif mask == "documents":
            options["mask_fn"] = lambda b, h, qi, ki: ids[b, qi] == ids[b, ki]
        return masked_attention_via_map(q, k, v, **options)

    return attention


def _dense(mask: str, implementation: str) -> Callable[..., jax.Array]:
    def attention(q, k, v, ids):
        options: dict[str, Any] = {"implementation": implementation}
        if mask == "causal":
            options["is_causal"] = True
        elif mask == "window":
            options["local_window_size"] = WINDOW
        elif mask == "documents":
            options["mask"] = (ids[:, :, None] == ids[:, None, :])[:, None]
        return jax.nn.dot_product_attention(q, k, v, **options)

    return attention


def _program(attention: Callable[..., jax.Array], mode: str) -> Callable[..., Any]:
    if mode == "fwd":
        return jax.jit(attention)

    def loss(q, k, v, ids):
        return jnp.sum(attention(q, k, v, ids).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


# ---------------------------------------------------------------------------- helpers


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _compiled(fn: Callable[..., Any], inputs: tuple[jax.Array, ...]) -> Any:
    return fn.lower(*inputs).compile()  # type: ignore[attr-defined]


def _needed_bytes(compiled: Any) -> int:
    stats = compiled.memory_analysis()
    if stats is None:
        return 0
    return int(stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes)


def _temp_bytes(compiled: Any) -> int | None:
    stats = compiled.memory_analysis()
    return None if stats is None else int(stats.temp_size_in_bytes)


def _run(compiled: Any, inputs: tuple[jax.Array, ...]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    return time.perf_counter() - start


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf")
        else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
    }


# ------------------------------------------------------------------------ measurement


def measure_times(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    columns = ["ours", "xla"] + (["cudnn"] if _cudnn_column(args) else [])
    for length in args.lengths:
        inputs = _inputs(args, length)
        for mask in args.masks:
            for mode in args.modes:
                compiled: dict[str, Any] = {}
                skipped: dict[str, str] = {}
                programs = {"ours": _program(_ours(mask, args.impl), mode)}
                for impl in columns[1:]:
                    programs[impl] = _program(_dense(mask, impl), mode)
                for name, program in programs.items():
                    if name == "xla" and length > args.max_dense_length:
                        skipped[name] = f"not run above L={args.max_dense_length}"
                        continue
                    try:
                        candidate = _compiled(program, inputs)
                    except Exception as err:  # e.g. cuDNN rejects the configuration
                        skipped[name] = f"does not compile: {type(err).__name__}"
                        continue
                    if _needed_bytes(candidate) > 0.7 * _available_memory():
                        skipped[name] = "does not fit in memory"
                        continue
                    compiled[name] = candidate
                    _run(candidate, inputs)  # warm-up
                times: dict[str, list[float]] = {name: [] for name in compiled}
                for _ in range(args.repeats):
                    for name, program in compiled.items():
                        time.sleep(args.settle)
                        times[name].append(_run(program, inputs))
                row: dict[str, Any] = {"mask": mask, "mode": mode, "length": length}
                for name in columns:
                    row[f"{name}_s"] = statistics.median(times[name]) if name in times else None
                    if name in skipped:
                        row[f"{name}_note"] = skipped[name]
                if row["xla_s"]:
                    row["ratio"] = row["ours_s"] / row["xla_s"]
                rows.append(row)
                print(_time_line(row), flush=True)
    return rows


def measure_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for length in args.memory_lengths:
        spec = jax.ShapeDtypeStruct((args.batch, length, args.heads, args.dim), args.dtype)
        ids = jax.ShapeDtypeStruct((args.batch, length), jnp.int32)
        inputs = (spec, spec, spec, ids)
        for mask in args.masks:
            row: dict[str, Any] = {"mask": mask, "length": length}
            pairs = (("ours", _ours(mask, args.impl)), ("xla", _dense(mask, "xla")))
            for name, attention in pairs:
                for mode in MODES:
                    compiled = _compiled(_program(attention, mode), inputs)  # type: ignore[arg-type]
                    row[f"{name}_{mode}_bytes"] = _temp_bytes(compiled)
            rows.append(row)
            print(_memory_line(row), flush=True)
    return rows


# ---------------------------------------------------------------------------- reports


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.1f}"


def _mib(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**20:,.1f}"


def _time_line(row: dict[str, Any]) -> str:
    ratio = f"{row['ratio']:.3f}" if row.get("ratio") else row.get("xla_note", "-")
    return (
        f"{row['mask']:>9} {row['mode']:>7} L={row['length']:>6}: ours {_ms(row['ours_s'])} ms, "
        f"xla {_ms(row['xla_s'])} ms, ratio {ratio}"
        + (f", cudnn {_ms(row['cudnn_s'])} ms" if row.get("cudnn_s") else "")
    )


def _memory_line(row: dict[str, Any]) -> str:
    return (
        f"{row['mask']:>9} L={row['length']:>6}: temp MiB fwd ours {_mib(row['ours_fwd_bytes'])}"
        f" / xla {_mib(row['xla_fwd_bytes'])}, grad ours {_mib(row['ours_fwd+bwd_bytes'])}"
        f" / xla {_mib(row['xla_fwd+bwd_bytes'])}"
    )


def _cudnn_column(args: argparse.Namespace) -> bool:
    """Time jax.nn's cuDNN path too: asked for, or a GPU with half-precision inputs."""
    half = args.dtype in ("bfloat16", "float16")
    return args.impl == "cudnn" or (jax.default_backend() == "gpu" and half)


def markdown(args: argparse.Namespace, machine: dict, times: list, memory: list) -> str:
    cudnn = _cudnn_column(args)
    lines = [
        "# Block attention benchmark",
        "",
        f"`python benchmarks/attention.py {' '.join(args.argv)}`".replace(" `", "`"),
        "",
        f"- Machine: {machine['cpu']}, {machine['cpu_count']} cores, "
        f"{machine['memory_gib']} GiB; {machine['platform']}",
        f"- jax {machine['jax']}, backend {machine['backend']} ({machine['device']}), "
        f"Python {machine['python']}; {machine['date']}",
        f"- B={args.batch}, H={args.heads}, d={args.dim}, {args.dtype}; median of "
        f"{args.repeats} alternating runs after a warm-up, {args.settle} s pause before "
        f"each; default block sizes; ours = `masked_attention_via_map(implementation="
        f"{'None' if args.impl == 'auto' else repr(args.impl)})`; {args.documents} documents.",
        '- Reference: `jax.nn.dot_product_attention(implementation="xla")` with the same '
        "mask; ratio = ours / XLA (below 1: ours is faster).",
        "",
        "## Time (ms)",
        "",
        "| mask | pass | L | ours | XLA | ratio |" + (" cuDNN |" if cudnn else ""),
        "|---|---|---:|---:|---:|---:|" + ("---:|" if cudnn else ""),
    ]
    for row in times:
        ratio = f"{row['ratio']:.3f}" if row.get("ratio") else row.get("xla_note", "-")
        line = (
            f"| {row['mask']} | {row['mode']} | {row['length']} | {_ms(row['ours_s'])} | "
            f"{_ms(row['xla_s'])} | {ratio} |"
        )
        if cudnn:
            cell = _ms(row["cudnn_s"]) if row.get("cudnn_s") else row.get("cudnn_note", "-")
            line += f" {cell} |"
        lines.append(line)
    lines += [
        "",
        "## Compiled temporary memory (MiB)",
        "",
        "XLA's `memory_analysis().temp_size_in_bytes`: scratch memory beyond inputs and "
        "outputs. One float32 `L x L x H` score matrix is "
        + ", ".join(
            f"{_mib(length * length * args.heads * 4)} MiB at L={length}"
            for length in args.memory_lengths
        )
        + ".",
        "",
        "| mask | L | ours fwd | XLA fwd | ours grad | XLA grad |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in memory:
        lines.append(
            f"| {row['mask']} | {row['length']} | {_mib(row['ours_fwd_bytes'])} | "
            f"{_mib(row['xla_fwd_bytes'])} | {_mib(row['ours_fwd+bwd_bytes'])} | "
            f"{_mib(row['xla_fwd+bwd_bytes'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(args: argparse.Namespace, times: list, memory: list, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = [m for m in MASKS if m in args.masks]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = dict(zip(masks, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, mode in zip(axes[:2], MODES, strict=True):
        for mask in masks:
            rows = [r for r in times if r["mask"] == mask and r["mode"] == mode]
            if not rows:
                continue
            lengths = [r["length"] for r in rows]
            ax.plot(
                lengths, [r["ours_s"] for r in rows], "o-", color=colors[mask], label=f"ours {mask}"
            )
            dense = [(r["length"], r["xla_s"]) for r in rows if r["xla_s"]]
            if dense:
                ax.plot(*zip(*dense, strict=True), "x--", color=colors[mask], label=f"XLA {mask}")
        ax.set(xscale="log", yscale="log", xlabel="sequence length L", ylabel="seconds")
        ax.set_title(f"time, {mode}")
        ax.set_xticks(args.lengths, [str(n) for n in args.lengths])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[2]
    for mask in masks:
        rows = [r for r in memory if r["mask"] == mask]
        if not rows:
            continue
        lengths = [r["length"] for r in rows]
        ax.plot(
            lengths,
            [r["ours_fwd+bwd_bytes"] / 2**20 for r in rows],
            "o-",
            color=colors[mask],
            label=f"ours {mask}",
        )
        ax.plot(
            lengths,
            [r["xla_fwd+bwd_bytes"] / 2**20 for r in rows],
            "x--",
            color=colors[mask],
            label=f"XLA {mask}",
        )
    ax.set(xscale="log", yscale="log", xlabel="sequence length L", ylabel="MiB")
    ax.set_title("compiled temp memory, gradient")
    ax.set_xticks(args.memory_lengths, [str(n) for n in args.memory_lengths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    axes[2].legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"masked_attention_via_map vs jax.nn.dot_product_attention (XLA), "
        f"B={args.batch} H={args.heads} d={args.dim} {args.dtype}, {jax.default_backend()}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="L up to 4096, memory at 4096 only")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths to time")
    parser.add_argument("--memory-lengths", type=int, nargs="+", help="lengths for memory")
    parser.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--impl",
        choices=["xla", "pallas", "cudnn", "auto"],
        default="xla",
        help="backend of ours (implementation=, auto: None); on a GPU with half-precision "
        "inputs jax.nn's cuDNN implementation is timed as a third column",
    )
    parser.add_argument("--documents", type=int, default=DOCUMENTS, help="packed documents")
    parser.add_argument("--name", help="output file stem (default attention_<backend>)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per implementation")
    parser.add_argument(
        "--max-dense-length",
        type=int,
        default=8192,
        help="longest L at which the dense reference is timed (at 16384 it takes about "
        "5 minutes per mask on 2 cores and most of 24 GiB for the gradient)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=0.25,
        help="seconds to wait before every timed run: right after the dense version frees "
        "gigabytes, the next run on a virtual machine is slowed while the memory is "
        "reclaimed; the pause applies to both columns alike",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    if args.lengths is None:
        args.lengths = [1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    if args.memory_lengths is None:
        args.memory_lengths = [4096] if args.quick else [4096, 8192, 16384]
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = _machine()
    print(
        f"{machine['cpu']} ({machine['cpu_count']} cores), jax {machine['jax']}, "
        f"backend {machine['backend']}",
        flush=True,
    )
    times = measure_times(args)
    memory = measure_memory(args)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / (args.name or f"attention_{jax.default_backend()}")
    report = markdown(args, machine, times, memory)
    stem.with_suffix(".md").write_text(report)
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "argv")}
    stem.with_suffix(".json").write_text(
        json.dumps(
            {"machine": machine, "settings": settings, "times": times, "memory": memory},
            indent=2,
            default=str,
        )
    )
    print()
    print(report)
    if not args.no_plot:
        plot(args, times, memory, stem.with_suffix(".png"))
        if args.output == RESULTS and jax.default_backend() == "cpu":
            DOCS_PLOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(stem.with_suffix(".png"), DOCS_PLOT)
        print(f"wrote {stem}.md, .json and .png")


if __name__ == "__main__":
    main()
