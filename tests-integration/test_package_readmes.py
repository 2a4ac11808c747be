"""Each package's own README: its Python blocks run, against the installed packages, and
do what their text and comments say.

The package READMEs are what PyPI shows, so a block that no longer runs is a broken
front page. The blocks of one README run in order in one namespace, as a reader would
paste them. Services the logstate README sends values to (TensorBoard, Weights & Biases)
are replaced by recorders, so the calls into jaxmodules are the real ones.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import types
from pathlib import Path

import jax
import numpy as np

PACKAGES = Path(__file__).resolve().parents[1] / "packages"


def blocks(package: str, language: str = "python") -> list[str]:
    text = (PACKAGES / package / "README.md").read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def run(package: str) -> tuple[dict, list[str]]:
    """Run every Python block of a package README; return the namespace and printed lines."""
    found = blocks(package)
    assert found, f"{package}/README.md has no Python block"
    namespace: dict = {"__name__": f"readme_{package.replace('-', '_')}"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for number, code in enumerate(found):
            exec(compile(code, f"{package}/README.md block {number}", "exec"), namespace)
    return namespace, out.getvalue().splitlines()


def test_fancy_vmap_readme():
    _, lines = run("jax-fancy-vmap")
    assert lines[0] == "(5, 3, 4)"
    assert lines[1] == "(3, 4) True"
    # The error the README shows is the one the code raises, caret line included.
    assert blocks("jax-fancy-vmap", "text")[-1] in "\n".join(lines) + "\n"


def test_block_attention_readme():
    namespace, _ = run("jax-block-attention")
    Q, K, V = namespace["Q"], namespace["K"], namespace["V"]
    dense = jax.nn.dot_product_attention(Q, K, V, is_causal=True)
    np.testing.assert_allclose(namespace["out"], dense, atol=2e-5, rtol=2e-5)
    # window_size=(128, 0): key k is visible from query q iff q - 128 <= k <= q.
    position = np.arange(Q.shape[1])
    window = (position[None, :] <= position[:, None]) & (
        position[:, None] - 128 <= position[None, :]
    )
    local = jax.nn.dot_product_attention(Q, K, V, mask=window[None, None])
    np.testing.assert_allclose(namespace["local"], local, atol=2e-5, rtol=2e-5)
    grads = namespace["grads"]
    assert grads.shape == Q.shape and np.isfinite(np.asarray(grads)).all()
    # The FlexAttention port: causal attention in PyTorch's (B, H, L, E) layout.
    np.testing.assert_allclose(namespace["flex_out"], dense.swapaxes(1, 2), atol=2e-5, rtol=2e-5)


WRITERS: list[RecordingWriter] = []


class RecordingWriter:
    def __init__(self, logdir):
        self.logdir = logdir
        self.calls = []
        WRITERS.append(self)

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))

    def add_histogram(self, tag, values, step):
        self.calls.append((tag, values, step))


def test_logstate_readme(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    logged = []
    monkeypatch.setitem(
        sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=RecordingWriter)
    )
    monkeypatch.setitem(
        sys.modules,
        "wandb",
        types.SimpleNamespace(log=lambda values, step: logged.append((values, step))),
    )
    WRITERS.clear()
    namespace, lines = run("jax-logstate")

    names = ["loss", "stats.grad_norm", "stats.w_max"]
    assert [line.split(" ", 1)[0] for line in lines] == ["0", "25", "50", "75"]
    printed = [eval(line.split(" ", 1)[1]) for line in lines]  # dicts of Python floats
    assert all(list(values) == names for values in printed)
    assert printed[-1]["loss"] < printed[0]["loss"] / 10  # the model learns
    # The last reset left every Log at zero with its shape: what gets written is zeros.
    (writer,) = WRITERS
    assert writer.logdir == "runs/experiment"
    assert writer.calls == [
        ("train/loss", 0.0, 100),
        ("train/stats/grad_norm", 0.0, 100),
        ("train/stats/w_max", 0.0, 100),
    ]
    assert logged == [(dict.fromkeys(names, 0.0), 100)]
    np.testing.assert_allclose(namespace["state"].w, [1.0, -1.0, 2.0], atol=0.05)
    # The emit/collect block: one value per layer of the scan, as the comment says.
    logs = namespace["logs"]
    assert list(logs) == ["layers.act_rms"] and logs["layers.act_rms"].name == "layers.act_rms"
    h, expected = np.ones((8, 3)), []
    for scale in (0.5, 1.0, 2.0, 4.0):
        h = np.tanh(h * scale)
        expected.append(np.sqrt(np.mean(h**2)))
    np.testing.assert_allclose(logs["layers.act_rms"].data, expected, rtol=1e-5)
