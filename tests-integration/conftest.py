"""Shared setup of the integration suite.

The suite trains the demo's own model, ``examples/tiny_lm.py``, so what it checks is what
``nox -s demo`` runs. ``examples/`` is not an installed package, so the module is loaded
from its file; everything it imports (the three jaxmodules packages, optax) comes from the
installed distributions.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

# Four host devices for the sharding tests. XLA reads the flag when jax first creates
# its CPU client, so it must be set before anything imports jax.
_DEVICE_FLAG = "--xla_force_host_platform_device_count=4"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}".strip()

import pytest  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as the top-level module ``name`` (once)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {EXAMPLES / f'{name}.py'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_lm() -> ModuleType:
    return load_example("tiny_lm")


@pytest.fixture(scope="session")
def train_tiny_lm() -> ModuleType:
    # The demo's own dependencies; the integration environment may not have them.
    pytest.importorskip("tqdm")
    pytest.importorskip("matplotlib")
    # The demo script imports its model as ``tiny_lm``; load that first.
    load_example("tiny_lm")
    return load_example("train_tiny_lm")
