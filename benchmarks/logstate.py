"""Cost of the logging machinery, measured side by side in one process.

1. Reading Logs out of a large state, relative to flattening it with jax. The state is a
   model-sized pytree: 100 blocks of 99 parameter arrays each and one `Log` per block,
   10,000 leaves in all. Each operation is timed many times and its median per call is
   compared with the median of `jax.tree_util.tree_leaves` on the same state.
2. `emit`/`collect` against hand-threaded `Log`s on the demo's jitted training step
   (`examples/tiny_lm.py`, the demo's default sizes): the demo's own step, whose layers
   emit their attention statistics, against the same step rebuilt here with the layers
   returning them as `Log`s. Both give the same state; the ratio of their step times
   should be 1 (at most 1.02), and their compiled programs the same size.

Run: python benchmarks/logstate.py   (writes benchmarks/results/logstate.txt; needs optax)
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import sys
import timeit
from collections import Counter, OrderedDict
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodules.logstate import (
    Log,
    fetch_logs,
    list_of_logs,
    map_logs,
    named_logs,
    reset_logs,
)

BLOCKS = 100
ARRAYS_PER_BLOCK = 99
REPEATS = 21
RESULTS = Path(__file__).parent / "results" / "logstate.txt"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STEP_CALLS = 10  # training steps per timed sample
STEP_ROUNDS = 31


def make_state() -> dict:
    rng = np.random.default_rng(0)
    host = rng.normal(size=(BLOCKS * ARRAYS_PER_BLOCK, 4)).astype(np.float32)
    arrays = iter(jax.device_put(list(host)))  # one batched transfer
    norms = iter(jax.device_put(list(rng.normal(size=BLOCKS).astype(np.float32))))
    blocks = []
    for _ in range(BLOCKS):
        attn = {f"w{j:02d}": next(arrays) for j in range(ARRAYS_PER_BLOCK // 2)}
        mlp = {f"w{j:02d}": next(arrays) for j in range(ARRAYS_PER_BLOCK - len(attn))}
        blocks.append({"attn": attn, "mlp": mlp, "stats": {"act_norm": Log(next(norms))}})
    return {"blocks": blocks}


class TrainState:
    """A plain (non-pytree) holder, like the one in the package README."""

    def __init__(self, state: dict) -> None:
        self.params = state["blocks"]
        self.step = 0


def measure(operations: dict[str, Callable[[], object]], number: int) -> dict[str, list[float]]:
    """Seconds per call, one sample per round; the operations take turns in every round,
    so a slow spell of a shared machine hits the baseline and the others alike."""
    samples: dict[str, list[float]] = {name: [] for name in operations}
    for _ in range(REPEATS):
        for name, fn in operations.items():
            samples[name].append(timeit.timeit(fn, number=number) / number)
    return samples


def machine_info() -> list[str]:
    device = jax.devices()[0]
    return [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"python: {sys.version.split()[0]} ({platform.python_implementation()})",
        f"platform: {platform.platform()}",
        f"processor: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
        f"jax {jax.__version__}, jaxlib {version('jaxlib')}, numpy {np.__version__}",
        f"device: {device.platform} ({device.device_kind})",
    ]


def threaded_train_step(tiny_lm: Any, config: Any) -> Callable[[Any, Any], Any]:
    """The demo's step with the per-layer statistics threaded out by hand as Logs.

    The same computation as ``tiny_lm.make_train_step``: the layer returns its two
    statistics instead of emitting them, the loss returns them as auxiliary output, and
    the state gets the same ``OrderedDict`` of named Logs that collect produces.
    """
    optimizer = tiny_lm.make_optimizer(config)
    schedule = tiny_lm.make_schedule(config)

    def loss_fn(params: Any, batch: Any) -> Any:
        tokens = batch[:, :-1]
        x = params["embed"][tokens] + params["pos"][: tokens.shape[1]]
        logs = OrderedDict()
        for i, layer in enumerate(params["layers"]):
            h = tiny_lm._rms_norm(x, layer["attn_norm"])
            q, k, v = jnp.einsum("bld,dthe->tblhe", h, layer["wqkv"])
            out = jnp.einsum("blhe,hed->bld", tiny_lm._attend(q, k, v, config), layer["wo"])
            block = min(config.block_size, q.shape[1])
            q0, k0, out0 = jax.lax.stop_gradient((q[:, :block], k[:, :block], out))
            first_block = tiny_lm.causal_attention_weights(q0, k0)
            name = f"model.layers.{i}.attn"
            logs[f"{name}.out_norm"] = jnp.mean(jnp.linalg.norm(out0, axis=-1))
            logs[f"{name}.entropy"] = jnp.mean(tiny_lm._entropy(first_block))
            x = x + out
            hidden = jax.nn.gelu(
                tiny_lm._rms_norm(x, layer["mlp_norm"]) @ layer["w_in"] + layer["b_in"]
            )
            x = x + hidden @ layer["w_out"] + layer["b_out"]
        logits = tiny_lm._rms_norm(x, params["final_norm"]) @ params["embed"].T
        loss = jnp.mean(tiny_lm.token_nll(logits, batch[:, 1:]))
        return loss, OrderedDict((n, Log(jax.lax.stop_gradient(v), n)) for n, v in logs.items())

    def train_step(state: Any, batch: Any) -> Any:
        (loss, model_logs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return tiny_lm.TrainState(
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            step=state.step + 1,
            loss=Log(loss),
            grad_norm=Log(tiny_lm.global_norm(grads)),
            learning_rate=Log(jnp.asarray(schedule(state.step), jnp.float32)),
            model=model_logs,
        )

    return train_step


def collect_overhead() -> list[str]:
    """collect against hand-threaded Logs on the demo's step; the table's lines."""
    sys.path.insert(0, str(EXAMPLES))
    import tiny_lm

    config = tiny_lm.Config(vocab_size=80)  # the demo's defaults; Genesis has ~70 characters
    batch_size = 32
    rng = np.random.default_rng(0)
    batches = [
        jnp.asarray(rng.integers(0, config.vocab_size, (batch_size, config.seq_len + 1)))
        for _ in range(STEP_CALLS)
    ]
    state = tiny_lm.init_state(config, jax.random.key(0))
    collected_name = "emit/collect (the demo's step)"
    steps = {
        "hand-threaded Logs": jax.jit(threaded_train_step(tiny_lm, config)),
        collected_name: jax.jit(tiny_lm.make_train_step(config)),
    }
    # Same state structure, same values: one compiled program each, nothing retraced.
    results = {name: step(state, batches[0]) for name, step in steps.items()}
    threaded, collected = results.values()
    if jax.tree.structure(threaded) != jax.tree.structure(collected):
        raise RuntimeError("the two steps return states of different structures")
    for a, b in zip(jax.tree.leaves(threaded), jax.tree.leaves(collected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    ops = {
        name: hlo_ops(step.lower(state, batches[0]).compile().as_text())
        for name, step in steps.items()
    }

    def run(step: Callable[[Any, Any], Any]) -> Callable[[], None]:
        def steps_() -> None:
            s = state
            for batch in batches:
                s = step(s, batch)
            jax.block_until_ready(s)

        return steps_

    samples = measure_abba(run(steps["hand-threaded Logs"]), run(steps[collected_name]))
    base = samples["hand-threaded Logs"]
    lines = [
        "",
        "emit/collect against hand-threaded Logs, the demo's jitted training step",
        f"config: {config.n_layers} layers, d_model {config.d_model}, {config.n_heads} heads, "
        f"batch {batch_size} x {config.seq_len} tokens; {STEP_CALLS} steps per sample, "
        f"medians of {STEP_ROUNDS} rounds, each timing both in the order A B B A",
        "(x threaded: median of the per-round ratios; HLO ops: instructions of the compiled",
        f"program; same operations, op for op: {ops['hand-threaded Logs'] == ops[collected_name]})",
        "",
        f"{'step':<34} {'ms per step':>12} {'x threaded':>11} {'HLO ops':>8}",
    ]
    for name, times in samples.items():
        ratio = statistics.median(t / b for t, b in zip(times, base, strict=True))
        per_step = statistics.median(times) / STEP_CALLS * 1e3
        n_ops = sum(ops[name].values())
        lines.append(f"{name:<34} {per_step:>12.3f} {ratio:>11.3f} {n_ops:>8}")
    return lines


def hlo_ops(hlo_text: str) -> Counter[str]:
    """How many instructions of each opcode a compiled program's HLO text holds."""
    found: Counter[str] = Counter()
    for line in hlo_text.splitlines():
        match = _HLO_INSTRUCTION.search(line)
        if match:
            found[match.group(1)] += 1
    return found


_HLO_INSTRUCTION = re.compile(r"= [^ ]+(?:\{[^}]*\})? ([a-z\-]+)\(")


def measure_abba(first: Callable[[], None], second: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per sample of two operations; each round runs them A B B A, so a drift of a
    shared machine's speed within a round hits both alike."""
    names = ["hand-threaded Logs", "emit/collect (the demo's step)"]
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(STEP_ROUNDS):
        a1 = timeit.timeit(first, number=1)
        b1 = timeit.timeit(second, number=1)
        b2 = timeit.timeit(second, number=1)
        a2 = timeit.timeit(first, number=1)
        samples[names[0]].append((a1 + a2) / 2)
        samples[names[1]].append((b1 + b2) / 2)
    return samples


def main() -> None:
    state = make_state()
    plain = TrainState(state)
    n_leaves = len(jax.tree_util.tree_leaves(state))
    n_logs = len(list_of_logs(state))
    if (n_leaves, n_logs) != (BLOCKS * (ARRAYS_PER_BLOCK + 1), BLOCKS):
        raise RuntimeError(f"unexpected state: {n_leaves} leaves, {n_logs} Logs")

    baseline = "jax.tree_util.tree_leaves(state)"
    operations: dict[str, Callable[[], object]] = {
        baseline: lambda: jax.tree_util.tree_leaves(state),
        "list_of_logs(state)": lambda: list_of_logs(state),
        "named_logs(state)": lambda: named_logs(state),
        "list_of_logs(plain TrainState)": lambda: list_of_logs(plain),
        "named_logs(plain TrainState)": lambda: named_logs(plain),
        "map_logs(lambda x: x, state)": lambda: map_logs(lambda x: x, state),
        "reset_logs(state)": lambda: reset_logs(state),
        "fetch_logs(state)": lambda: fetch_logs(state),
    }
    for fn in operations.values():
        fn()  # warm up: compile reset_logs's zeros, fill caches
    samples = measure(operations, number=5)
    base = samples[baseline]

    lines = [
        "jaxmodules.logstate: reading Logs out of a state",
        f"state: {n_leaves} leaves (jax.tree_util.tree_leaves), {n_logs} Logs; "
        f"medians of {REPEATS} interleaved rounds (ratio: median of the per-round ratios)",
        *machine_info(),
        "",
        f"{'operation':<44} {'median ms':>10} {'x tree_leaves':>14}",
    ]
    for name, times in samples.items():
        ratio = statistics.median(t / b for t, b in zip(times, base, strict=True))
        lines.append(f"{name:<44} {statistics.median(times) * 1e3:>10.3f} {ratio:>14.2f}")
    lines += collect_overhead()
    text = "\n".join(lines) + "\n"
    print(text, end="")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
