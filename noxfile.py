"""Every developer and CI task of the jaxmodules repository (needs Python 3.11+).

A bare ``nox`` runs what CI needs: lint, type checks, each package's tests against its
built wheel (newest and oldest supported jax), the integration suite, the docs build and
the packaging checks. ``demo``, ``bench``, ``flex_torch`` and ``gpu_check`` run only when
asked for by name.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = False
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
DIST = ROOT / "dist"

# distribution name -> subpackage under jaxmodules/
PACKAGES = {
    "jax-fancy-vmap": "vectorize",
    "jax-block-attention": "attention",
    "jax-logstate": "logstate",
}
PACKAGE_NAMES = list(PACKAGES)

RUFF = "ruff==0.17.6"  # pinned: it also formats code blocks in Markdown

# XLA flags for runs that compile many small programs and time none of them: LLVM's
# cheaper code generation, the same values (the attention suite's conftest sets them too).
CHEAP_XLA_CODEGEN = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# Extra packages the cross-package sessions need besides the wheels' own test extras.
INTEGRATION_DEPS = [
    "pytest>=8",
    "hypothesis>=6.100",
    "optax>=0.2.3",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "flax>=0.12",  # the README's flax example
]
DEMO_DEPS = ["optax>=0.2.3", "tqdm>=4.66", "matplotlib>=3.8"]
DOCS_DEPS = [
    RUFF,  # mkdocstrings formats the separate signatures with it
    "mkdocs>=1.6",
    "mkdocs-material>=9.5",
    "mkdocstrings[python]>=0.26",
    "markdown-exec[ansi]>=1.9",
    "pytest>=8",
    "pytest-xdist>=3.5",
    "optax>=0.2.3",
    "matplotlib>=3.8",
    "flax>=0.12",  # the "Use with flax" page runs nnx and linen layers
]


# The newest jax needs Python >= 3.12 (pip on 3.11 stops at jax 0.10). Sessions for it
# run on the first such interpreter found: NOX_NEWEST_PYTHON, else python3.12 or
# python3.13 on PATH, else the oldest pyenv-installed Python >= 3.12 (the oldest, because
# new jax wheels reach the newest Python last). The Python 3.11 sessions find theirs the
# same way (NOX_PY311, this interpreter, python3.11, pyenv). "This interpreter" may be the
# README's .venv: uv and virtualenv build session environments on its base interpreter.
NO_PYTHON = (
    "no Python {wanted} found, which {why} needs. Install one with `pyenv install "
    "{version}` (https://github.com/pyenv/pyenv) or your OS's python{version} package, "
    "then rerun nox (or point {variable} at its interpreter)"
)


def _python_version(interpreter: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [interpreter, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    parts = out.stdout.split()
    if out.returncode != 0 or len(parts) != 2:
        return None
    return int(parts[0]), int(parts[1])


def _pyenv_pythons(lowest: tuple[int, int], highest: tuple[int, int]) -> list[str]:
    """pyenv's CPython 3.X.Y interpreters with ``lowest <= 3.X <= highest``, oldest first
    (its real binaries, not its shims, which answer only for the versions selected)."""
    root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    found = []
    for python in (Path(root) / "versions").glob("3.*/bin/python3"):
        match = re.fullmatch(r"3\.(\d+)\.(\d+)", python.parent.parent.name)
        if match and lowest <= (3, int(match[1])) <= highest:
            found.append(((int(match[1]), int(match[2])), str(python)))
    return [python for _, python in sorted(found)]


def _find_python(
    variable: str, lowest: tuple[int, int], highest: tuple[int, int], *preferred: str
) -> str | None:
    """The first interpreter with ``lowest <= version <= highest`` among ``$variable``,
    ``preferred`` and pyenv's; ``None`` when this machine has none."""
    candidates = [os.environ.get(variable, ""), *preferred]
    for candidate in [*candidates, *_pyenv_pythons(lowest, highest)]:
        version = _python_version(candidate) if candidate else None
        if version is not None and lowest <= version <= highest:
            return candidate
    return None


NEWEST_PYTHON = _find_python(
    "NOX_NEWEST_PYTHON",
    (3, 12),
    (3, 99),
    shutil.which("python3.12") or "",
    shutil.which("python3.13") or "",
)
PY311 = _find_python(
    "NOX_PY311", (3, 11), (3, 11), sys.executable, shutil.which("python3.11") or ""
)


def _require_newest_python(session: nox.Session) -> None:
    if NEWEST_PYTHON is None:
        session.error(
            NO_PYTHON.format(
                wanted=">= 3.12",
                why="the newest jax",
                version="3.12",
                variable="NOX_NEWEST_PYTHON",
            )
        )


def _require_py311(session: nox.Session) -> None:
    if PY311 is None:
        session.error(
            NO_PYTHON.format(
                wanted="3.11",
                why="jax 0.10 (the newest on 3.11)",
                version="3.11",
                variable="NOX_PY311",
            )
        )


def _pyproject(path: Path) -> dict:
    with open(path / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _min_jax(package: str) -> str:
    """The oldest jax a package declares, read from its ``jax>=X`` dependency."""
    for dep in _pyproject(ROOT / "packages" / package)["project"]["dependencies"]:
        match = re.fullmatch(r"jax\s*>=\s*([0-9.]+)", dep.strip())
        if match:
            return match.group(1)
    raise RuntimeError(f"{package} declares no 'jax>=X' dependency")


def _build(
    session: nox.Session, project: Path, *, sdist: bool = False, out_dir: Path | None = None
) -> list[Path]:
    """Build ``project`` and return the new artifacts.

    Artifacts go to the session's own temporary folder unless ``out_dir`` is given, so
    sessions running side by side never pick up each other's wheels.
    """
    out = out_dir or Path(session.create_tmp()) / "dist"
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.iterdir())
    kinds = ["--wheel", "--sdist"] if sdist else ["--wheel"]
    if session.venv_backend == "uv":
        session.run("uv", "build", *kinds, "--out-dir", str(out), str(project), silent=True)
    else:
        session.install("build")
        session.run("python", "-m", "build", *kinds, "--outdir", str(out), str(project))
    new = set(out.iterdir()) - before
    return sorted(p for p in new if p.name.endswith((".whl", ".tar.gz")))


def _wheel(session: nox.Session, package: str) -> Path:
    (wheel,) = [p for p in _build(session, ROOT / "packages" / package) if p.suffix == ".whl"]
    return wheel


def _all_wheels(session: nox.Session) -> list[Path]:
    """Wheels of the three packages and the meta-package, freshly built."""
    wheels = [_wheel(session, package) for package in PACKAGE_NAMES]
    wheels += [p for p in _build(session, ROOT) if p.suffix == ".whl"]
    return wheels


# Run in a venv holding one distribution: its portion imports, its siblings do not.
_ISOLATION_CHECK = """
import importlib, sys, jax
own = sys.argv[1]
importlib.import_module(f"jaxmodules.{own}")
for other in {"vectorize", "attention", "logstate"} - {own}:
    try:
        importlib.import_module(f"jaxmodules.{other}")
    except ModuleNotFoundError:
        continue
    raise SystemExit(f"jaxmodules.{other} is importable beside jaxmodules.{own} alone")
print(f"jaxmodules.{own} installed alone; jax {jax.__version__}")
"""


def _pytest(session: nox.Session, *args: str, env: dict[str, str] | None = None) -> None:
    """pytest with the repository's configuration, whatever the working directory."""
    config = ["-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT)]
    session.run("pytest", *config, *args, env=env)


def _session_script(session: nox.Session, name: str, text: str) -> Path:
    """Write ``text`` to ``name`` in the session's temporary folder (logged as a path)."""
    path = Path(session.create_tmp()) / name
    path.write_text(text)
    return path


# Test processes per package (pytest-xdist, in the package's test extras): the attention
# suite is mostly XLA compiling small programs, one core per process. The other suites
# gain nothing from a second process (measured).
TEST_PROCESSES = {"jax-block-attention": 2}

# On the older jax versions a package may run a subset of its suite: the attention suite
# runs whole on the newest jax, and on jax 0.10 and its oldest jax only the tests marked
# `compat` (every entry point, backend and jax API it leans on, one case each; the
# sweeps of many cases through the same code run once).
OLDER_JAX_SELECTION = {"jax-block-attention": ["--compat-subset"]}


def _run_package_tests(
    session: nox.Session, package: str, *pins: str, older_jax: bool = False
) -> None:
    wheel = _wheel(session, package)
    session.install(f"{wheel}[test]", *pins)
    check = _session_script(session, "isolation_check.py", _ISOLATION_CHECK)
    session.run("python", str(check), PACKAGES[package])
    processes = TEST_PROCESSES.get(package, 1)
    selection = ["-n", str(processes)] if processes > 1 else []
    if older_jax:
        selection += OLDER_JAX_SELECTION.get(package, [])
    # Tests run against the installed wheel, never the source tree. They compile many
    # small programs and time none (attention's own conftest also sets the flags, for
    # runs outside nox; attention_optimized covers XLA's default level).
    _pytest(
        session,
        str(ROOT / "packages" / package / "tests"),
        *selection,
        *session.posargs,
        env={"XLA_FLAGS": CHEAP_XLA_CODEGEN},
    )


@nox.session(tags=["check"])
def lint(session: nox.Session) -> None:
    """Ruff lint and format check over the whole repository, the source layout (file and
    function sizes, no import cycles: tools/check_layout.py), and version lockstep."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("python", str(ROOT / "tools" / "check_layout.py"))
    check_versions(session)


def check_versions(session: nox.Session) -> None:
    meta = _pyproject(ROOT)["project"]
    version = meta["version"]
    problems = []
    for package in PACKAGE_NAMES:
        own = _pyproject(ROOT / "packages" / package)["project"]["version"]
        if own != version:
            problems.append(f"{package} is at {own}, the meta-package at {version}")
        if f"{package}=={version}" not in meta["dependencies"]:
            problems.append(f"the meta-package does not pin {package}=={version}")
    if problems:
        session.error("versions out of step: " + "; ".join(problems))
    session.log(f"all four distributions are at {version}")


@nox.session(tags=["check"], python=NEWEST_PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy on each package's source, against the newest jax (Python 3.12+): the Mosaic
    kernels are written against its Pallas API."""
    _require_newest_python(session)
    session.install("mypy>=1.10", "jax", "numpy")
    # One cache for the three runs: jax's own modules are analysed once, not three times.
    cache = str(Path(session.create_tmp()) / "mypy-cache")
    config = ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", cache]
    for package, name in PACKAGES.items():
        with session.chdir(ROOT / "packages" / package):
            session.run("mypy", *config, "-p", f"jaxmodules.{name}")


@nox.session(tags=["tests"], python=NEWEST_PYTHON)
@nox.parametrize("package", PACKAGE_NAMES, ids=PACKAGE_NAMES)
def tests(session: nox.Session, package: str) -> None:
    """One package's tests against its built wheel and the newest jax (Python 3.12+)."""
    _require_newest_python(session)
    _run_package_tests(session, package)


@nox.session(tags=["tests"], python=PY311)
@nox.parametrize("package", PACKAGE_NAMES, ids=PACKAGE_NAMES)
def tests_py311(session: nox.Session, package: str) -> None:
    """One package's tests against its built wheel and the newest jax on Python 3.11
    (jax 0.10): what ``pip install`` gives where Python is 3.11. The attention suite runs
    its ``compat`` subset (``OLDER_JAX_SELECTION``)."""
    _require_py311(session)
    _run_package_tests(session, package, older_jax=True)


@nox.session(tags=["tests"], python=PY311)
@nox.parametrize("package", PACKAGE_NAMES, ids=PACKAGE_NAMES)
def tests_min_jax(session: nox.Session, package: str) -> None:
    """One package's tests against its built wheel and the oldest jax it declares
    (Python 3.11); the attention suite runs its ``compat`` subset."""
    _require_py311(session)
    version = _min_jax(package)
    _run_package_tests(session, package, f"jax=={version}", f"jaxlib=={version}", older_jax=True)


# A pytest plugin (loaded with -p, before any conftest.py) that starts jax's backend.
# XLA reads XLA_FLAGS once, when the backend starts, so the attention conftest's later
# addition of --xla_backend_optimization_level=0 does not apply to that run.
_EARLY_BACKEND = """
import os, jax
jax.devices()
_FLAGS = os.environ.get("XLA_FLAGS", "")

def pytest_report_header(config):
    return f"XLA backend started before the conftests, XLA_FLAGS={_FLAGS!r}"
"""

# Attention tests that also run at XLA's default optimisation level: every other
# attention run compiles at level 0 to save time, which could hide a miscompilation.
OPTIMIZED_ATTENTION_TESTS = ["test_gqa_head_masks.py", "test_skipped_blocks_backward.py"]


@nox.session(tags=["tests"])
def attention_optimized(session: nox.Session) -> None:
    """A few attention tests (float32 GQA masks, both passes) at XLA's default optimisation."""
    session.install(f"{_wheel(session, 'jax-block-attention')}[test]")
    plugin = _session_script(session, "xla_early_backend.py", _EARLY_BACKEND)
    tests = ROOT / "packages" / "jax-block-attention" / "tests"
    _pytest(
        session,
        "-p",
        plugin.stem,
        *(str(tests / name) for name in OPTIMIZED_ATTENTION_TESTS),
        *session.posargs,
        env={"XLA_FLAGS": "", "PYTHONPATH": str(plugin.parent)},
    )


# PyTorch for the FlexAttention comparison: any CPU build does (it runs eagerly on the CPU).
TORCH = "torch==2.13.0"


@nox.session(python="3.11", venv_backend="venv", default=False)
def flex_torch(session: nox.Session) -> None:
    """``jaxmodules.attention.flex`` against PyTorch's FlexAttention: tests/flex_torch/.

    Installed with pip (the ``venv`` backend, not uv) on Python 3.11 so that pip's own
    configuration decides where ``torch`` comes from: point it at a CPU-only wheel
    (``PIP_FIND_LINKS`` or ``PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu``),
    or the default index serves the multi-GB CUDA build.
    """
    session.install(f"{_wheel(session, 'jax-block-attention')}[test]", TORCH)
    _pytest(
        session,
        str(ROOT / "packages" / "jax-block-attention" / "tests" / "flex_torch"),
        *session.posargs,
    )


@nox.session(tags=["tests"])
def integration(session: nox.Session) -> None:
    """All packages and the meta-package installed together; runs tests-integration/."""
    session.install(*map(str, _all_wheels(session)), *INTEGRATION_DEPS, "pytest-xdist>=3.5")
    # Two processes, each test file in one of them (the files share trained models
    # through module fixtures); the suite's time is XLA compiling, as in the unit tests.
    _pytest(
        session,
        str(ROOT / "tests-integration"),
        "-n",
        "2",
        "--dist",
        "loadfile",
        *session.posargs,
        env={"XLA_FLAGS": f"{CHEAP_XLA_CODEGEN} --xla_force_host_platform_device_count=4"},
    )


@nox.session(tags=["docs"])
def docs(session: nox.Session) -> None:
    """Strict docs build (warnings fail) with executed examples and docstring doctests."""
    session.install(*map(str, _all_wheels(session)), *DOCS_DEPS)
    # The examples' time is mostly XLA compiling; cheaper LLVM code generation cuts the
    # build by a third. It computes the same values (printed floats move in the last
    # digit), and the compiled memory figures the pages print are unchanged.
    env = {"XLA_FLAGS": CHEAP_XLA_CODEGEN}
    # Docstring examples run against the installed wheels, in two processes.
    _pytest(
        session,
        "-n",
        "2",
        "--doctest-modules",
        "--pyargs",
        *(f"jaxmodules.{n}" for n in PACKAGES.values()),
        env=env,
    )
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        str(ROOT / "site"),
        env={**env, "NO_MKDOCS_2_WARNING": "1"},
    )


@nox.session(tags=["build"])
def build(session: nox.Session) -> None:
    """Wheels and sdists of all four distributions, twine check, wheel contents check."""
    session.install("twine>=5")
    if DIST.exists():
        for artifact in DIST.iterdir():
            artifact.unlink()
    artifacts = []
    for package in PACKAGE_NAMES:
        artifacts += _build(session, ROOT / "packages" / package, sdist=True, out_dir=DIST)
    artifacts += _build(session, ROOT, sdist=True, out_dir=DIST)
    session.run("twine", "check", "--strict", *map(str, artifacts))
    for wheel in (p for p in artifacts if p.suffix == ".whl"):
        _check_wheel_contents(session, wheel)


def _check_wheel_contents(session: nox.Session, wheel: Path) -> None:
    names = [n for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n]
    dist = wheel.name.split("-")[0].replace("_", "-")
    if dist == "jaxmodules":
        if names:
            session.error(f"{wheel.name} must be metadata-only, holds {names}")
        session.log(f"{wheel.name}: metadata only")
        return
    prefix = f"jaxmodules/{PACKAGES[dist]}/"
    stray = [n for n in names if not n.startswith(prefix)]
    if stray:
        session.error(f"{wheel.name} ships files outside {prefix}: {stray}")
    if f"{prefix}py.typed" not in names or f"{prefix}__init__.py" not in names:
        session.error(f"{wheel.name} lacks {prefix}__init__.py or {prefix}py.typed")
    session.log(f"{wheel.name}: {len(names)} files, all under {prefix}")


@nox.session(default=False)
def demo(session: nox.Session) -> None:
    """Train the tiny character-level language model (examples/train_tiny_lm.py)."""
    session.install(*map(str, _all_wheels(session)), *DEMO_DEPS)
    session.run("python", str(ROOT / "examples" / "train_tiny_lm.py"), *session.posargs)


# ptxas for the compile report, from NVIDIA's wheel (CUDA 13.0, the plugin's CUDA).
PTXAS = "nvidia-cuda-nvcc==13.0.88"
_PTXAS_PATH = "import pathlib, nvidia.cu13 as m; print(pathlib.Path(m.__path__[0], 'bin', 'ptxas'))"


@nox.session(tags=["check"], python=NEWEST_PYTHON)
def gpu_compile(session: nox.Session) -> None:
    """The attention kernels compiled by XLA's own GPU pipeline for an H100 (no GPU
    needed; the CUDA plugin's compile-only device, ``ptxas`` for sm_90a), newest jax:
    shared memory, registers, spills per kernel beside jax's Mosaic GPU attention,
    written to ``benchmarks/results/attention_gpu_compile.md``; fails on one of our
    kernels that does not compile, cannot launch or spills (``benchmarks/compile_report``;
    arguments after ``--`` go to it). ``ptxas`` comes from NVIDIA's ``nvidia-cuda-nvcc`` wheel."""
    _require_newest_python(session)
    session.install(str(_wheel(session, "jax-block-attention")))
    # The plugin must match the jax the wheel brought in; absl-py: jax's attention_mgpu.
    jax_version = session.run_install(
        "python", "-c", "import jax; print(jax.__version__)", silent=True
    )
    env = {"PYTHONPATH": str(ROOT / "benchmarks")}
    if jax_version is not None:  # None: installs skipped (nox --no-install on a reused venv)
        version = jax_version.strip()
        session.install(f"jax-cuda13-plugin=={version}", f"jax-cuda13-pjrt=={version}", "absl-py")
        # NVIDIA's ptxas in a folder of its own: inside the venv, XLA would find it before
        # the report's logging wrapper on the PATH.
        tools = Path(session.create_tmp()) / "ptxas"
        installer = ["uv", "pip"] if session.venv_backend == "uv" else ["python", "-m", "pip"]
        session.run_install(*installer, "install", "--quiet", "--target", str(tools), PTXAS)
        env["PTXAS"] = str(tools / "nvidia" / "cu13" / "bin" / "ptxas")
    session.run("python", "-m", "compile_report", "--target", "cuda", *session.posargs, env=env)


@nox.session(tags=["check"], python=NEWEST_PYTHON)
def tpu_compile(session: nox.Session) -> None:
    """The attention kernels compiled by libtpu for TPU v5e and v6e (no TPU needed;
    libtpu's compile-only topologies), newest jax: scoped VMEM per kernel and compile
    time beside jax's splash attention, written to
    ``benchmarks/results/attention_tpu_compile.md``; fails on a kernel that does not
    compile, exceeds the default scoped VMEM or silently falls back to the block loop
    (``benchmarks/compile_report --target tpu``, one process per compile as for
    ``gpu_compile``; arguments after ``--`` go to it, e.g. ``--topologies v5e v6e v5p v4``,
    ``--full``)."""
    _require_newest_python(session)
    # libtpu on its own: jax[tpu] pins a libtpu release the index may not have yet.
    session.install(str(_wheel(session, "jax-block-attention")), "libtpu")
    env = {"PYTHONPATH": str(ROOT / "benchmarks")}
    session.run("python", "-m", "compile_report", "--target", "tpu", *session.posargs, env=env)


@nox.session(default=False, python=NEWEST_PYTHON)
def gpu_check(session: nox.Session) -> None:
    """The attention kernels on an NVIDIA GPU (``benchmarks/gpu/check.py``, every part):
    each kernel compiled with small numerics, the Pallas and drop-in tests compiled, the
    bfloat16 targets against cuDNN at L=16384 and the tuning sweep, written to
    ``benchmarks/results/attention_gpu_*``. Without a GPU it says so and checks nothing
    (``-- --strict`` makes that a failure). On a GPU machine without a package index, run
    the script itself with the machine's Python (its docstring gives the command)."""
    _require_newest_python(session)
    session.install(*map(str, _all_wheels(session)), "jax[cuda13]", *INTEGRATION_DEPS)
    args = list(session.posargs)
    if "--parts" not in args:
        args = ["--parts", "smoke", "tests", "benchmark", "tuning", *args]
    session.run("python", str(ROOT / "benchmarks" / "gpu" / "check.py"), *args)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks against jax's own implementations; tables go to benchmarks/results/."""
    # optax: logstate.py times the demo's training step (examples/tiny_lm.py).
    session.install(*map(str, _all_wheels(session)), "matplotlib>=3.8", "numpy", "optax>=0.2.3")
    scripts = sorted((ROOT / "benchmarks").glob("*.py"))
    wanted = set(session.posargs)
    for script in scripts:
        if not wanted or script.stem in wanted:
            session.run("python", str(script))
