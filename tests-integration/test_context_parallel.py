"""The tiny LM's training step with data x sequence sharding, in one process and in two.

``examples/tiny_lm.py`` with a mesh in its configuration runs every attention layer as
``ring_attention`` over the mesh's ``"seq"`` axis and splits the batch over ``"data"``.
Here the same two training steps run on a ``data=2 x seq=4`` mesh of 8 CPU devices:

* in one process with 8 simulated devices, which also computes the gradients of the
  unsharded model (no mesh) as the reference;
* in two processes with 4 devices each, joined by ``jax.distributed`` (coordinator on
  127.0.0.1, CPU collectives through gloo), so the mesh spans both processes.

Each run is a subprocess (the device count is fixed when jax starts) that writes its
losses, gradients, parameters and what ``fetch_logs`` / ``named_logs`` gave to a file.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

_RUN = r"""
import importlib.util, json, sys
mode, out, examples = sys.argv[1], sys.argv[2], sys.argv[3]
import jax
if mode == "multi":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{sys.argv[4]}",
        num_processes=2,
        process_id=int(sys.argv[5]),
    )
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxmodules.logstate import fetch_logs, named_logs

spec = importlib.util.spec_from_file_location("tiny_lm", f"{examples}/tiny_lm.py")
tiny_lm = sys.modules["tiny_lm"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny_lm)

assert len(jax.devices()) == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "seq"))
replicated = NamedSharding(mesh, P())
plain = tiny_lm.Config(
    vocab_size=16, seq_len=16, d_model=16, n_heads=2, n_layers=1, mlp_ratio=2,
    block_size=4, learning_rate=1e-2, warmup_steps=1, total_steps=4,
)
config = tiny_lm.Config(**{**plain.__dict__, "mesh": mesh, "batch_axis": "data"})
rng = np.random.default_rng(0)
batches = [rng.integers(0, 16, (4, 17)).astype(np.int32) for _ in range(2)]


def global_batch(batch):
    # Every process holds the whole batch; each puts its own devices' part.
    sharding = NamedSharding(mesh, P("data"))
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])


def flat(tree):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


state = jax.jit(lambda: tiny_lm.init_state(config, jax.random.key(0)), out_shardings=replicated)()
grad = jax.jit(
    jax.grad(lambda params, batch: tiny_lm.loss_fn(params, batch, config)[0]),
    out_shardings=replicated,
)
arrays = {f"grad{k}": v for k, v in flat(grad(state.params, global_batch(batches[0]))).items()}
if mode == "single":
    reference = jax.grad(lambda params, batch: tiny_lm.loss_fn(params, batch, plain)[0])
    params = jax.device_get(state.params)
    arrays.update({f"ref{k}": v for k, v in flat(reference(params, batches[0])).items()})

step = jax.jit(tiny_lm.make_train_step(config))
report = {"process": jax.process_index(), "logs": []}
for batch in batches:
    state = step(state, global_batch(batch))
    report["logs"].append(fetch_logs(state))
arrays.update({f"params{k}": v for k, v in flat(state.params).items()})
loss = named_logs(state)["loss"]
report["named_logs_loss"] = {
    "type": type(loss).__name__,
    "devices": len(loss.sharding.device_set),
    "addressable_shards": len(loss.addressable_shards),
    "fully_addressable": loss.is_fully_addressable,
    "fully_replicated": loss.is_fully_replicated,
    "value": float(loss),
}
np.savez(f"{out}.npz", **arrays)
with open(f"{out}.json", "w") as f:
    json.dump(report, f)
print("ok", jax.process_index())
"""


# Words of the errors a jax without gloo CPU collectives gives (an unknown config option,
# a value outside its enum, a backend not built in): such a jax skips the test.
_MISSING_WORDS = ("not", "unknown", "unrecognized", "unsupported", "enum")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: list[str], devices: int) -> subprocess.Popen[str]:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=4", "")
    # Two training steps are nearly all compile time: cheaper LLVM code generation cuts it
    # by a quarter, and every run (the unsharded reference too) compiles the same way.
    cheap = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env["XLA_FLAGS"] = f"{flags} {cheap} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.Popen(
        [sys.executable, "-c", _RUN, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The one-process run and both processes of the two-process run, started together."""
    if not hasattr(jax, "distributed"):
        pytest.skip(f"jax {jax.__version__} has no jax.distributed")
    folder = tmp_path_factory.mktemp("context-parallel")
    port = str(_free_port())
    outs = {"single": folder / "single", "p0": folder / "p0", "p1": folder / "p1"}
    procs = {
        "single": _start(["single", str(outs["single"]), str(EXAMPLES)], 8),
        **{
            f"p{i}": _start(["multi", str(outs[f"p{i}"]), str(EXAMPLES), port, str(i)], 4)
            for i in range(2)
        },
    }
    results = {}
    try:
        for name, proc in procs.items():
            results[name] = proc.communicate(timeout=300)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for name, proc in procs.items():
        stderr = results[name][1]
        lines = stderr.lower().splitlines()
        missing = [
            line
            for line in lines
            if ("gloo" in line or "cpu_collectives" in line)
            and any(word in line for word in _MISSING_WORDS)
        ]
        if name != "single" and proc.returncode != 0 and missing:
            pytest.skip(f"gloo CPU collectives unavailable in jax {jax.__version__}: {missing[0]}")
        assert proc.returncode == 0, f"{name}:\n{stderr[-3000:]}"
    return {
        name: {
            "report": json.loads(out.with_suffix(".json").read_text()),
            "arrays": dict(np.load(out.with_suffix(".npz"))),
        }
        for name, out in outs.items()
    }


def _assert_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], key: str):
    names = sorted(n for n in expected if n.startswith(key))
    assert names and names == sorted(n for n in actual if n.startswith(key))
    for name in names:
        want = expected[name]
        floor = 1e-5 * float(np.max(np.abs(want), initial=0.0))
        np.testing.assert_allclose(actual[name], want, rtol=1e-5, atol=floor, err_msg=name)


def test_one_process_ring_gradients_equal_the_unsharded_model(runs: dict[str, Any]) -> None:
    arrays = runs["single"]["arrays"]
    grads = {n[len("grad") :]: v for n, v in arrays.items() if n.startswith("grad")}
    reference = {n[len("ref") :]: v for n, v in arrays.items() if n.startswith("ref")}
    _assert_close(grads, reference, "")


def test_two_processes_equal_one_process(runs: dict[str, Any]) -> None:
    single = runs["single"]
    for name in ("p0", "p1"):
        report = runs[name]["report"]
        assert report["process"] == int(name[1])
        for got, want in zip(report["logs"], single["report"]["logs"], strict=True):
            assert set(got) == set(want)
            for log, value in want.items():
                np.testing.assert_allclose(got[log], value, rtol=1e-5, atol=1e-7, err_msg=log)
        _assert_close(runs[name]["arrays"], single["arrays"], "grad")
        _assert_close(runs[name]["arrays"], single["arrays"], "params")


def test_logs_on_each_process(runs: dict[str, Any]) -> None:
    names = {"loss", "grad_norm", "learning_rate"} | {
        f"model.layers.{i}.attn.{stat}" for i in range(1) for stat in ("out_norm", "entropy")
    }
    p0, p1 = runs["p0"]["report"], runs["p1"]["report"]
    # fetch_logs: every process gets every log, as the same Python floats.
    assert p0["logs"] == p1["logs"]
    for logs in p0["logs"]:
        assert set(logs) == names and all(isinstance(v, float) for v in logs.values())
    # named_logs: each process gets the global array (on all 8 devices, 4 of them its
    # own), replicated, so it converts to a float without a collective.
    for report in (p0, p1):
        assert report["named_logs_loss"] == {
            "type": "ArrayImpl",
            "devices": 8,
            "addressable_shards": 4,
            "fully_addressable": False,
            "fully_replicated": True,
            "value": report["logs"][-1]["loss"],
        }
    # In one process all 8 devices are its own.
    single = runs["single"]["report"]["named_logs_loss"]
    assert single["addressable_shards"] == 8 and single["fully_addressable"]
