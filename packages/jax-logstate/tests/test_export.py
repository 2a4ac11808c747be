"""fetch_logs against NumPy, and write_tensorboard read back from the event file."""

import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.logstate import Log, fetch_logs, write_tensorboard


@pytest.fixture
def rng():
    return np.random.default_rng(5)


class TrainState:
    def __init__(self, rng):
        self.params = {"w": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)}
        self.loss = Log(jnp.asarray(rng.normal(), jnp.float32))
        self.tokens = Log(jnp.asarray(rng.integers(0, 1000), jnp.int32))
        self.finite = Log(jnp.asarray(rng.normal() > 0))
        self.half = Log(jnp.asarray(rng.normal(), jnp.bfloat16))
        self.acts = Log(
            {"hist": jnp.asarray(rng.normal(size=16), jnp.float32), "max": np.float32(4.5)}
        )
        self.grads = [Log(jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)), Log(None)]
        self.phase = Log(3, name="phase")


def test_fetch_logs_matches_numpy_and_uses_python_scalars(rng):
    state = TrainState(rng)
    got = fetch_logs(state)
    assert list(got) == [
        "loss",
        "tokens",
        "finite",
        "half",
        "acts.hist",
        "acts.max",
        "grads.0",
        "phase",
    ]
    for name, source in [
        ("loss", state.loss.data),
        ("tokens", state.tokens.data),
        ("finite", state.finite.data),
        ("half", state.half.data),
        ("acts.max", state.acts.data["max"]),
    ]:
        reference = np.asarray(source).item()
        assert type(got[name]) is type(reference) and got[name] == reference
    assert type(got["half"]) is float
    for name, source in [("acts.hist", state.acts.data["hist"]), ("grads.0", state.grads[0].data)]:
        assert isinstance(got[name], np.ndarray)
        np.testing.assert_array_equal(got[name], np.asarray(source))
    assert got["phase"] == 3 and type(got["phase"]) is int


def test_fetch_logs_transfers_once(rng, monkeypatch):
    calls = []
    real = jax.device_get

    def counting(x):
        calls.append(x)
        return real(x)

    monkeypatch.setattr(jax, "device_get", counting)
    fetch_logs(TrainState(rng))
    assert len(calls) == 1


def test_fetch_logs_of_a_scan_gives_arrays_over_steps(rng):
    xs = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
    _, logs = jax.lax.scan(lambda c, x: (c, {"sum": Log(x.sum())}), 0.0, xs)
    got = fetch_logs(logs, sep="/")
    assert list(got) == ["sum"] and got["sum"].shape == (6,)
    np.testing.assert_allclose(got["sum"], np.asarray(xs, np.float64).sum(1), rtol=1e-6)


def test_fetch_logs_refuses_traced_values():
    @jax.jit
    def f(x):
        fetch_logs({"x": Log(x)})
        return x

    with pytest.raises(TypeError, match="fetch_logs: the Log 'x' holds a traced value"):
        f(jnp.ones(2))


def test_fetch_logs_reports_names_that_collide_after_expansion():
    with pytest.raises(ValueError, match=r"both named 'a\.b'"):
        fetch_logs({"a": Log({"b": 1.0}), "z": Log(2.0, name="a.b")})


# --------------------------------------------------------------------------- TensorBoard


def masked_crc32c(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data) & 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_event_file(path):
    """Parse TFRecord framing (length, crc, payload, crc) into Event protos."""
    from tensorboardX.proto import event_pb2

    data, pos, events = path.read_bytes(), 0, []
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        payload = data[pos + 12 : pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert header_crc == masked_crc32c(header) and payload_crc == masked_crc32c(payload)
        event = event_pb2.Event()
        event.ParseFromString(payload)
        events.append(event)
        pos += 16 + length
    return events


def test_write_tensorboard_round_trips_through_the_event_file(rng, tmp_path):
    tensorboardX = pytest.importorskip("tensorboardX")
    writer = tensorboardX.SummaryWriter(logdir=str(tmp_path))
    written = {}
    for step in (1, 2):
        state = {
            "model": {"block": {"norm": Log(jnp.asarray(rng.normal(), jnp.float32))}},
            "loss": Log(jnp.asarray(rng.normal(), jnp.float32), name="loss"),
            "steps": Log(jnp.asarray(step * 10, jnp.int32)),
            "grads": Log(jnp.asarray(rng.normal(size=50), jnp.float32)),
            "empty": Log(jnp.zeros((0,))),
        }
        written[step] = write_tensorboard(writer, state, step, prefix="train/", sep="/")
    writer.close()

    (event_file,) = tmp_path.glob("events.out.tfevents.*")
    scalars, histograms = {}, {}
    for event in read_event_file(event_file):
        for value in event.summary.value:
            if value.HasField("histo"):
                histograms[(value.tag, event.step)] = value.histo
            else:
                scalars[(value.tag, event.step)] = value.simple_value
    for step, values in written.items():
        for name in ("model/block/norm", "loss", "steps"):
            expected = np.float32(values[name])
            assert scalars[(f"train/{name}", step)] == expected
        histo = histograms[("train/grads", step)]
        grads = values["grads"].astype(np.float64)
        assert histo.num == grads.size
        np.testing.assert_allclose([histo.min, histo.max], [grads.min(), grads.max()])
        np.testing.assert_allclose(histo.sum, grads.sum(), rtol=1e-6, atol=1e-9)
    assert len(scalars) == 6 and len(histograms) == 2  # the empty array was skipped


class RecordingWriter:
    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append(("scalar", tag, value, step))

    def add_histogram(self, tag, values, step):
        self.calls.append(("histogram", tag, values, step))


@pytest.mark.parametrize(
    ("state", "step", "kwargs", "match"),
    [
        ({"z": Log(1 + 2j)}, 0, {}, "'z' holds a complex"),
        ({"z": Log(jnp.ones(2, jnp.complex64))}, 0, {}, "complex64 array"),
        ({"a": Log(1.0)}, 1.5, {}, "step must be an int, got float"),
        ({"a": Log(1.0)}, 0, {"prefix": 3}, "prefix must be a str"),
    ],
)
def test_write_tensorboard_rejects_what_tensorboard_cannot_plot(state, step, kwargs, match):
    with pytest.raises(TypeError, match=match):
        write_tensorboard(RecordingWriter(), state, step, **kwargs)


def test_write_tensorboard_checks_every_value_before_writing_any():
    writer = RecordingWriter()
    state = {"a": Log(1.0), "b": Log(jnp.ones(3)), "z": Log(1 + 2j)}
    with pytest.raises(TypeError, match=r"'z' holds a complex; .* nothing was written"):
        write_tensorboard(writer, state, 0)
    assert writer.calls == []


def test_write_tensorboard_calls_the_writer_with_floats_and_arrays(rng):
    writer = RecordingWriter()
    hist = rng.integers(0, 5, size=7)
    write_tensorboard(writer, {"a": Log(True), "b": Log(hist), "c": Log(None)}, np.int64(4))
    assert [c[:2] for c in writer.calls] == [("scalar", "a"), ("histogram", "b")]
    assert writer.calls[0][2] == 1.0 and type(writer.calls[0][2]) is float
    np.testing.assert_array_equal(writer.calls[1][2], hist.astype(np.float64))
    assert all(c[3] == 4 and type(c[3]) is int for c in writer.calls)


@pytest.mark.parametrize("writer", [None, "runs/", object()])
def test_write_tensorboard_names_a_writer_that_is_not_one(writer):
    with pytest.raises(TypeError, match=r"write_tensorboard: writer must be a summary writer"):
        write_tensorboard(writer, {"loss": Log(0.5)}, step=0)
