"""``masked_attention_via_map`` and ``dot_product_attention`` choosing a backend: which
one runs (the pallas_calls it leaves in the program), what ``implementation`` refuses and
why, and where ``None`` falls back to the block loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jax.experimental.pallas", reason="this jax has no Pallas")
try:
    from jax.experimental.pallas import triton as _pl_triton  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the installed jax
    pytest.skip(f"this jax has no Pallas Triton backend ({err})", allow_module_level=True)

from jaxmodules.attention import _platforms, dot_product_attention, masked_attention_via_map
from jaxmodules.attention._pallas import PallasUnsupportedError

# Also run on the older jax versions: the dispatch reads what the installed jax offers.
pytestmark = pytest.mark.compat


def test_pallas_call_in_forward_and_gradient(ref):
    # "triton" traced for a platform known when lowered: a compiled branch for GPUs and
    # an interpreted one for the rest, each with its pallas_calls; lowered for this CPU
    # only the interpreted one remains (no Triton custom call).
    q, k, v = ref.qkv(25, 1, 32, 32, 2, 1, 16)
    bias = jnp.zeros((1, 2, 32, 32))

    def attend(q, k, v, bias):
        return masked_attention_via_map(
            q, k, v, bias=bias, logits_soft_cap=5.0, is_causal=True, implementation="triton"
        )

    forward = str(jax.make_jaxpr(attend)(q, k, v, bias))
    gradient = jax.grad(lambda *a: attend(*a).sum(), (0, 1, 2, 3))
    # (A jax that lowers every branch gets the default device's alone.)
    branches = 2 if _platforms.lowering_keeps_one_branch() else 1
    assert forward.count("pallas_call") == branches
    assert str(jax.make_jaxpr(gradient)(q, k, v, bias)).count("pallas_call") == 3 * branches
    assert "jaxmodules.attention/triton" in jax.jit(attend).lower(q, k, v, bias).as_text(
        debug_info=True
    )
    assert "triton" not in jax.jit(gradient).lower(q, k, v, bias).as_text()
    # None on this CPU: the block loop, named as such in the program.
    text = jax.jit(lambda q: masked_attention_via_map(q, k, v)).lower(q).as_text(debug_info=True)
    assert "jaxmodules.attention/xla" in text and "jaxmodules.attention/triton" not in text


def test_refuses_what_pallas_cannot_take_and_none_falls_back(ref):
    q, k, v = ref.qkv(26, 1, 32, 32, 2, 2, 16)
    with pytest.raises(PallasUnsupportedError, match=r'implementation="triton".*\(24, 24\)'):
        masked_attention_via_map(q, k, v, block_size=24, implementation="pallas")

    @jax.jit
    def traced_table(table):
        return masked_attention_via_map(
            q, k, v, score_mod=ref.relative_table(table), implementation="triton"
        )

    # A traced table read at q - k: its gradient would be kept whole per program.
    with pytest.raises(PallasUnsupportedError, match=r"traced array of shape \(2049,\)"):
        traced_table(jnp.ones(2049))
    with pytest.raises(ValueError, match="implementation must be None or one of"):
        masked_attention_via_map(q, k, v, implementation="tpu")
    # Under None, a CPU runs the block loop, whatever the call.
    out = jax.jit(lambda t: masked_attention_via_map(q, k, v, score_mod=ref.relative_table(t)))(
        jnp.ones(2049)
    )
    assert out.shape == q.shape


def test_dot_product_attention_implementations(ref):
    q, k, v = ref.qkv(27, 2, 40, 40, 4, 2, 16)
    expected = ref.attention(q, k, v, ref.mask_for((2, 40, 40, 4), {"is_causal": True}))
    for implementation in (None, "xla", "triton", "pallas"):
        out = dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
        atol = ref.float32_atol(implementation)
        np.testing.assert_allclose(out, expected, atol=atol, rtol=1e-4, err_msg=implementation)
