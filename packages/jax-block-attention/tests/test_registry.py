"""The backends as plug-ins: the registry's names, the platform taken from the lowering
(a CUDA export from this CPU host holds the GPU kernel, the CPU lowering the block loop),
``explain_dispatch``, and prebuilt block masks re-planned for the kernel that runs them."""

from __future__ import annotations

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import (
    _platforms,
    _registry,
    create_block_mask,
    explain_dispatch,
    flex,
    masked_attention_via_map,
)

try:
    from jax.experimental.pallas import triton as _pl_triton  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the installed jax
    _NO_TRITON = f"this jax has no Pallas Triton backend ({err})"
else:
    _NO_TRITON = ""
needs_triton = pytest.mark.skipif(bool(_NO_TRITON), reason=_NO_TRITON)
TRITON_CALL = "__gpu$xla.gpu.triton"


def test_registry_names_and_order():
    names = [b.name for b in _registry.BACKENDS]
    assert sorted(names) == ["cudnn", "mosaic_gpu", "mosaic_tpu", "triton", "xla"]
    assert _registry.check_implementation("pallas") == "triton"
    assert [b.name for b in _registry.candidates("cuda")] == [
        "cudnn",
        "triton",
        "mosaic_gpu",
        "xla",
    ]
    assert [b.name for b in _registry.candidates("tpu")] == ["mosaic_tpu", "xla"]
    assert [b.name for b in _registry.candidates("cpu")] == ["xla"]
    with pytest.raises(ValueError, match=r"implementation must be None or one of 'cudnn'"):
        _registry.check_implementation("mosaic")
    with pytest.raises(TypeError, match="implementation must be None"):
        _registry.check_implementation(3)


def _abstract_gpu():
    """Where jax 0.12+ asks which GPU to lower Triton kernels for, an H100."""
    sharding = jax.sharding
    if not (hasattr(sharding, "AbstractDevice") and hasattr(sharding, "use_abstract_mesh")):
        return contextlib.nullcontext()
    try:
        device = sharding.AbstractDevice(
            device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
        )
        mesh = sharding.AbstractMesh((), (), abstract_device=device)
    except TypeError:
        return contextlib.nullcontext()
    return sharding.use_abstract_mesh(mesh)


def _cuda_text(fn, *args):
    from jax import export

    if not hasattr(export, "DisabledSafetyCheck"):
        pytest.skip("this jax.export cannot allow Triton custom calls")
    with _abstract_gpu(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The Pallas Triton backend", DeprecationWarning)
        exported = export.export(
            jax.jit(fn),
            platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
        )(*args)
    return exported.mlir_module()


@needs_triton
@pytest.mark.compat
def test_default_implementation_takes_the_platform_of_the_lowering(ref):
    if not _platforms.lowering_keeps_one_branch():
        pytest.skip("this jax lowers every platform_dependent branch: the default device decides")
    q, k, v = ref.qkv(3, 1, 96, 96, 2, 1, 32, dtype=jnp.bfloat16)

    def loss(q, k, v):
        out = masked_attention_via_map(q, k, v, is_causal=True, logits_soft_cap=20.0)
        return out.astype(jnp.float32).sum()

    grads = jax.value_and_grad(loss, argnums=(0, 1, 2))
    # Forward, dQ and dK/dV kernels for CUDA; none in the CPU program, which loops.
    cuda = _cuda_text(grads, q, k, v)
    assert cuda.count(TRITON_CALL) == 3
    cpu = jax.jit(grads).lower(q, k, v).as_text(debug_info=True)
    assert TRITON_CALL not in cpu and "stablehlo.while" in cpu
    assert "jaxmodules.attention/xla" in cpu
    # The CPU program computes the right thing.
    got = jax.jit(lambda q, k, v: masked_attention_via_map(q, k, v, is_causal=True))(q, k, v)
    mask = ref.mask_for((1, 96, 96, 2, 1, 32), {"is_causal": True})
    want = ref.attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2, rtol=2e-2)


def test_platforms_variable_narrows_the_traced_branches(ref, monkeypatch):
    """``$JAXMODULES_ATTENTION_PLATFORMS`` prepares only the named platforms' branches:
    the CPU program then holds no kernel of another platform, and computes the same."""
    if not _platforms.lowering_keeps_one_branch():
        pytest.skip("this jax lowers every platform_dependent branch: the default device decides")
    q, k, v = ref.qkv(4, 1, 64, 64, 2, 1, 16)

    def traced():  # a fresh function each time: jax reuses a function's cached trace
        def loss(q, k, v):
            return masked_attention_via_map(q, k, v, is_causal=True).sum()

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v)

    every = traced()
    monkeypatch.setenv(_platforms.PLATFORMS_VARIABLE, "cpu")
    only_cpu = traced()
    assert "pallas_call" in str(every.jaxpr) and "pallas_call" not in str(only_cpu.jaxpr)
    for got, want in zip(
        only_cpu.lower().compile()(q, k, v), every.lower().compile()(q, k, v), strict=True
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    monkeypatch.setenv(_platforms.PLATFORMS_VARIABLE, "cpu, gpu")
    with pytest.raises(ValueError, match=r"JAXMODULES_ATTENTION_PLATFORMS.*cpu, gpu"):
        traced()


@needs_triton
def test_explain_dispatch_says_who_runs_and_why_the_others_refuse(ref):
    q, k, v = ref.qkv(4, 1, 64, 64, 2, 2, 32, dtype=jnp.bfloat16)
    decisions = explain_dispatch(q, k, v, is_causal=True, mask_fn=lambda b, h, i, j: i != j)
    assert set(decisions) == {"cpu", "cuda", "rocm", "tpu", "default"}
    assert decisions["cpu"].backend == "xla" and not decisions["cpu"].refusals
    cuda = decisions["cuda"]
    assert cuda.backend == "triton" and set(cuda.refusals) == {"cudnn"}
    assert "mask_fn" in cuda.refusals["cudnn"]
    assert "cuda: triton" in str(cuda) and "cudnn refuses" in str(cuda)
    # A named backend: interpret mode off a GPU, and its refusal where it refuses.
    named = explain_dispatch(q, k, v, implementation="pallas", block_size=24, platform="cpu")
    assert named["cpu"].backend is None and "(24, 24)" in named["cpu"].refusals["triton"]
    named = explain_dispatch(q, k, v, implementation="triton", platform="cpu")["cpu"]
    assert named.backend == "triton" and named.interpreted
    # A program of the kernel's that its compiler cannot lower: the next backend on
    # CUDA (Mosaic GPU where its lowering has the primitive, else the block loop).
    erf = explain_dispatch(q, k, v, score_mod=lambda s, b, h, i, j: s + jax.lax.erf(s))
    if "erf" in erf["cuda"].refusals.get("triton", ""):
        expected = "xla" if "mosaic_gpu" in erf["cuda"].refusals else "mosaic_gpu"
        assert erf["cuda"].backend == expected
    with pytest.raises(ValueError, match="platform must be None or one of"):
        explain_dispatch(q, k, v, platform="gpu")
    with pytest.raises(TypeError):
        explain_dispatch(q, k, v, is_casual=True)


@needs_triton
@pytest.mark.parametrize(
    "build",
    [
        lambda: create_block_mask(None, 1, 1, 100, 100, is_causal=True),
        lambda: flex.create_block_mask(
            lambda b, h, i, j: (j <= i + 900) & (j % 3 != 1), None, None, 100, 1000
        ),
    ],
    ids=["create_block_mask", "flex"],
)
def test_prebuilt_block_mask_is_replanned_for_the_kernel(ref, build):
    block_mask = build()
    _, _, q_len, k_len = block_mask.shape
    assert block_mask.block_size[0] == 100  # not a Triton tile: the kernel re-plans it
    q, k, v = ref.qkv(5, 1, q_len, k_len, 2, 1, 16)
    want = ref.attention(q, k, v, np.asarray(block_mask.to_dense()).reshape(1, 1, q_len, k_len))
    got = masked_attention_via_map(q, k, v, block_mask=block_mask, implementation="triton")
    np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-4)
    # The default sends it to the kernel on CUDA, never quietly to the block loop.
    decision = explain_dispatch(q, k, v, block_mask=block_mask, platform="cuda")["cuda"]
    assert decision.backend == "triton", str(decision)
