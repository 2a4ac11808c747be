"""The four distributions installed together form one ``jaxmodules`` namespace."""

import importlib
import importlib.metadata
import importlib.util

import pytest

DISTRIBUTIONS = {
    "jax-fancy-vmap": "jaxmodules.vectorize",
    "jax-block-attention": "jaxmodules.attention",
    "jax-logstate": "jaxmodules.logstate",
}


@pytest.mark.parametrize("dist", [*DISTRIBUTIONS, "jaxmodules"])
def test_every_distribution_reports_its_version(dist):
    meta_version = importlib.metadata.version("jaxmodules")
    assert importlib.metadata.version(dist) == meta_version


@pytest.mark.parametrize(("dist", "module"), DISTRIBUTIONS.items())
def test_each_portion_imports_from_its_own_distribution(dist, module):
    imported = importlib.import_module(module)
    files = importlib.metadata.files(dist)
    shipped = {str(f) for f in files if str(f).endswith("__init__.py")}
    assert shipped == {module.replace(".", "/") + "/__init__.py"}
    assert imported.__file__ is not None


def test_jaxmodules_is_a_namespace_package():
    spec = importlib.util.find_spec("jaxmodules")
    assert spec is not None
    assert spec.origin in (None, "namespace")
    assert len(list(spec.submodule_search_locations)) >= 1


def test_meta_package_pins_its_siblings_to_its_own_version():
    version = importlib.metadata.version("jaxmodules")
    requires = importlib.metadata.requires("jaxmodules") or []
    assert sorted(requires) == sorted(f"{dist}=={version}" for dist in DISTRIBUTIONS)
