"""The three packages working together in a jitted transformer training step.

The model is ``examples/tiny_lm.py`` (loaded by ``conftest.py``): causal self-attention
through ``masked_attention_via_map``, per-token loss and per-head statistics through
``fancy_vmap``, and ``Log`` values in the training state. The references are a float64
NumPy forward pass written out below, ``jax.nn.dot_product_attention`` and single-device
execution.
"""

from __future__ import annotations

import csv
import math
import re
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmodules.logstate import Log, fetch_logs, list_of_logs, map_logs, named_logs, reset_logs

# Sizes chosen so that no parameter has an axis of the global batch size (20): any
# collective carrying a size-20 axis in the sharded program moves activations.
VOCAB, SEQ_LEN, PERIOD = 16, 30, 5
GLOBAL_BATCH, N_DEVICES = 20, 4


def make_config(tiny_lm: ModuleType, **overrides: Any) -> Any:
    settings: dict[str, Any] = dict(
        vocab_size=VOCAB,
        seq_len=SEQ_LEN,  # not a multiple of the block size, on purpose
        d_model=32,
        n_heads=4,
        n_layers=2,
        mlp_ratio=2,
        block_size=8,
        learning_rate=1e-2,
        warmup_steps=20,
        total_steps=150,
    )
    settings.update(overrides)
    return tiny_lm.Config(**settings)


def periodic_batch(rng: np.random.Generator, batch_size: int) -> np.ndarray:
    """Sequences that repeat a random pattern of PERIOD tokens: after the first period
    every token is a copy of the one PERIOD places back, which attention can learn."""
    pattern = rng.integers(0, VOCAB, size=(batch_size, PERIOD))
    reps = -(-(SEQ_LEN + 1) // PERIOD)
    return np.tile(pattern, (1, reps))[:, : SEQ_LEN + 1].astype(np.int32)


def expected_log_names(n_layers: int) -> set[str]:
    names = {"loss", "grad_norm", "learning_rate"}
    for i in range(n_layers):
        names |= {f"model.layers.{i}.attn.out_norm", f"model.layers.{i}.attn.entropy"}
    return names


# ----------------------------------------------------------------------------- reference


def _rms_norm(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference_loss_and_stats(params: Any, batch: np.ndarray, config: Any) -> dict[str, float]:
    """The model written out densely in float64 NumPy: loss and each layer's statistics."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens, targets = batch[:, :-1], batch[:, 1:]
    length = tokens.shape[1]
    causal = np.tril(np.ones((length, length), dtype=bool))
    block = min(config.block_size, length)
    x = p["embed"][tokens] + p["pos"][:length]
    out: dict[str, float] = {}
    for i, layer in enumerate(p["layers"]):
        q, k, v = np.einsum("bld,dthe->tblhe", _rms_norm(x, layer["attn_norm"]), layer["wqkv"])
        scores = np.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(q.shape[-1])
        weights = _softmax(np.where(causal, scores, -np.inf))
        attn = np.einsum("bhqk,bkhe->bqhe", weights, v)
        y = np.einsum("blhe,hed->bld", attn, layer["wo"])
        first = weights[:, :, :block, :block]
        plogp = np.where(first > 0, first * np.log(np.where(first > 0, first, 1.0)), 0.0)
        out[f"model.layers.{i}.attn.entropy"] = float(np.mean(-plogp.sum(-1)))
        out[f"model.layers.{i}.attn.out_norm"] = float(np.mean(np.linalg.norm(y, axis=-1)))
        x = x + y
        hidden = _gelu_tanh(_rms_norm(x, layer["mlp_norm"]) @ layer["w_in"] + layer["b_in"])
        x = x + hidden @ layer["w_out"] + layer["b_out"]
    logits = _rms_norm(x, p["final_norm"]) @ p["embed"].T
    top = logits.max(-1)
    logsumexp = top + np.log(np.exp(logits - top[..., None]).sum(-1))
    chosen = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    out["loss"] = float(np.mean(logsumexp - chosen))
    return out


def assert_trees_close(actual: Any, expected: Any, rtol: float, err_msg: str = "") -> None:
    """Leaf by leaf, elementwise, with an absolute floor scaled to each leaf's size."""
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
    actual_leaves = jax.tree.leaves(actual)
    assert len(actual_leaves) == len(paths_and_leaves)
    for (path, want), got in zip(paths_and_leaves, actual_leaves, strict=True):
        want, got = np.asarray(want), np.asarray(got)
        floor = rtol * float(np.max(np.abs(want), initial=0.0))
        np.testing.assert_allclose(
            got, want, rtol=rtol, atol=floor, err_msg=f"{err_msg} at {jax.tree_util.keystr(path)}"
        )


# ----------------------------------------------------------------------------- fixtures


class CountedStep:
    """The jitted training step of the test model, shared by the tests so it compiles
    once, counting how often jax traces it."""

    def __init__(self, tiny_lm: ModuleType, config: Any):
        self.traces = 0
        train_step = tiny_lm.make_train_step(config)

        def counted(state: Any, batch: jax.Array) -> Any:
            self.traces += 1
            return train_step(state, batch)

        self.jitted = jax.jit(counted)

    def __call__(self, state: Any, batch: Any) -> Any:
        return self.jitted(state, batch)


@pytest.fixture(scope="module")
def config(tiny_lm: ModuleType) -> Any:
    return make_config(tiny_lm)


@pytest.fixture(scope="module")
def step(tiny_lm: ModuleType, config: Any) -> CountedStep:
    return CountedStep(tiny_lm, config)


@pytest.fixture(scope="module")
def loss_and_grad(tiny_lm: ModuleType) -> Any:
    """``(params, batch, config) -> (loss, grads)``, jitted once per config."""
    return jax.jit(
        jax.value_and_grad(lambda params, batch, config: tiny_lm.loss_fn(params, batch, config)[0]),
        static_argnums=2,
    )


@pytest.fixture(scope="module")
def trained(tiny_lm: ModuleType, config: Any, step: CountedStep) -> dict[str, Any]:
    """A model trained on periodic sequences, with its per-step losses."""
    rng = np.random.default_rng(0)
    state = tiny_lm.init_state(config, jax.random.key(0))
    losses = []
    for _ in range(config.total_steps):
        state = step(state, periodic_batch(rng, GLOBAL_BATCH))
        losses.append(float(named_logs(state)["loss"]))
    return {"state": state, "losses": np.array(losses)}


# ----------------------------------------------------------------------------- tests


def test_loss_falls_well_below_its_start(trained: dict[str, Any]) -> None:
    losses = trained["losses"]
    # Untrained, the model is near the uniform guess; a model that copies the token
    # PERIOD places back is wrong only on the first period: 4 of 30 targets.
    assert abs(losses[0] - math.log(VOCAB)) < 0.3
    floor = (PERIOD - 1) / SEQ_LEN * math.log(VOCAB)
    final = losses[-20:].mean()
    assert final < 0.4 * losses[0], (losses[0], final)
    assert final < 1.5 * floor, (final, floor)


def test_sampling_continues_the_learned_pattern(
    tiny_lm: ModuleType, config: Any, trained: dict[str, Any]
) -> None:
    params = trained["state"].params
    prompts = periodic_batch(np.random.default_rng(1), 8)[:, : 2 * PERIOD]
    generate = jax.jit(tiny_lm.generate, static_argnames=("config", "num_tokens", "temperature"))
    new = 45  # runs past seq_len, so the context window slides
    hits = 0
    for i, prompt in enumerate(prompts):
        out = np.asarray(
            generate(
                params,
                jnp.asarray(prompt),
                jax.random.key(i),
                config=config,
                num_tokens=new,
                temperature=0.3,
            )
        )
        assert out.shape == (2 * PERIOD + new,)
        np.testing.assert_array_equal(out[: 2 * PERIOD], prompt)
        expected = np.resize(prompt[:PERIOD], out.size)
        hits += int(np.sum(out[2 * PERIOD :] == expected[2 * PERIOD :]))
    assert hits >= 0.9 * len(prompts) * new, hits


def test_named_logs_are_finite_and_match_a_float64_reference(
    tiny_lm: ModuleType, config: Any, step: CountedStep, loss_and_grad: Any
) -> None:
    rng = np.random.default_rng(2)
    state = step(tiny_lm.init_state(config, jax.random.key(2)), periodic_batch(rng, GLOBAL_BATCH))
    params_before, batch = state.params, periodic_batch(rng, GLOBAL_BATCH)
    state = step(state, batch)

    logs = fetch_logs(state)
    assert set(logs) == expected_log_names(config.n_layers)
    assert set(named_logs(state)) == set(logs)
    assert len(list_of_logs(state)) == len(logs)
    for name, value in logs.items():
        assert np.shape(value) == (), name
        assert np.isfinite(value), name

    reference = reference_loss_and_stats(params_before, batch, config)
    for name, want in reference.items():
        np.testing.assert_allclose(logs[name], want, rtol=1e-4, err_msg=name)
    _, grads = loss_and_grad(params_before, batch, make_config(tiny_lm, attention="dense"))
    grad_norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(logs["grad_norm"], grad_norm, rtol=1e-4)
    # Warm-up is linear from zero: the second step (index 1) uses peak / warmup_steps.
    np.testing.assert_allclose(
        logs["learning_rate"], config.learning_rate / config.warmup_steps, rtol=1e-6
    )


@pytest.mark.parametrize("sharpen", [1.0, 4.0], ids=["init-scale", "peaked-attention"])
def test_gradients_equal_those_with_dense_attention(
    tiny_lm: ModuleType, config: Any, loss_and_grad: Any, sharpen: float
) -> None:
    params = tiny_lm.init_params(config, jax.random.key(3))
    # Larger query/key weights give peaked attention, where errors would show most.
    qk_scale = jnp.array([sharpen, sharpen, 1.0])[:, None, None]
    params["layers"] = [{**layer, "wqkv": layer["wqkv"] * qk_scale} for layer in params["layers"]]
    batch = np.random.default_rng(3).integers(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN + 1))
    batch = jnp.asarray(batch, jnp.int32)

    loss, grads = loss_and_grad(params, batch, config)
    dense_loss, dense_grads = loss_and_grad(params, batch, make_config(tiny_lm, attention="dense"))
    np.testing.assert_allclose(loss, dense_loss, rtol=1e-5)
    assert_trees_close(grads, dense_grads, rtol=1e-4, err_msg="gradient")


def test_steps_inside_scan_stack_their_logs(
    tiny_lm: ModuleType, config: Any, step: CountedStep
) -> None:
    n_steps = 4
    rng = np.random.default_rng(4)
    batches = np.stack([periodic_batch(rng, GLOBAL_BATCH) for _ in range(n_steps)])
    state = tiny_lm.init_state(config, jax.random.key(4))
    train_step = tiny_lm.make_train_step(config)

    def body(state: Any, batch: jax.Array) -> tuple[Any, dict[str, Any]]:
        state = train_step(state, batch)
        # Emit the Log nodes themselves; scan stacks their contents.
        emitted = {
            "loss": state.loss,
            "grad_norm": state.grad_norm,
            "learning_rate": state.learning_rate,
            "model": state.model,
        }
        return state, emitted

    final, emitted = jax.jit(lambda s, b: jax.lax.scan(body, s, b))(state, batches)
    assert isinstance(emitted["loss"], Log)
    stacked = fetch_logs(emitted)
    assert set(stacked) == expected_log_names(config.n_layers)

    looped = state
    per_step = []
    for batch in batches:
        looped = step(looped, batch)
        per_step.append(fetch_logs(looped))
    for name, values in stacked.items():
        assert np.shape(values) == (n_steps,), name
        np.testing.assert_allclose(
            values, [logs[name] for logs in per_step], rtol=1e-5, atol=1e-7, err_msg=name
        )
    assert_trees_close(final.params, looped.params, rtol=1e-5, err_msg="params")


def test_reset_logs_keeps_the_compiled_step_and_none_forces_a_retrace(
    tiny_lm: ModuleType, config: Any, step: CountedStep
) -> None:
    batch = periodic_batch(np.random.default_rng(5), GLOBAL_BATCH)
    state = step(tiny_lm.init_state(config, jax.random.key(5)), batch)
    traces = step.traces
    reset = reset_logs(state)
    assert jax.tree.structure(reset) == jax.tree.structure(state)
    for name, value in fetch_logs(reset).items():
        assert np.all(np.asarray(value) == 0), name
    np.testing.assert_array_equal(reset.params["embed"], state.params["embed"])
    again = step(reset, batch)
    assert step.traces == traces
    assert jax.tree.structure(again) == jax.tree.structure(state)

    cleared = map_logs(lambda x: None, state)
    assert list_of_logs(cleared) == [None] * len(list_of_logs(state))
    step.jitted.lower(cleared, batch)  # tracing is enough to see it; no need to compile
    assert step.traces == traces + 1


_COLLECTIVE = re.compile(
    r"=\s*(?P<result>.*?)\s(?P<op>all-gather|all-reduce|all-to-all|collective-permute|"
    r"reduce-scatter)(?:-start)?\("
)


def collectives(hlo_text: str) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(op, result shapes) of every collective in compiled HLO text."""
    found = []
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if match:
            shapes = [
                tuple(int(d) for d in dims.split(",") if d)
                for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", match["result"])
            ]
            found.append((match["op"], shapes))
    return found


def test_the_collective_check_sees_a_gathered_batch() -> None:
    """The HLO check below can fail: a program that does gather a sharded batch trips it."""
    mesh = Mesh(np.array(jax.devices()[:N_DEVICES]), ("data",))
    activations = jax.device_put(
        jnp.ones((GLOBAL_BATCH, SEQ_LEN, 8)), NamedSharding(mesh, PartitionSpec("data"))
    )
    gather = jax.jit(lambda x: 2 * x, out_shardings=NamedSharding(mesh, PartitionSpec()))
    found = collectives(gather.lower(activations).compile().as_text())
    assert ("all-gather", [(GLOBAL_BATCH, SEQ_LEN, 8)]) in found, found


def test_batch_sharded_step_matches_one_device_without_gathering_activations(
    tiny_lm: ModuleType, config: Any, step: CountedStep
) -> None:
    assert jax.device_count() >= N_DEVICES, (
        "needs XLA_FLAGS=--xla_force_host_platform_device_count=4 set before jax starts"
    )
    state = tiny_lm.init_state(config, jax.random.key(6))
    batch = periodic_batch(np.random.default_rng(6), GLOBAL_BATCH)

    mesh = Mesh(np.array(jax.devices()[:N_DEVICES]), ("data",))
    sharded_state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    per_device = GLOBAL_BATCH // N_DEVICES
    assert sharded_batch.addressable_shards[0].data.shape == (per_device, SEQ_LEN + 1)

    compiled = step.jitted.lower(sharded_state, sharded_batch).compile()
    sharded = compiled(sharded_state, sharded_batch)
    single = step(state, batch)
    assert_trees_close(sharded.params, single.params, rtol=1e-5, err_msg="params")
    sharded_logs, single_logs = fetch_logs(sharded), fetch_logs(single)
    for name, value in single_logs.items():
        np.testing.assert_allclose(sharded_logs[name], value, rtol=1e-5, err_msg=name)

    found = collectives(compiled.as_text())
    # The gradients must be summed over devices: proof that the program is partitioned.
    assert any(op == "all-reduce" for op, _ in found), "no all-reduce: step not partitioned"
    moving_activations = [
        (op, shapes)
        for op, shapes in found
        if any(GLOBAL_BATCH in shape for shape in shapes)
        or (op == "all-gather" and any(math.prod(s) >= GLOBAL_BATCH * SEQ_LEN for s in shapes))
    ]
    assert not moving_activations, moving_activations


def test_demo_script_runs_end_to_end(train_tiny_lm: ModuleType, tmp_path: Any, capsys: Any) -> None:
    out = tmp_path / "run"
    train_tiny_lm.main(
        [
            *("--steps", "6", "--log-every", "3", "--batch-size", "4", "--seq-len", "16"),
            *("--d-model", "16", "--heads", "2", "--layers", "1", "--block-size", "8"),
            *("--sample-len", "12", "--prompt", "And God", "--out", str(out)),
        ]
    )
    plt = pytest.importorskip("matplotlib.pyplot")
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed

    with open(out / "logs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["step"]) for row in rows] == [3, 6]
    assert set(rows[0]) == {"step", "valid_loss"} | expected_log_names(1)
    for row in rows:
        assert all(np.isfinite(float(value)) for value in row.values())
    about, blank, sample = (out / "sample.txt").read_text(encoding="utf-8")[:-1].split("\n", 2)
    # The sample marks where the prompt ends, and the first line says with what.
    assert blank == "" and "'And God' ends at '»'" in about and "12 characters" in about
    assert sample.startswith("And God»") and len(sample) == len("And God»") + 12
    assert "ends at '»'" in printed
    for picture in ("loss.png", "attention.png"):
        pixels = plt.imread(out / picture)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.std() > 0, picture
