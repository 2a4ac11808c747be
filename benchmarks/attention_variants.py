"""Cost of the attention variants, measured side by side in one process.

- ALiBi through ``score_mod``, ``logits_soft_cap``, ``sinks`` and attention dropout
  (rate 0.1) against plain causal attention (L=4096, H=4, d=64, forward and
  forward+backward). Dropout's budget: at most 1.3x forward, 1.4x forward+backward.
- A dense ``bias`` against ``jax.nn.dot_product_attention`` with the same bias.
- Decoding one query against a 32K cache with ``q_offset`` and ``is_causal`` against the
  same call with ``is_causal=False`` (the mask must not add a pass over the cache).

Every case is jitted, compiled and warmed up, then the cases of one group are timed
alternately and the median of the repeats is reported, with a short pause before each
run. Writes ``benchmarks/results/attention_variants.md``.

    python benchmarks/attention_variants.py
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxmodules.attention import masked_attention_via_map

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(groups: dict[str, dict[str, Callable[[], object]]], repeats: int) -> dict:
    medians = {}
    for group, cases in groups.items():
        for fn in cases.values():
            jax.block_until_ready(fn())
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(repeats):
            for name, fn in cases.items():
                time.sleep(0.2)
                start = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append(time.perf_counter() - start)
        medians[group] = {name: statistics.median(t) for name, t in times.items()}
    return medians


def _grad(attention: Callable[..., jax.Array]) -> Callable[..., object]:
    return jax.jit(jax.grad(lambda *a: jnp.sum(attention(*a)), argnums=(0, 1, 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--cache", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    length, heads, dim = args.length, 4, 64
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, v = (jax.random.normal(key, (1, length, heads, dim)) for key in keys[:3])
    bias = jax.random.normal(keys[3], (1, heads, length, length))
    slopes = 2.0 ** -jnp.arange(1, heads + 1, dtype=jnp.float32)
    sinks = jax.random.normal(keys[4], (heads,))
    dropout_rng = jax.random.key(1)

    def alibi(score, b, h, qi, ki):
        return score - slopes[h] * (qi - ki)

    variants: dict[str, Callable[..., jax.Array]] = {
        "causal": lambda q, k, v: masked_attention_via_map(q, k, v, is_causal=True),
        "ALiBi score_mod": lambda q, k, v: masked_attention_via_map(
            q, k, v, is_causal=True, score_mod=alibi
        ),
        "logits_soft_cap": lambda q, k, v: masked_attention_via_map(
            q, k, v, is_causal=True, logits_soft_cap=30.0
        ),
        "sinks": lambda q, k, v: masked_attention_via_map(q, k, v, is_causal=True, sinks=sinks),
        "dropout 0.1": lambda q, k, v: masked_attention_via_map(
            q, k, v, is_causal=True, dropout_rate=0.1, dropout_rng=dropout_rng
        ),
    }
    with_bias: dict[str, Callable[..., jax.Array]] = {
        "ours, dense bias": lambda q, k, v: masked_attention_via_map(
            q, k, v, is_causal=True, bias=bias
        ),
        "jax.nn, dense bias": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, bias, is_causal=True, implementation="xla"
        ),
    }
    groups: dict[str, dict[str, Callable[[], object]]] = {}
    for mode in ("fwd", "fwd+bwd"):
        for title, table in (("variants", variants), ("bias", with_bias)):
            compiled = {
                name: jax.jit(fn) if mode == "fwd" else _grad(fn) for name, fn in table.items()
            }
            groups[f"{title} {mode}"] = {
                name: functools.partial(f, q, k, v) for name, f in compiled.items()
            }
    cache_q = jax.random.normal(keys[0], (1, 1, heads, dim))
    cache_k, cache_v = (jax.random.normal(key, (1, args.cache, heads, dim)) for key in keys[1:3])
    offset = args.cache - 1
    decode = {
        "q_offset + is_causal": jax.jit(
            lambda q, k, v: masked_attention_via_map(q, k, v, is_causal=True, q_offset=offset)
        ),
        "is_causal=False": jax.jit(lambda q, k, v: masked_attention_via_map(q, k, v)),
    }
    groups["decode"] = {
        name: functools.partial(fn, cache_q, cache_k, cache_v) for name, fn in decode.items()
    }
    medians = _timed(groups, args.repeats)

    lines = [
        "# Attention variants",
        "",
        "`python benchmarks/attention_variants.py`",
        "",
        f"- jax {jax.__version__}, backend {jax.default_backend()}, Python "
        f"{platform.python_version()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- L={length}, H={heads}, d={dim}, B=1, float32, causal; decoding: 1 query, "
        f"{args.cache} cached keys; median of {args.repeats} alternating runs.",
        "",
        "| group | case | ms | ratio |",
        "|---|---|---:|---:|",
    ]
    for group, cases in medians.items():
        base = next(iter(cases.values())) if not group.startswith("bias") else None
        if group.startswith("bias"):
            base = cases["jax.nn, dense bias"]
        if group == "decode":
            base = cases["is_causal=False"]
        for name, seconds in cases.items():
            lines.append(f"| {group} | {name} | {seconds * 1e3:.1f} | {seconds / base:.3f} |")
    lines += [
        "",
        "Ratios: variants to plain causal; the dense bias to `jax.nn` with the same bias; "
        "decoding to the same call with `is_causal=False`.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "attention_variants.md").write_text(text)


if __name__ == "__main__":
    main()
