"""The four distributions installed together form one ``jaxmodules`` namespace."""

import importlib
import importlib.metadata
import importlib.util
import tomllib
from pathlib import Path

import pytest

DISTRIBUTIONS = {
    "jax-fancy-vmap": "jaxmodules.vectorize",
    "jax-block-attention": "jaxmodules.attention",
    "jax-logstate": "jaxmodules.logstate",
}


ROOT = Path(__file__).resolve().parents[1]
PYPROJECTS = {
    "jaxmodules": ROOT / "pyproject.toml",
    **{dist: ROOT / "packages" / dist / "pyproject.toml" for dist in DISTRIBUTIONS},
}


def declared_version(dist):
    """The version the repository's own pyproject.toml gives ``dist``."""
    with open(PYPROJECTS[dist], "rb") as f:
        return tomllib.load(f)["project"]["version"]


@pytest.mark.parametrize("dist", [*DISTRIBUTIONS, "jaxmodules"])
def test_every_installed_distribution_has_the_version_its_pyproject_declares(dist):
    # Checked against the source, not against another installed distribution, so a
    # stale or mismatched install fails even when all four agree with each other.
    assert importlib.metadata.version(dist) == declared_version(dist)
    assert declared_version(dist) == declared_version("jaxmodules")


@pytest.mark.parametrize(("dist", "module"), DISTRIBUTIONS.items())
def test_each_portion_imports_from_its_own_distribution(dist, module):
    imported = importlib.import_module(module)
    files = importlib.metadata.files(dist)
    shipped = {str(f) for f in files if str(f).endswith("__init__.py")}
    own = module.replace(".", "/") + "/"
    # Its own package and its private subpackages, never jaxmodules/__init__.py.
    assert own + "__init__.py" in shipped
    assert all(name.startswith(own) for name in shipped), shipped
    assert imported.__file__ is not None
    assert Path(imported.__file__).as_posix().endswith(own + "__init__.py")


def test_jaxmodules_is_a_namespace_package():
    spec = importlib.util.find_spec("jaxmodules")
    assert spec is not None
    assert spec.origin in (None, "namespace")
    assert len(list(spec.submodule_search_locations)) >= 1


def test_meta_package_pins_its_siblings_to_its_own_version():
    version = importlib.metadata.version("jaxmodules")
    requires = importlib.metadata.requires("jaxmodules") or []
    assert sorted(requires) == sorted(f"{dist}=={version}" for dist in DISTRIBUTIONS)
