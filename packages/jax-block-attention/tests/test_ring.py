"""Ring attention (context parallelism) on 8 simulated CPU devices, against one device."""

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import (
    create_block_mask,
    from_zigzag,
    masked_attention_via_map,
    ring_attention,
    ring_block_counts,
    to_zigzag,
    zigzag_order,
)

# Shared by the subprocess checks: runs each configuration forward and backward through
# ring_attention on inputs in the given layout ("natural": the call without a layout
# argument), compares with masked_attention_via_map on the whole arrays, and checks the
# compiled program for collective permutes and no all-gather.
_CHECKS = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxmodules.attention import (
    create_block_mask, from_zigzag, masked_attention_via_map, ring_attention, to_zigzag,
)

assert len(jax.devices()) == 8
rng = np.random.default_rng(0)
B, L, H, HKV, D = 2, 64, 4, 2, 8
q = jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32)
k, v = (jnp.asarray(rng.standard_normal((B, L, HKV, D)), jnp.float32) for _ in "kv")
seg = jnp.asarray(np.sort(rng.integers(0, 3, (B, L)), axis=1), jnp.int32)


def prefix_lm(b, h, qp, kp):
    return (kp <= qp) | (kp < 8)


def alibi(s, b, h, qp, kp):
    return s - 0.1 * (h + 1) * jnp.abs(qp - kp)


def check(mesh, batch_axis, ring_kw, ref_kw=None, layout="zigzag", lse=False):
    ref_kw = dict(ring_kw) if ref_kw is None else ref_kw
    seq_axis = mesh.axis_names[-1]
    n = mesh.shape[seq_axis]
    sharding = NamedSharding(mesh, P(batch_axis, seq_axis))
    order = (lambda x: to_zigzag(x, n)) if layout == "zigzag" else (lambda x: x)
    back = (lambda x: from_zigzag(x, n)) if layout == "zigzag" else (lambda x: x)
    back_lse = (lambda x: from_zigzag(x, n, axis=2)) if layout == "zigzag" else (lambda x: x)
    args = tuple(jax.device_put(order(x), sharding) for x in (q, k, v))
    extra = {}
    if "segment_ids" in ring_kw:
        extra["segment_ids"] = jax.device_put(order(seg), sharding)
    kw = {key: val for key, val in ring_kw.items() if key != "segment_ids"}
    if layout != "natural":
        kw["layout"] = layout

    def loss(attend, q, k, v, **call):
        out = attend(q, k, v, **call, return_lse=True)
        total = jnp.sum(out[0] * jnp.cos(out[0]))
        # The lse enters the loss (and its gradient) only where the test asks for it.
        return (total + jnp.sum(jnp.sin(out[1])) if lse else total), out

    def on_ring(q, k, v, **call):
        return ring_attention(
            q, k, v, mesh=mesh, seq_axis=seq_axis, batch_axis=batch_axis, **call
        )

    # Compiled once, then both run and read (a second .lower().compile() would recompile).
    step = jax.jit(
        jax.value_and_grad(
            lambda *a: loss(on_ring, *a, **kw, **extra), argnums=(0, 1, 2), has_aux=True
        )
    ).lower(*args).compile()
    (_, (out, got_lse)), grads = step(*args)
    (_, (expected, want_lse)), expected_grads = jax.value_and_grad(
        lambda *a: loss(masked_attention_via_map, *a, **ref_kw), (0, 1, 2), has_aux=True
    )(q, k, v)
    np.testing.assert_allclose(back(np.asarray(out)), expected, atol=2e-5)
    np.testing.assert_allclose(back_lse(np.asarray(got_lse)), want_lse, atol=2e-5)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(back(np.asarray(g)), e, atol=5e-5)
    hlo = step.as_text()
    assert "collective-permute" in hlo, "no collective permute in the compiled program"
    assert "all-gather" not in hlo, "the compiled program all-gathers"


def seg_mask(b, h, qp, kp):
    return seg[b, qp] == seg[b, kp]
"""


def _run(body: str) -> None:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    # Each ring step is an attention call: preparing only the CPU branch spares tracing
    # the GPU and TPU kernels once per step (test_registry checks the variable itself).
    env["JAXMODULES_ATTENTION_PLATFORMS"] = "cpu"
    script = _CHECKS + textwrap.dedent(body) + "\nprint('ok')\n"
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_ring_1d_mesh_default_axis_types():
    """8 devices on "seq" from jax.make_mesh's defaults (Explicit axes on new jax): causal
    GQA, unmasked, a mask_fn of global positions with segment ids (with lse), a block
    mask of the whole sequence; and 2 devices whose steps run the Pallas kernel."""
    _run(
        """
        mesh = jax.make_mesh((8,), ("seq",))
        check(mesh, None, dict(is_causal=True), lse=True)
        check(mesh, None, dict())
        check(
            mesh, None,
            dict(mask_fn=prefix_lm, segment_ids=seg),
            dict(mask_fn=lambda b, h, qp, kp: prefix_lm(b, h, qp, kp) & seg_mask(b, h, qp, kp)),
            lse=True,
        )
        # A block mask of the whole sequence: documents, causal, a left window.
        bm = create_block_mask(
            seg_mask, B, 1, L, L, is_causal=True, window_size=(20, None), block_size=8
        )
        check(mesh, None, dict(block_mask=bm))
        # The fused kernel in every step (interpret mode on CPU), on two devices.
        two = jax.make_mesh((2,), ("seq",), devices=jax.devices()[:2])
        check(
            two, None,
            dict(is_causal=True, implementation="pallas"),
            dict(is_causal=True),
            lse=True,
        )
        # Learnable slopes through the kernel's array gradients inside the ring's VJP.
        def slopes_loss(q, k, v, slopes, attend):
            def mod(s, b, h, qp, kp):
                return s - slopes[h] * jnp.abs(qp - kp)

            return jnp.sum(jnp.cos(attend(q, k, v, is_causal=True, score_mod=mod)))

        def on_ring(q, k, v, **kw):
            return ring_attention(
                q, k, v, mesh=two, seq_axis="seq", layout="zigzag", implementation="pallas", **kw
            )

        slopes = jnp.asarray([0.3, 0.1, 0.05, 0.02], jnp.float32)
        zig = tuple(
            jax.device_put(to_zigzag(x, 2), NamedSharding(two, P(None, "seq"))) for x in (q, k, v)
        )
        got = jax.jit(jax.grad(lambda *a: slopes_loss(*a, on_ring), argnums=(0, 1, 2, 3)))(
            *zig, slopes
        )
        want = jax.grad(
            lambda *a: slopes_loss(*a, masked_attention_via_map), argnums=(0, 1, 2, 3)
        )(q, k, v, slopes)
        for g, e in zip(got[:3], want[:3]):
            np.testing.assert_allclose(from_zigzag(np.asarray(g), 2), e, atol=5e-5)
        np.testing.assert_allclose(got[3], want[3], rtol=1e-4, atol=1e-4)
        """
    )


def test_ring_2d_mesh_auto_axis_types():
    """2 "data" x 4 "seq" with Auto axes: a window with score_mod on the unbalanced
    contiguous layout, causal with sinks and lse gradients on zigzag, causal documents
    in natural order (exchanged with their segment ids), and the gradient of an array
    score_mod closes over."""
    _run(
        """
        AxisType = getattr(jax.sharding, "AxisType", None)
        if AxisType is None:
            mesh = jax.make_mesh((2, 4), ("data", "seq"))
        else:
            mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AxisType.Auto,) * 2)
        check(mesh, "data", dict(window_size=(5, 3), score_mod=alibi), layout="contiguous")
        sinks = jnp.asarray([0.5, -1.0, 0.0, 2.0], jnp.float32)
        check(mesh, "data", dict(is_causal=True, sinks=sinks), lse=True)
        check(
            mesh, "data",
            dict(is_causal=True, segment_ids=seg),
            dict(is_causal=True, mask_fn=seg_mask),
            layout="natural",
        )

        # Learnable ALiBi slopes: score_mod closes over a traced array, whose gradient
        # each device accumulates over its steps (summed over the mesh).
        def loss(attend, q, k, v, slopes):
            def mod(s, b, h, qp, kp):
                return s - slopes[h] * jnp.abs(qp - kp)

            out = attend(q, k, v, is_causal=True, score_mod=mod)
            return jnp.sum(out * jnp.cos(out))

        def ring(q, k, v, **kw):
            return ring_attention(
                q, k, v, mesh=mesh, seq_axis="seq", batch_axis="data", layout="zigzag", **kw
            )

        slopes = jnp.asarray([0.3, 0.1, 0.05, 0.02], jnp.float32)
        sharding = NamedSharding(mesh, P("data", "seq"))
        args = tuple(jax.device_put(to_zigzag(x, 4), sharding) for x in (q, k, v))
        grads = jax.jit(jax.grad(lambda *a: loss(ring, *a), argnums=(0, 1, 2, 3)))(*args, slopes)
        expected = jax.grad(lambda *a: loss(masked_attention_via_map, *a), argnums=(0, 1, 2, 3))(
            q, k, v, slopes
        )
        for g, e in zip(grads[:3], expected[:3]):
            np.testing.assert_allclose(from_zigzag(np.asarray(g), 4), e, atol=5e-5)
        np.testing.assert_allclose(grads[3], expected[3], rtol=1e-4, atol=1e-4)
        """
    )


def test_ring_natural_order_user_call():
    """The call a user writes: inputs sharded along "sp" in their natural order and no
    layout argument, equal to masked_attention_via_map on the whole arrays, forward, lse
    and gradients, for each kind of mask. Causal calls and a one-sided window exchange
    chunks into the balanced order inside the call; the others run as they are. Also the
    exchange itself: which chunks each device holds after it, and back."""
    _run(
        """
        from jax.sharding import NamedSharding, PartitionSpec as P
        from jaxmodules.attention._ring._entry import _shard_map
        from jaxmodules.attention._ring._layout import balance, chunk_pair, unbalance

        mesh = jax.make_mesh((8,), ("sp",))
        sinks = jnp.asarray([0.5, -1.0, 0.0, 2.0], jnp.float32)
        bm = create_block_mask(
            seg_mask, B, 1, L, L, is_causal=True, window_size=(20, None), block_size=8
        )
        check(mesh, None, dict(), layout="natural")
        check(mesh, None, dict(is_causal=True), layout="natural", lse=True)
        check(mesh, None, dict(window_size=(6, 3)), layout="natural")
        check(mesh, None, dict(window_size=(None, 3), score_mod=alibi), layout="natural")
        check(
            mesh, None,
            dict(mask_fn=prefix_lm, segment_ids=seg),
            dict(mask_fn=lambda b, h, qp, kp: prefix_lm(b, h, qp, kp) & seg_mask(b, h, qp, kp)),
            layout="natural",
        )
        check(mesh, None, dict(block_mask=bm), layout="natural", lse=True)
        check(
            mesh, None, dict(is_causal=True, q_offset=16, sinks=sinks), layout="natural", lse=True
        )

        # The exchange: positions 0..L-1 in natural order, balanced, then back.
        n, chunk = 8, L // 16
        positions = jax.device_put(
            jnp.arange(L, dtype=jnp.int32)[None], NamedSharding(mesh, P(None, "sp"))
        )
        there = _shard_map(
            lambda x: balance(x, 1, "sp", n), mesh, P(None, "sp"), P(None, "sp")
        )(positions)
        # Device d holds the zigzag pair {d, 2n-1-d}, even chunk first.
        pairs = [sorted((d, 2 * n - 1 - d), key=lambda c: c % 2) for d in range(n)]
        want = np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for p in pairs for c in p])
        np.testing.assert_array_equal(np.asarray(there)[0], want)
        assert [list(chunk_pair(d, n, "balanced")) for d in range(n)] == pairs
        back = _shard_map(
            lambda x: unbalance(x, 1, "sp", n), mesh, P(None, "sp"), P(None, "sp")
        )(there)
        np.testing.assert_array_equal(np.asarray(back)[0], np.arange(L))
        """
    )


@pytest.mark.compat
def test_block_counts_balanced_by_zigzag():
    assert ring_block_counts(8) == [17] * 8
    assert ring_block_counts(8, layout="contiguous") == [4 * d + 3 for d in range(8)]
    assert sum(ring_block_counts(8)) == sum(ring_block_counts(8, layout="contiguous"))
    assert ring_block_counts(4, is_causal=False) == [16] * 4
    # Natural-order inputs run balanced where the work is uneven, as they are elsewhere.
    assert ring_block_counts(8, layout="natural") == ring_block_counts(8, layout="zigzag")
    both_sides = dict(is_causal=False, window_size=(6, 3), seq_len=64)
    assert ring_block_counts(4, **both_sides) == ring_block_counts(
        4, layout="contiguous", **both_sides
    )


@pytest.mark.compat
def test_zigzag_round_trip():
    x = jnp.arange(2 * 24).reshape(2, 24)
    z = to_zigzag(x, 3)
    assert z[0, :4].tolist() == [0, 1, 2, 3] and z[0, 4:8].tolist() == [20, 21, 22, 23]
    assert (from_zigzag(z, 3) == x).all()
    assert sorted(zigzag_order(24, 3).tolist()) == list(range(24))


@pytest.mark.compat
def test_one_device_mesh_matches():
    mesh = jax.make_mesh((1,), ("seq",))
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 16, 2, 8)), jnp.float32) for _ in "qkv")
    out, lse = ring_attention(q, k, v, mesh=mesh, seq_axis="seq", is_causal=True, return_lse=True)
    ref, ref_lse = masked_attention_via_map(q, k, v, is_causal=True, return_lse=True)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(block_mask=create_block_mask(None, 1, 1, 8, 8), is_causal=True),
            ValueError,
            "do not pass is_causal",
        ),
        (dict(bias=1.0), ValueError, "bias"),
        (dict(layout="striped"), ValueError, "layout"),
        (dict(seq_axis="time"), ValueError, "seq_axis"),
        (dict(q_offset=jnp.zeros((1,), jnp.int32)), TypeError, "q_offset"),
        (dict(frobnicate=1), TypeError, "frobnicate"),
        (dict(implementation="tpu"), ValueError, "implementation must be"),
    ],
)
@pytest.mark.compat
def test_errors(kwargs, error, match):
    mesh = jax.make_mesh((1,), ("seq",))
    q = jnp.zeros((1, 8, 2, 4))
    call = dict(mesh=mesh, seq_axis="seq") | kwargs
    with pytest.raises(error, match=match):
        ring_attention(q, q, q, **call)


@pytest.mark.compat
def test_length_not_divisible():
    mesh = jax.make_mesh((1,), ("seq",))
    q = jnp.zeros((1, 7, 2, 4))
    with pytest.raises(ValueError, match="multiple of 2"):
        ring_attention(q, q, q, mesh=mesh, seq_axis="seq")


_TWO_PROCESS = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2])
)
import jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxmodules.attention import masked_attention_via_map, ring_attention, to_zigzag, from_zigzag

assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
rng = np.random.default_rng(0)
q = rng.standard_normal((2, 32, 4, 8)).astype(np.float32)
k, v = (rng.standard_normal((2, 32, 2, 8)).astype(np.float32) for _ in "kv")
mesh = jax.make_mesh((2, 4), ("data", "seq"))
sharding = NamedSharding(mesh, P("data", "seq"))


def ref_loss(q, k, v):
    out = masked_attention_via_map(q, k, v, is_causal=True)
    return jnp.sum(out * jnp.cos(out)), out


(_, expected), expected_grads = jax.value_and_grad(ref_loss, (0, 1, 2), has_aux=True)(q, k, v)
# Natural order (chunks exchanged across the two processes inside the call) and zigzag.
for layout, order, back in (
    ("natural", lambda x: x, lambda x: x),
    ("zigzag", lambda x: np.asarray(to_zigzag(x, 4)), lambda x: from_zigzag(x, 4)),
):
    args = [
        jax.make_array_from_callback(x.shape, sharding, lambda i, x=x: x[i])
        for x in (order(y) for y in (q, k, v))
    ]

    def loss(q, k, v):
        out = ring_attention(
            q, k, v, mesh=mesh, seq_axis="seq", batch_axis="data", layout=layout, is_causal=True
        )
        return jnp.sum(out * jnp.cos(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
    out, *grads = (multihost_utils.process_allgather(x, tiled=True) for x in (out, *grads))
    np.testing.assert_allclose(back(out), expected, atol=2e-5)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(back(g), e, atol=5e-5)
print("ok", jax.process_index())
"""


# The two ways a jax build can lack gloo CPU collectives: no such config option (jax
# before they existed), or a jaxlib built without them. Any other failure is a failure.
_GLOO_MISSING = re.compile(
    r"Unrecognized config option: jax_cpu_collectives_implementation"
    r"|has no attribute 'make_gloo_tcp_collectives'"
)


@pytest.mark.compat
def test_two_processes_gloo():
    """2 processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives): a
    data x sequence sharded ring attention forward and gradients equal one process, on
    natural-order inputs (whose exchange crosses the processes) and on zigzag ones."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    # Each ring step is an attention call: preparing only the CPU branch spares tracing
    # the GPU and TPU kernels once per step (test_registry checks the variable itself).
    env["JAXMODULES_ATTENTION_PLATFORMS"] = "cpu"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TWO_PROCESS, str(port), str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    try:
        for proc in procs:
            results.append(proc.communicate(timeout=300))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for i, (proc, (stdout, stderr)) in enumerate(zip(procs, results, strict=True)):
        missing = [line for line in stderr.splitlines() if _GLOO_MISSING.search(line)]
        if proc.returncode != 0 and missing:
            pytest.skip(f"no gloo CPU collectives in jax {jax.__version__}: {missing[-1]}")
        assert proc.returncode == 0, stderr[-3000:]
        assert stdout.strip().endswith(f"ok {i}")
