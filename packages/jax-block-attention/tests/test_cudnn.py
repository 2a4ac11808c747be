"""The cuDNN backend: which calls go to ``jax.nn``'s cuDNN path (only masks it expresses
exactly) and what ``implementation="cudnn"`` refuses, checked without a GPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodules.attention import _cudnn, dot_product_attention
from jaxmodules.attention._checks import check_arguments

# Also run on the older jax versions: the dispatch reads what the installed jax offers.
pytestmark = pytest.mark.compat

IDS = jnp.asarray(np.stack([np.arange(32) // 9, np.arange(32) // 6]), jnp.int32)


def same_segment(b, h, q, k):
    return IDS[b, q] == IDS[b, k]


def _problem(q, k, v, *, return_lse=False, platform="cpu", **options):
    """``cudnn_problem`` for a call with ``options`` (the keywords of
    ``masked_attention_via_map``; causal by default)."""
    keywords = dict(
        is_causal=True,
        mask_fn=None,
        block_size=None,
        window_size=None,
        scale=None,
        block_mask=None,
        q_offset=0,
    )
    args = check_arguments(q, k, v, **{**keywords, **options})
    return _cudnn.cudnn_problem(args, return_lse=return_lse, platform=platform)


def test_cudnn_takes_only_masks_it_expresses_exactly(ref, monkeypatch):
    q, k, v = ref.qkv(28, 1, 32, 32, 2, 2, 16, dtype=jnp.bfloat16)
    assert "needs a GPU" in _problem(q, k, v)
    # Lowered for CUDA, from a host without cuDNN jax.nn cannot trace its call.
    on_cuda = _problem(q, k, v, platform="cuda")
    assert (on_cuda is None) == _cudnn.has_cudnn(), on_cuda
    monkeypatch.setattr(_cudnn, "has_cudnn", lambda: True)
    assert _problem(q, k, v, platform="cuda") is None
    on_gpu = functools.partial(_problem, platform="cuda")

    refused = {
        "mask_fn": (dict(mask_fn=same_segment), "mask_fn"),
        "soft_cap": (dict(logits_soft_cap=2.0), "logits_soft_cap"),
        "sinks": (dict(sinks=jnp.zeros(2)), "sinks"),
        "q_offset": (dict(q_offset=3), "q_offset"),
        "lse": (dict(return_lse=True), "return_lse"),
        "mask": (dict(mask=jnp.ones((1, 1, 32, 32), bool)), "mask array"),
        "right window": (dict(is_causal=False, window_size=(8, 4)), "only a left window"),
    }
    for name, (change, message) in refused.items():
        assert message in on_gpu(q, k, v, **change), name
    assert "float16 or bfloat16" in on_gpu(*(x.astype(jnp.float32) for x in (q, k, v)))
    assert "head dimensions" in on_gpu(q, k, v[..., :8])
    # Non-causal (L, 0) is the causal band with a left window: passed as such (jax's own
    # non-causal (L, 0) lets future keys through, jax PR #39576).
    assert _cudnn.cudnn_window(False, (8, 0)) == (True, (8, 0))
    assert _cudnn.cudnn_window(True, (8, None)) == (True, (8, 0))
    assert _cudnn.cudnn_window(False, (None, 0)) == (True, None)


def test_implementation_cudnn_says_why_it_refuses(ref):
    q, k, v = ref.qkv(27, 2, 40, 40, 4, 2, 16)
    with pytest.raises(ValueError, match=r'implementation="cudnn" cannot.*bfloat16'):
        dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if jax.default_backend() != "gpu":
        half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
        with pytest.raises(ValueError, match=r'implementation="cudnn" cannot.*needs a GPU'):
            dot_product_attention(*half, is_causal=True, implementation="cudnn")
