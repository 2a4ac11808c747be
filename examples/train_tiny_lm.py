"""Train a tiny character-level language model on the Book of Genesis.

The model (``tiny_lm.py`` beside this file) is a small decoder-only transformer whose
attention runs through ``jaxmodules.attention.masked_attention_via_map``, whose per-token
and per-head parts are written with ``jaxmodules.vectorize.fancy_vmap``, and whose jitted
training step reports what it did through ``jaxmodules.logstate.Log`` values in its state.

Run it with ``nox -s demo`` (installs everything it needs first) or, in an environment
that has the three packages, optax, tqdm and matplotlib:

    python examples/train_tiny_lm.py --help
    python examples/train_tiny_lm.py --steps 300 --out my-run

It prints a table of the named logs every ``--log-every`` steps, then a text sample,
and writes ``loss.png``, ``attention.png``, ``logs.csv`` and ``sample.txt`` to ``--out``.

``--context-parallel N`` splits every sequence over N devices: the attention runs as
``ring_attention`` over a mesh axis ``"seq"`` of size N. On a machine without N
accelerators the script asks XLA for N simulated CPU devices before jax starts.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def _context_parallel_arg(argv: Sequence[str]) -> int:
    """The value of ``--context-parallel`` in ``argv`` (1 when absent or malformed)."""
    for i, arg in enumerate(argv):
        value = None
        if arg == "--context-parallel" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--context-parallel="):
            value = arg.split("=", 1)[1]
        if value is not None:
            return int(value) if value.isdigit() else 1
    return 1


def _request_cpu_devices(count: int) -> None:
    """Ask XLA for ``count`` CPU devices. It reads the flag once, when jax's CPU backend
    starts, so this acts only before that; on GPUs or TPUs it changes nothing."""
    flag = "--xla_force_host_platform_device_count"
    if count > 1 and flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={count}".strip()


# Run as a script, this comes before jax is imported; imported (as the tests do), jax may
# already run, and then the devices it has are the devices there are.
if __name__ == "__main__":
    _request_cpu_devices(_context_parallel_arg(sys.argv[1:]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import tiny_lm  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402
from tqdm import tqdm  # noqa: E402

from jaxmodules.logstate import fetch_logs, named_logs  # noqa: E402

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402

DEFAULT_TEXT = Path(__file__).parent / "data" / "genesis.txt"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Train a tiny character-level transformer (block-wise attention, fancy_vmap, "
            "Log state) on a public-domain text and sample from it."
        )
    )
    option = parser.add_argument
    option("--steps", type=int, default=1000, help="training steps (default: %(default)s)")
    option("--batch-size", type=int, default=32, help="sequences per step (default: %(default)s)")
    option("--seq-len", type=int, default=64, help="characters per sequence (default: %(default)s)")
    option("--d-model", type=int, default=64, help="model width (default: %(default)s)")
    option("--heads", type=int, default=4, help="attention heads per layer (default: %(default)s)")
    option("--layers", type=int, default=2, help="transformer layers (default: %(default)s)")
    option(
        "--block-size",
        type=int,
        default=32,
        help="query and key block size of the attention (default: %(default)s)",
    )
    option("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    option(
        "--log-every", type=int, default=200, help="steps between log tables (default: %(default)s)"
    )
    option(
        "--context-parallel",
        type=int,
        default=1,
        metavar="N",
        help=(
            "split each sequence over N devices (ring attention over a mesh axis 'seq'); "
            "on CPU, N simulated devices (default: %(default)s)"
        ),
    )
    option("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    option(
        "--prompt",
        default="And God said",
        help="text the sample starts with; only characters of the text (default: %(default)r)",
    )
    option(
        "--sample-len", type=int, default=300, help="characters to generate (default: %(default)s)"
    )
    option(
        "--temperature", type=float, default=0.8, help="sampling temperature (default: %(default)s)"
    )
    option(
        "--text",
        type=Path,
        default=DEFAULT_TEXT,
        help="UTF-8 text file to train on (default: data/genesis.txt beside this script)",
    )
    option(
        "--out",
        type=Path,
        default=Path("demo-output"),
        help="folder for the pictures, logs and sample (default: ./%(default)s)",
    )
    args = parser.parse_args(argv)
    names = ("steps", "batch_size", "seq_len", "d_model", "heads", "layers", "block_size")
    for name in (*names, "context_parallel"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.log_every < 1 or args.sample_len < 0 or args.temperature <= 0:
        parser.error("--log-every must be >= 1, --sample-len >= 0 and --temperature > 0")
    if args.d_model % args.heads:
        parser.error(f"--d-model ({args.d_model}) must be a multiple of --heads ({args.heads})")
    if args.seq_len % (2 * args.context_parallel):
        parser.error(
            f"--seq-len ({args.seq_len}) must be a multiple of 2 x --context-parallel "
            f"({2 * args.context_parallel})"
        )
    return args


def context_parallel_mesh(n: int) -> Mesh | None:
    """A one-axis mesh ``("seq",)`` over the first ``n`` devices; None for ``n == 1``.

    Raises:
        SystemExit: fewer than ``n`` devices.
    """
    if n == 1:
        return None
    if jax.device_count() < n:
        raise SystemExit(
            f"--context-parallel {n} needs {n} devices, jax has {jax.device_count()} "
            f"({jax.devices()[0].platform}); on CPU run the script itself, which asks XLA "
            f"for {n} devices before jax starts, or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n}"
        )
    return Mesh(np.array(jax.devices()[:n]), ("seq",))


class CharData:
    """The text as character ids, split 90/10 into training and validation parts."""

    def __init__(self, text: str, seq_len: int):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        ids = np.array([self.index[c] for c in text], dtype=np.int32)
        split = int(0.9 * len(ids))
        self.train, self.valid = ids[:split], ids[split:]
        self.window = seq_len + 1  # inputs and the next-character targets
        if len(self.valid) <= self.window:
            raise SystemExit(f"the text is too short for --seq-len {seq_len}")

    def encode(self, text: str) -> np.ndarray:
        unknown = sorted(set(text) - set(self.chars))
        if unknown:
            raise SystemExit(f"the prompt has characters the text never uses: {unknown}")
        return np.array([self.index[c] for c in text], dtype=np.int32)

    def attention_example(self, length: int) -> str:
        """The start of the first whole line of the validation text."""
        text = self.decode(self.valid[: 4 * self.window].tolist())
        start = text.find("\n") + 1
        return text[start : start + length]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def batch(self, rng: np.random.Generator, batch_size: int, valid: bool = False) -> np.ndarray:
        ids = self.valid if valid else self.train
        starts = rng.integers(0, len(ids) - self.window, size=batch_size)
        return ids[starts[:, None] + np.arange(self.window)]


def format_table(step: int, logs: dict[str, float]) -> str:
    width = max(map(len, logs))
    rows = [f"step {step}", f"  {'name':<{width}}  value", f"  {'-' * width}  ----------"]
    rows += [f"  {name:<{width}}  {value:.4g}" for name, value in logs.items()]
    return "\n".join(rows)


def plot_loss(path: Path, train: list[tuple[int, float]], valid: list[tuple[int, float]]) -> None:
    steps, losses = np.array(train).T
    # Moving average over 20 steps to show the trend through the batch-to-batch noise.
    kernel = min(20, len(losses))
    smooth = np.convolve(losses, np.ones(kernel) / kernel, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label="training (per step)")
    ax.plot(steps[kernel - 1 :], smooth, color="tab:blue", lw=2, label="training (mean of 20)")
    if valid:
        ax.plot(*np.array(valid).T, "o-", color="tab:orange", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.set_title("Tiny character-level transformer on Genesis")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Spaces and line ends get visible, narrow stand-ins in the tick labels.
_SHOWN = {" ": "·", "\n": "↵"}


def plot_attention(path: Path, weights: list[np.ndarray], text: str) -> None:
    """One heat map per layer and head: weights[layer] is (heads, L, L) for ``text``."""
    layers, heads = len(weights), weights[0].shape[0]
    # Big enough for one upright 9-point character per row and column.
    side = max(2.8, 0.13 * len(text))
    fig, axes = plt.subplots(
        layers, heads, figsize=(side * heads + 1.2, side * layers + 1.2), squeeze=False
    )
    labels = [_SHOWN.get(c, c) for c in text]
    ticks = np.arange(len(text))
    font = {"fontsize": 9, "fontfamily": "monospace", "rotation": 0}
    for layer, row in enumerate(axes):
        for head, ax in enumerate(row):
            # A square-root colour scale keeps the many small weights visible.
            image = ax.imshow(weights[layer][head], cmap="magma", norm=PowerNorm(0.5, 0.0, 1.0))
            ax.set_title(f"layer {layer}, head {head}", fontsize=11)
            # Characters on the outer edges only: one row of labels is enough to read.
            if layer == layers - 1:
                ax.set_xticks(ticks, labels, ha="center", **font)
                ax.set_xlabel("key character", fontsize=10)
            else:
                ax.set_xticks([])
            if head == 0:
                ax.set_yticks(ticks, labels, va="center", **font)
                ax.set_ylabel("query character", fontsize=10)
            else:
                ax.set_yticks([])
            ax.tick_params(length=0, pad=2)
    fig.subplots_adjust(left=0.05, right=0.9, bottom=0.08, top=0.88, wspace=0.1, hspace=0.18)
    fig.colorbar(image, cax=fig.add_axes((0.92, 0.2, 0.012, 0.55)), label="attention weight")
    fig.suptitle(
        "Attention weights after training: each row is a query character, each column a "
        f"key it may attend to (· is a space)\n{text!r}",
        fontsize=12,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    data = CharData(args.text.read_text(encoding="utf-8"), args.seq_len)
    prompt = data.encode(args.prompt)
    config = tiny_lm.Config(
        vocab_size=len(data.chars),
        seq_len=args.seq_len,
        d_model=args.d_model,
        n_heads=args.heads,
        n_layers=args.layers,
        block_size=args.block_size,
        learning_rate=args.lr,
        warmup_steps=min(50, args.steps // 10),
        total_steps=args.steps,
    )
    mesh = context_parallel_mesh(args.context_parallel)
    rng = np.random.default_rng(args.seed)
    state = tiny_lm.init_state(config, jax.random.key(args.seed))
    if mesh is not None:
        # Training uses ring attention over the mesh; the state is replicated on it.
        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        train_config = dataclasses.replace(config, mesh=mesh)
    else:
        train_config = config
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(
        f"{args.text.name}: {len(data.train) + len(data.valid):,} characters, "
        f"{len(data.chars)} distinct; model: {n_params:,} parameters; "
        f"devices: {jax.devices()[0].platform} x{jax.device_count()}"
        + (f"; context parallel over {args.context_parallel}" if mesh is not None else "")
    )

    # Donating the state lets XLA update parameters and optimizer moments in place.
    train_step = jax.jit(tiny_lm.make_train_step(train_config), donate_argnums=0)
    eval_loss = jax.jit(lambda params, batch: tiny_lm.loss_fn(params, batch, train_config)[0])
    valid_batches = [data.batch(rng, args.batch_size, valid=True) for _ in range(4)]

    def validation_loss() -> float:
        return float(np.mean([eval_loss(state.params, b) for b in valid_batches]))

    train_curve: list[tuple[int, float]] = []
    valid_curve: list[tuple[int, float]] = [(0, validation_loss())]
    table_rows: list[dict[str, float]] = []
    # A live bar on a terminal only: piped to a file, every redraw would be kept.
    progress = tqdm(
        range(1, args.steps + 1),
        desc="training",
        unit="step",
        disable=not sys.stderr.isatty(),
    )
    for step in progress:
        if step == 2:  # the first step includes tracing and compiling
            compiled_at = time.perf_counter()
        state = train_step(state, data.batch(rng, args.batch_size))
        # Reading the loss waits for the step; with a model this small that costs little.
        loss = float(named_logs(state)["loss"])
        train_curve.append((step, loss))
        progress.set_postfix(loss=f"{loss:.3f}")
        if step % args.log_every == 0 or step == args.steps:
            logs = {name: float(value) for name, value in fetch_logs(state).items()}
            logs["valid_loss"] = validation_loss()
            valid_curve.append((step, logs["valid_loss"]))
            table_rows.append({"step": step, **logs})
            progress.write(format_table(step, logs))
    progress.close()
    trained_at = time.perf_counter()

    generate = jax.jit(tiny_lm.generate, static_argnames=("config", "num_tokens", "temperature"))
    sample_ids = generate(
        state.params,
        jnp.asarray(prompt),
        jax.random.key(args.seed + 1),
        config=config,
        num_tokens=args.sample_len,
        temperature=args.temperature,
    )
    sample = data.decode(np.asarray(sample_ids).tolist())
    generated = sample[len(args.prompt) :]
    # The prompt ends at a mark the text never uses, so the two parts read apart.
    mark = next(m for m in ("»", "|", "#", "~") if m not in data.chars)
    about = (
        f"The prompt {args.prompt!r} ends at {mark!r}; the {len(generated)} characters after"
        f" it were generated (temperature {args.temperature})."
    )
    marked = f"{args.prompt}{mark}{generated}"
    print(f"\nSample. {about}\n" + "-" * 60 + f"\n{marked}\n" + "-" * 60)

    args.out.mkdir(parents=True, exist_ok=True)
    plot_loss(args.out / "loss.png", train_curve, valid_curve)
    shown = data.attention_example(min(32, args.seq_len))
    _, stats = jax.jit(
        lambda params, tokens: tiny_lm.forward(params, tokens, config, capture_weights=True)
    )(state.params, jnp.asarray(data.encode(shown))[None])
    weights = [np.asarray(layer["attn"]["weights"][0]) for layer in stats["layers"]]
    plot_attention(args.out / "attention.png", weights, shown)
    with open(args.out / "logs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table_rows[0]))
        writer.writeheader()
        writer.writerows(table_rows)
    (args.out / "sample.txt").write_text(f"{about}\n\n{marked}\n", encoding="utf-8")

    first, last = train_curve[0][1], np.mean([loss for _, loss in train_curve[-20:]])
    print(
        f"loss {first:.3f} -> {last:.3f} (mean of the last 20 steps; uniform guess: "
        f"{math.log(len(data.chars)):.3f}), validation {valid_curve[-1][1]:.3f}"
    )
    if args.steps > 1:
        print(
            f"time: {compiled_at - started:.0f} s to load and compile, "
            f"{args.steps - 1} steps in {trained_at - compiled_at:.0f} s, "
            f"{time.perf_counter() - started:.0f} s in all"
        )
    print(f"wrote loss.png, attention.png, logs.csv and sample.txt to {args.out.resolve()}")


if __name__ == "__main__":
    main()
