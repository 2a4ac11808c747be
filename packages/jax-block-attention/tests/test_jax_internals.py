"""Every private or experimental jax name the attention package uses still exists.

jax moves these without notice (0.12.1 removed its Pallas Triton ops). A release that
drops one fails here, naming it, before a user meets the package's fallback or an
``ImportError``. Where the package itself accepts a name's absence on older jax (it
takes the other spelling, or goes without), this test accepts the same there, and only
there: from ``required_from`` on, the name itself must resolve.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import pytest


def _version() -> tuple[int, ...]:
    return tuple(int(part) for part in jax.__version__.split(".")[:3] if part.isdigit())


def _resolve(dotted: str) -> Any:
    """The object at ``module.attribute[.attribute...]``, importing the longest module."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def _pallas_triton_deprecation_registered() -> bool:
    from jax._src import deprecations

    return deprecations.is_accelerated("jax-pallas-triton") in (True, False)


def _scalar_indexing_form() -> bool:
    """The tile-program evaluator reads a closed-over array indexed by scalars as
    ``dynamic_slice`` (``slice_sizes``) then ``squeeze`` (``dimensions``), and walks the
    jaxpr through ``constvars``/``invars``/``outvars``/``eqns`` and each primitive's
    ``name``, ``multiple_results`` and ``bind``."""
    table = jnp.arange(12.0).reshape(3, 4)
    closed = jax.make_jaxpr(lambda i, j: table[i, j])(1, 2)
    jaxpr = closed.jaxpr
    assert len(closed.consts) == len(jaxpr.constvars) == 1
    assert len(jaxpr.invars) == 2 and len(jaxpr.outvars) == 1
    names = [eqn.primitive.name for eqn in jaxpr.eqns]
    slices = [e for e in jaxpr.eqns if e.primitive.name == "dynamic_slice"]
    squeezes = [e for e in jaxpr.eqns if e.primitive.name == "squeeze"]
    assert slices and squeezes, f"scalar indexing traces to {names}"
    assert tuple(slices[0].params["slice_sizes"]) == (1, 1), slices[0].params
    assert tuple(squeezes[0].params["dimensions"]) == (0, 1), squeezes[0].params
    eqn = squeezes[0]
    assert not eqn.primitive.multiple_results
    assert eqn.primitive.bind(jnp.ones((1, 1)), **eqn.params).shape == ()
    return True


Entry = tuple[str, str, Callable[[], Any], str | None, tuple[int, ...]]


def _name(
    dotted: str, where: str, instead: str | None = None, since: tuple[int, ...] = (0,)
) -> Entry:
    """A name the package imports or reads: it must resolve."""
    return (dotted, where, lambda: _resolve(dotted), instead, since)


# (name used, where, how to check it, the spelling or absence the package accepts
# instead on older jax, the first jax version on which the name itself is required)
INTERNALS: list[Entry] = [
    _name("jax._src.pallas.triton.lowering.triton_lowering_rules", "_pallas/_triton_rules.py"),
    _name("jax._src.deprecations.is_accelerated", "_pallas/_triton_rules.py"),
    (
        "the deprecation id 'jax-pallas-triton'",
        "_pallas/_triton_rules.py",
        _pallas_triton_deprecation_registered,
        "not registered: jax before the deprecation (taken as not removed)",
        (0, 12),
    ),
    _name(
        "jax.experimental.pallas.triton.CompilerParams",
        "_pallas/_calls.py",
        instead="jax.experimental.pallas.triton.TritonCompilerParams",
        since=(0, 10),
    ),
    *[
        _name(f"jax.experimental.pallas.{n}", "_pallas/_calls.py, _pallas/_kernels.py")
        for n in ("pallas_call", "BlockSpec", "program_id", "ds")
    ],
    _name(
        "jax.shard_map",
        "_ring/_entry.py",
        instead="jax.experimental.shard_map.shard_map",
        since=(0, 10),
    ),
    _name(
        "jax.sharding.AxisType.Explicit",
        "_ring/_entry.py",
        instead="absent: jax before explicit sharding (nothing to reshard)",
        since=(0, 10),
    ),
    _name(
        "jax.sharding.reshard",
        "_ring/_entry.py",
        instead="absent: jax before explicit sharding (nothing to reshard)",
        since=(0, 10),
    ),
    _name("jax.extend.core.Literal", "_elementwise.py, _pallas/_tile_program.py"),
    _name("jax.core.Tracer", "_checks.py, _dropout.py, _normalize.py, _pallas/_eligibility.py"),
    _name("jax.core.eval_jaxpr", "_elementwise.py"),
    _name("jax.errors.JAXTypeError", "_elementwise.py"),
    _name("jax.dtypes.float0", "_scores.py, _ring/_steps.py"),
    _name("jax.dtypes.prng_key", "_dropout.py"),
    # The Mosaic backends: each refuses every call on a jax without them, and is
    # required from the jax its kernels were written against.
    _name(
        "jax._src.pallas.mosaic.lowering.lowering_rules",
        "_mosaic_tpu/_rules.py",
        instead="absent: the mosaic_tpu backend refuses every call",
        since=(0, 12),
    ),
    *[
        _name(
            f"jax.experimental.pallas.tpu.{n}",
            "_mosaic_tpu/",
            instead="absent: the mosaic_tpu backend refuses every call",
            since=(0, 12),
        )
        for n in ("CompilerParams", "PrefetchScalarGridSpec", "VMEM", "InterpretParams")
    ],
    *[
        _name(
            dotted,
            "_mosaic_gpu/_rules.py",
            instead="absent: the mosaic_gpu backend refuses every call",
            since=(0, 12),
        )
        for dotted in (
            "jax._src.pallas.mosaic_gpu.lowering.mosaic_lowering_rules",
            "jax._src.pallas.mosaic_gpu.core.LANExWG_SEMANTICS",
        )
    ],
    *[
        _name(
            f"jax.experimental.pallas.mosaic_gpu.{n}",
            "_mosaic_gpu/",
            instead="absent: the mosaic_gpu backend refuses every call",
            since=(0, 12),
        )
        for n in (
            "kernel",
            "InterpretGPUParams",
            "set_max_registers",
            "wgmma",
            "Layout",
            "SMEM",
            "Barrier",
            "barrier_arrive",
            "barrier_wait",
            "copy_gmem_to_smem",
            "copy_smem_to_gmem",
            "commit_smem",
            "wait_smem_to_gmem",
            "SwizzleTransform",
            "TilingTransform",
            "CompilerParams",
            "ACC",
            "layout_cast",
            "load",
            "broadcasted_iota",
        )
    ],
    (
        "jaxpr form of scalar indexing (dynamic_slice + squeeze)",
        "_pallas/_tile_program.py",
        _scalar_indexing_form,
        None,
        (0,),
    ),
]


@pytest.mark.compat
@pytest.mark.parametrize(
    ("name", "where", "check", "instead", "required_from"),
    INTERNALS,
    ids=[entry[0] for entry in INTERNALS],
)
def test_jax_internal_exists(
    name: str,
    where: str,
    check: Callable[[], Any],
    instead: str | None,
    required_from: tuple[int, ...],
) -> None:
    try:
        check()
    except (ImportError, AttributeError, KeyError, ValueError, AssertionError) as err:
        missing = f"jax {jax.__version__} lacks {name} (used in {where}): {err!r}"
        if instead is None or _version() >= required_from:
            pytest.fail(missing)
        if instead.startswith(("absent", "not registered")):
            return  # the package goes without it on this jax
        try:
            _resolve(instead)
        except (ImportError, AttributeError) as fallback:
            pytest.fail(
                f"{missing}; nor has it {instead}, the package's other spelling: {fallback!r}"
            )
