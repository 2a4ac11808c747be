"""The CUDA target: XLA's own GPU pipeline for an H100, on a host without a GPU.

The CUDA plugin (``jax-cuda13-plugin``, ``jax-cuda13-pjrt``) embeds the target
descriptions of the GPUs it knows; the H100's gives a compile-only device
(``jax.experimental.topologies.get_topology_desc``). ``jax.jit(f).lower(...).compile()``
on it runs XLA's GPU compiler as on a GPU machine: Pallas Triton kernels go through
XLA's Triton pipeline, Mosaic GPU kernels through Mosaic's, and both end in ``ptxas``
for sm_90a. What each kernel uses comes from two places:

- registers and spills from ``ptxas -v``: a small wrapper named ``ptxas`` first on the
  ``PATH`` runs the real one with XLA's own arguments plus ``-v``, and keeps its log;
- shared memory per block (dynamic, so ``ptxas`` does not see it) and threads per block
  from XLA's thunk sequence (``--xla_dump_to``), one line per kernel launch. Mosaic GPU
  launches through a custom call that line does not describe: for those, the scratch
  Mosaic sizes (and checks against the device) when it lowers each kernel, recorded by
  wrapping that lowering.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

from compile_report import report
from compile_report.cases import KNOWN_MOSAIC_SPILLS

NAME = "cuda"
DEVICE = "NVIDIA H100 80GB HBM3"
DEVICES = (None,)  # a plain run: DEVICE (``--device`` names another, a filtered run)
TIMEOUT = 300  # seconds per compile
_HEADER = "proto-message: stream_executor.GpuTargetConfigProto"


def _real_ptxas() -> str:
    path = os.environ.get("PTXAS") or shutil.which("ptxas")
    if not path:
        raise RuntimeError(
            "no ptxas: put CUDA's ptxas (13.0 or newer) on the PATH or name it in $PTXAS"
        )
    return path


def setup(workdir: Path) -> None:
    """Before jax is imported: the plugin loads without a GPU, XLA dumps its thunk
    sequence, and ``ptxas`` is the logging wrapper."""
    real = _real_ptxas()
    bin_dir, logs = workdir / "bin", workdir / "ptxas"
    bin_dir.mkdir(parents=True, exist_ok=True)
    logs.mkdir(exist_ok=True)
    wrapper = bin_dir / "ptxas"
    # Version probes pass through untouched (XLA reads their output); compiles add -v.
    wrapper.write_text(
        f"""#!/bin/sh
case " $* " in *" -arch="*) ;; *) exec "{real}" "$@";; esac
err=$(mktemp)
"{real}" "$@" -v 2>"$err"; rc=$?
{{ echo "ARGS: $*"; cat "$err"; }} > "{logs}/$$.log"; cp "$1" "{logs}/$$.ptx" 2>/dev/null
cat "$err" >&2; rm -f "$err"; exit $rc
"""
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
    # The pipeline as a user gets it: no cheaper code generation from the environment.
    flags = [
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if not flag.startswith(("--xla_backend_optimization_level", "--xla_llvm_disable"))
    ]
    flags.append(f"--xla_dump_to={workdir / 'dump'}")
    os.environ["XLA_FLAGS"] = " ".join(flags)


def target_config(device: str = DEVICE) -> str:
    """The text ``GpuTargetConfigProto`` of ``device``, read from the installed plugin."""
    import jax_plugins.xla_cuda13 as plugin

    (library,) = Path(plugin.__file__).parent.glob("xla_cuda_plugin*.so")
    data = library.read_bytes()
    at = data.find(f'device_description_str: "{device}"'.encode())
    if at < 0:
        raise RuntimeError(f"the CUDA plugin ({library}) describes no {device!r}")
    start = data.rfind(_HEADER.encode(), 0, at)
    end = data.find(b"\0", at)
    return data[start + len(_HEADER) : end].decode()


def shared_limit(config: str) -> int:
    """Shared memory one block may use (bytes): the device's opt-in maximum."""
    found = re.search(r"shared_memory_per_block_optin: (\d+)", config)
    if not found:
        raise RuntimeError("the target description gives no shared_memory_per_block_optin")
    return int(found.group(1))


def arch(config: str) -> str:
    """``sm_XY`` (``a`` for Hopper's and Blackwell's accelerated features) of a description."""
    major = re.search(r"cuda_compute_capability \{\s*major: (\d+)", config)
    minor = re.search(r"cuda_compute_capability \{[^}]*minor: (\d+)", config)
    accelerated = "ACCELERATED_FEATURES" in config.split("cuda_compute_capability", 1)[-1][:200]
    if not major:
        raise RuntimeError("the target description gives no compute capability")
    return f"sm_{major.group(1)}{minor.group(1) if minor else 0}{'a' if accelerated else ''}"


def device(name: str | None = None) -> tuple[Any, dict[str, Any]]:
    """A compile-only GPU (the H100 unless ``name`` picks another description the plugin
    holds, e.g. ``"NVIDIA A100-SXM4-80GB"``) and what the report says about it."""
    from jax.experimental import topologies

    config = target_config(name or DEVICE)
    topology = topologies.get_topology_desc(
        "", platform="cuda", target_config=config, topology="1x1x1"
    )
    return topology.devices[0], {"memory_limit": shared_limit(config), "arch": arch(config)}


# Mosaic GPU kernel name -> its shared memory per block and threads, recorded as Mosaic
# lowers it (the launch is a custom call, absent from XLA's thunk sequence).
_MOSAIC: dict[str, dict[str, int]] = {}


def _record_mosaic_launches() -> None:
    """Wrap Mosaic GPU's lowering of one kernel to note its shared memory (the scratch
    tree Mosaic sizes and checks against 227 KiB) and threads. A private function: on a
    jax without it the rows say "checked at lowering"."""
    try:
        from jax.experimental.mosaic.gpu import core
    except ImportError:
        return
    lower, size = (
        getattr(core, "_lower_as_gpu_kernel", None),
        getattr(core, "_smem_tree_size", None),
    )
    if lower is None or size is None or getattr(lower, "_recorded", False):
        return

    def recording(*args: Any, **kwargs: Any) -> Any:
        names = ("body", "grid", "cluster", "block", "in_shapes", "out_shape", "inout_shape")
        bound = dict(zip((*names, "smem_scratch_shape", "lowering_semantics"), args, strict=False))
        bound.update(kwargs)
        try:
            threads = 1
            for n in bound["block"]:
                threads *= int(n)
            _MOSAIC[str(bound["kernel_name"])] = {
                "memory": int(size(bound["smem_scratch_shape"])),
                "threads": threads,
            }
        except (KeyError, TypeError, ValueError):
            pass
        return lower(*args, **kwargs)

    recording._recorded = True  # type: ignore[attr-defined]
    core._lower_as_gpu_kernel = recording


def compile_on(dev: Any, fn: Any, args: tuple[Any, ...]) -> Any:
    """Compile for ``dev``. Pallas Triton finds its GPU through the default device."""
    import jax

    _record_mosaic_launches()
    with jax.default_device(dev):
        return jax.jit(fn).lower(*args).compile()


_LAUNCH = re.compile(
    r"kernel=([\w.$]+), profile_annotation=([\w.$]+), .*?threads/block: \{(\d+), (\d+), (\d+)\}"
    r".*?shmem_bytes=(\d+)"
)


def _launches(dump: Path) -> dict[str, dict[str, Any]]:
    """Kernel name -> XLA's annotation, threads and shared memory per block, from XLA's
    thunk sequence."""
    found: dict[str, dict[str, Any]] = {}
    for path in dump.glob("*.thunk_sequence.txt"):
        for match in _LAUNCH.finditer(path.read_text()):
            name, annotation, x, y, z, shmem = match.groups()
            threads = int(x) * int(y) * int(z)
            found[name] = {"annotation": annotation, "threads": threads, "memory": int(shmem)}
    return found


def _ptxas_reports(logs: Path) -> list[tuple[str, dict[str, int]]]:
    """(kernel name, registers and spill bytes) of every entry point ``ptxas -v`` compiled;
    a name can repeat (every Mosaic GPU kernel is ``entry_mosaic_gpu_kernel``)."""
    found = []
    for path in sorted(logs.glob("*.log")):
        for block in path.read_text().split("Compiling entry function ")[1:]:
            registers = re.search(r"Used (\d+) registers", block)
            stores = re.search(r"(\d+) bytes spill stores", block)
            loads = re.search(r"(\d+) bytes spill loads", block)
            metrics = {
                "registers": int(registers.group(1)) if registers else -1,
                "spill_stores": int(stores.group(1)) if stores else 0,
                "spill_loads": int(loads.group(1)) if loads else 0,
            }
            found.append((block.split("'")[1], metrics))
    return found


def _tensor_cores(logs: Path) -> dict[str, str]:
    """Entry name -> the tensor-core instruction its PTX uses (``wgmma``: Hopper's
    asynchronous warpgroup MMA; ``mma.sync``: the Ampere-style one), or ``none``."""
    found = {}
    for path in logs.glob("*.ptx"):
        for body in re.split(r"\.entry ", path.read_text())[1:]:
            name = re.match(r"([\w$.]+)", body)
            if name:
                kind = "wgmma" if "wgmma" in body else "mma.sync" if "mma.sync" in body else "none"
                found[name.group(1)] = kind
    return found


def kernels(workdir: Path, compiled: Any, reference: bool) -> list[dict[str, Any]]:
    """One row per attention kernel of the compiled program: ours are the Pallas
    launches (``pallas_call`` in XLA's annotation) and the Mosaic GPU kernels named
    ``jaxmodules_<pass>``, jax's the Mosaic GPU kernels (``entry_mosaic_gpu_kernel`` for
    its forward, ``anonymous_mosaic_gpu_kernel`` for its backward's)."""
    del compiled  # everything is in the dumps
    if not any((workdir / "ptxas").glob("*.log")):
        raise RuntimeError("XLA ran no ptxas through the wrapper (it found another ptxas?)")
    launches = _launches(workdir / "dump")
    tensor_cores = _tensor_cores(workdir / "ptxas")
    rows = []
    for name, metrics in _ptxas_reports(workdir / "ptxas"):
        launch = launches.get(name)
        mosaic = _MOSAIC.get(name.removesuffix("_mosaic_gpu_kernel"))
        if name.endswith("_mosaic_gpu_kernel") and mosaic is not None:
            launch = {"annotation": "mosaic_gpu", **mosaic}
        ours = launch is not None and launch["annotation"].startswith("pallas_call")
        # Our Mosaic GPU kernels are named jaxmodules_<pass> (_mosaic_gpu/_kernels.py).
        ours = ours or name.startswith("jaxmodules_")
        if ours or (reference and name.endswith("mosaic_gpu_kernel")):
            where = {k: v for k, v in (launch or {}).items() if k != "annotation"}
            cores = {"tensor_cores": tensor_cores.get(name, "?")}
            rows.append({"kernel": name, **where, **metrics, **cores})
    order = {n: i for i, n in enumerate(("forward", "dq", "dkdv"))}

    def rank(row: dict[str, Any]) -> int:
        name = row["kernel"].removeprefix("jaxmodules_").removesuffix("_mosaic_gpu_kernel")
        return order.get(name.rsplit("_", 1)[-1], 9)

    rows.sort(key=lambda r: (rank(r), r["registers"]))
    return rows


def versions() -> dict[str, str]:
    """The plugin's and ptxas's versions, for the report's header."""
    import subprocess
    from importlib import metadata

    out = subprocess.run(
        [_real_ptxas(), "--version"], capture_output=True, text=True, check=False
    ).stdout
    release = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return {
        "jax-cuda13-plugin": metadata.version("jax-cuda13-plugin"),
        "ptxas": release.group(2) if release else out.strip().splitlines()[-1:][0],
    }


def gate(results: list[dict[str, Any]], info: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The offences (``report.offenders``), and apart from them the known spills
    (``KNOWN_MOSAIC_SPILLS``: reported, not failing the run)."""
    problems = report.offenders(results, info["memory_limit"])
    known = [
        p for p in problems if any(p.startswith(k) and "spills" in p for k in KNOWN_MOSAIC_SPILLS)
    ]
    return [p for p in problems if p not in known], known


def table(results: list[dict[str, Any]], info: dict[str, Any]) -> str:
    return report.table(results, info["memory_limit"])


markdown = report.markdown
