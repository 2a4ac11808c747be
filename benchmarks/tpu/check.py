"""The TPU check of the Mosaic TPU attention kernels, in parts of a few minutes each.

No TPU has been lent to this project yet: this script is prepared for the day one is.
On the TPU machine (its own ``python3`` with jax and libtpu), from the repository root::

    PYTHONPATH=packages/jax-block-attention/src:packages/jax-fancy-vmap/src:packages/jax-logstate/src python3 benchmarks/tpu/check.py --results "$OUT"

Each part runs in its own process with its own time limit; results are appended to
``attention_tpu_check.md`` in ``--results`` the moment they exist:

1. ``smoke`` (at most 3 min): every kernel (forward, dQ, dK/dV) compiled on the TPU on
   small inputs (B=1, H=4, L=512): d = 64, 128, 256 in bfloat16 and float32, causal;
   window, ALiBi ``score_mod``, GQA, dropout, equal packed documents (a ``mask_fn`` of
   positions), decoding, at d=128 bfloat16. Each reports compile time and the largest
   error (output and gradients) against dense attention in float32 at full precision.
2. ``benchmark`` (at most 4 min): bfloat16, B=2, H=16, d=128, L=16384: causal, and 16
   packed documents with causal masking inside each; forward and forward+backward of
   ``implementation="mosaic_tpu"`` against splash attention (``make_splash_mha``; its
   segment ids for the documents) and the XLA block loop (``implementation="xla"``).
   Targets: causal within 1.1x of splash; documents at least 3x faster than the loop.
3. ``tuning`` (at most 3 min): the causal forward+backward at L=16384 over block sizes.

``--parts`` picks some; ``--part-inline smoke --tiny`` runs the smoke part on tiny inputs
in interpret mode on any machine (to check the script itself).
"""  # noqa: E501

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PART_LIMITS = {"smoke": 180, "benchmark": 240, "tuning": 180}
LOG2 = "attention_tpu_check.md"


def _dense(
    q: Any, k: Any, v: Any, visible: Any, keep: Any = None, rate: float = 0.0, bias: Any = None
) -> Any:
    """Dense attention written from the definition, float32 at full precision."""
    import jax.numpy as jnp
    from jax import lax

    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=lax.Precision.HIGHEST)
    s = s / jnp.sqrt(jnp.float32(q.shape[-1]))
    if bias is not None:
        s = s + bias
    s = jnp.where(visible, s, -jnp.inf)
    p = jnp.exp(s - s.max(axis=-1, keepdims=True))
    p = jnp.where(visible, p, 0.0)
    p = p / jnp.maximum(p.sum(axis=-1, keepdims=True), 1e-30)
    if keep is not None:
        p = jnp.where(keep, p / (1.0 - rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v, precision=lax.Precision.HIGHEST)


def _smoke_cases(tiny: bool) -> list[tuple[str, int, str]]:
    if tiny:
        return [("causal", 64, "f32"), ("documents", 64, "f32"), ("dropout", 64, "f32")]
    cases = [("causal", d, dt) for d in (64, 128, 256) for dt in ("bf16", "f32")]
    names = ("window", "alibi", "gqa", "dropout", "documents", "decode")
    return cases + [(n, 128, "bf16") for n in names]


def _case(name: str, length: int) -> tuple[dict[str, Any], Callable[..., Any]]:
    """Keywords of ``masked_attention_via_map`` and the dense visibility ``(q, k)``."""
    import jax.numpy as jnp

    doc = max(length // 16, 1)
    causal = lambda q, k: k <= q  # noqa: E731
    if name == "window":
        return {"window_size": (128, 0)}, lambda q, k: (k <= q) & (q - k <= 128)
    if name == "documents":
        opts = {"is_causal": True, "mask_fn": lambda b, h, q, k: q // doc == k // doc}
        return opts, lambda q, k: (k <= q) & (q // doc == k // doc)
    if name == "alibi":

        def alibi(s: Any, b: Any, h: Any, q: Any, k: Any) -> Any:
            return s - jnp.exp2(-0.5 * (h + 1).astype(jnp.float32)) * jnp.abs(q - k)

        return {"is_causal": True, "score_mod": alibi}, causal
    return {"is_causal": True}, causal


def run_smoke(out: Path, tiny: bool) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxmodules.attention import dropout_keep_mask, masked_attention_via_map

    length, heads = (64, 2) if tiny else (512, 4)
    worst = 0
    for name, d, dtype in _smoke_cases(tiny):
        dt = {"bf16": jnp.bfloat16, "f32": jnp.float32}[dtype]
        q_len = 16 if name == "decode" else length
        kv_heads = 1 if name == "gqa" else heads
        keys = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(keys[0], (1, q_len, heads, d), dt)
        k = jax.random.normal(keys[1], (1, length, kv_heads, d), dt)
        v = jax.random.normal(keys[2], (1, length, kv_heads, d), dt)
        opts, see = _case(name, length)
        offset = length - q_len
        if name == "decode":
            opts["q_offset"] = offset
        rate, keep = 0.0, None
        if name == "dropout":
            rate, rng = 0.2, jax.random.key(3)
            opts.update(dropout_rate=rate, dropout_rng=rng)
            keep = dropout_keep_mask(rng, rate, (1, heads, q_len, length))
        qi = jnp.arange(q_len)[:, None] + offset
        visible = see(qi, jnp.arange(length)[None, :])[None, None]
        ct = jax.random.normal(keys[3], (1, q_len, heads, d), jnp.float32)

        bias = None
        if name == "alibi":  # the dense twin of the score_mod
            slopes = jnp.exp2(-0.5 * (jnp.arange(heads) + 1.0))[:, None, None]
            bias = -slopes * jnp.abs(qi - jnp.arange(length)[None, :])[None]

        def ours(q: Any, k: Any, v: Any, opts: dict = opts, ct: Any = ct) -> Any:
            o = masked_attention_via_map(q, k, v, implementation="mosaic_tpu", **opts)
            return jnp.sum(o.astype(jnp.float32) * ct)

        def dense(q: Any, k: Any, v: Any, extra: tuple = (visible, keep, rate, bias, ct)) -> Any:
            visible, keep, rate, bias, ct = extra
            return jnp.sum(_dense(q, k, v, visible, keep, rate, bias) * ct)

        start = time.perf_counter()
        try:
            got = jax.jit(jax.value_and_grad(ours, (0, 1, 2)))(q, k, v)
            jax.block_until_ready(got)
            seconds = time.perf_counter() - start
            want = jax.jit(jax.value_and_grad(dense, (0, 1, 2)))(q, k, v)
            errors = [
                float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
                / max(float(np.max(np.abs(np.asarray(b, np.float32)))), 1e-6)
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
            ]
            bound = 3e-2 if dtype == "bf16" else 1e-4
            ok = max(errors) <= bound
            worst += not ok
            line = (
                f"| {name} | {d} | {dtype} | {seconds:.1f} | {max(errors):.2e} "
                f"({'ok' if ok else 'OVER ' + str(bound)}) |"
            )
        except Exception as err:  # a finding, reported
            worst += 1
            line = f"| {name} | {d} | {dtype} | | **error**: {str(err).splitlines()[0][:150]} |"
        _append(out, line)
    return 1 if worst else 0


def _median(fn: Callable, *args: Any, repeats: int = 5) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _programs(length: int, name: str, block_size: Any = None) -> dict[str, Callable]:
    """Forward and forward+backward of ours, splash and the block loop, (B, L, H, d)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    from jaxmodules.attention import masked_attention_via_map

    heads, doc = 16, length // 16
    opts: dict[str, Any] = {"is_causal": True}
    if name == "documents":
        opts["mask_fn"] = lambda b, h, q, k: q // doc == k // doc
    if block_size is not None:
        opts["block_size"] = block_size
    mask = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(heads)])
    kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1)
    ids = jnp.arange(length, dtype=jnp.int32) // doc

    def splash_attend(q: Any, k: Any, v: Any) -> Any:
        scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
        qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in ((q * scale).astype(q.dtype), k, v))
        if name == "documents":
            seg = splash.SegmentIds(ids, ids)
            out = jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=seg))(qh, kh, vh)
        else:
            out = jax.vmap(kernel)(qh, kh, vh)
        return out.transpose(0, 2, 1, 3)

    def ours(impl: str) -> Callable:
        return lambda q, k, v: masked_attention_via_map(q, k, v, implementation=impl, **opts)

    attends = {"mosaic_tpu": ours("mosaic_tpu"), "splash": splash_attend, "xla": ours("xla")}
    programs = {}
    for label, attend in attends.items():
        programs[f"{label} fwd"] = jax.jit(attend)

        def loss(q: Any, k: Any, v: Any, attend: Callable = attend) -> Any:
            return attend(q, k, v).astype(jnp.float32).sum()

        programs[f"{label} fwd+bwd"] = jax.jit(jax.grad(loss, (0, 1, 2)))
    return programs


def _inputs(length: int) -> tuple:
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(1), 3)
    return tuple(jax.random.normal(k, (2, length, 16, 128), jnp.bfloat16) for k in keys)


def run_benchmark(out: Path, length: int = 16384) -> int:
    inputs = _inputs(length)
    for name in ("causal", "documents"):
        times = {}
        for label, program in _programs(length, name).items():
            try:
                times[label] = _median(program, *inputs)
                _append(out, f"| {name} | {label} | {times[label] * 1e3:.2f} ms |")
            except Exception as err:  # a finding, reported
                _append(out, f"| {name} | {label} | **error**: {str(err).splitlines()[0][:150]} |")
        for kind in ("fwd", "fwd+bwd"):
            ours, ref, loop = (times.get(f"{x} {kind}") for x in ("mosaic_tpu", "splash", "xla"))
            if ours and ref and loop:
                _append(
                    out,
                    f"| {name} | {kind}: mosaic_tpu / splash = {ours / ref:.2f}x, "
                    f"block loop / mosaic_tpu = {loop / ours:.2f}x | |",
                )
    return 0


def run_tuning(out: Path, length: int = 16384) -> int:
    inputs = _inputs(length)
    for blocks in ((256, 256), (256, 512), (512, 512), (512, 1024), (1024, 512), (1024, 1024)):
        program = _programs(length, "causal", blocks)["mosaic_tpu fwd+bwd"]
        try:
            _append(out, f"| tile {blocks} | fwd+bwd | {_median(program, *inputs) * 1e3:.2f} ms |")
        except Exception as err:  # a finding, reported
            _append(out, f"| tile {blocks} | **error**: {str(err).splitlines()[0][:150]} | |")
    return 0


def _append(out: Path, line: str) -> None:
    print(line, flush=True)
    with out.open("a") as f:
        f.write(line + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--parts", nargs="+", choices=list(PART_LIMITS), default=list(PART_LIMITS))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--strict", action="store_true", help="fail (status 1) without a TPU")
    parser.add_argument("--part-inline", choices=list(PART_LIMITS), help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / LOG2
    if args.part_inline:
        run = {"smoke": lambda: run_smoke(out, args.tiny), "benchmark": lambda: run_benchmark(out)}
        run["tuning"] = lambda: run_tuning(out)
        return run[args.part_inline]()
    import jax

    if jax.default_backend() != "tpu":
        print(f"no TPU here (jax.default_backend() is {jax.default_backend()!r}): nothing checked")
        return 1 if args.strict else 0
    _append(
        out,
        f"\n## {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}\n",
    )
    status = 0
    for part in args.parts:
        _append(out, f"\n### {part}\n")
        command = [sys.executable, __file__, "--part-inline", part, "--results", str(args.results)]
        try:
            status |= subprocess.run(command, timeout=PART_LIMITS[part], check=False).returncode
        except subprocess.TimeoutExpired:
            _append(out, f"{part}: over its {PART_LIMITS[part]} s limit")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
